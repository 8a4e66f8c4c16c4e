"""A Llama-style decoder in Flax NNX: the model the demo, the tests, the layer benchmark and
:func:`jaxq.nn.from_pretrained` use (Llama, Mistral and Qwen2 checkpoints).

Module names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``, ...), so
checkpoint tensor names read the same. Attention is causal (within ``sliding_window`` when set), over the
whole sequence or, with a :class:`LayerCache` per layer, over the cache's positions (one prefill, then one
token per step: :func:`jaxq.nn.generate`). With ``tensor_parallel=True`` the projections carry sharding
metadata for a ``"model"`` mesh axis: q/k/v/gate/up column-parallel, o/down row-parallel, as Megatron-style
serving lays them out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_AXIS = "model"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rope frequency scaling (``rope_scaling`` with ``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 1024
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    head_dim: int = 0  # 0: hidden_size // num_heads
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False  # the output projection is the embedding's transpose
    rope_scaling: RopeScaling | None = None
    sliding_window: int = 0  # 0: none; else a position attends to this many positions up to itself (Mistral)

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_hf(cls, config: dict) -> "LlamaConfig":
        """The config of a Hugging Face ``config.json`` of a ``LlamaForCausalLM``, ``MistralForCausalLM`` or
        ``Qwen2ForCausalLM``; a ``ValueError`` names any setting this model does not implement."""
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"from_pretrained: architecture {arch!r} is not supported "
                             f"(one of {sorted(ARCHITECTURES)})")
        # transformers 5 writes rope_parameters (theta included); 4.x rope_theta and rope_scaling.
        rope_config = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta = config.get("rope_theta", rope_config.get("rope_theta", 10000.0))
        kind = rope_config.get("rope_type", rope_config.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"from_pretrained: rope scaling type {kind!r} is not supported (llama3 or none)")
        rope = None
        if kind == "llama3":
            rope = RopeScaling(float(rope_config["factor"]), float(rope_config["low_freq_factor"]),
                               float(rope_config["high_freq_factor"]),
                               int(rope_config["original_max_position_embeddings"]))
        if config.get("mlp_bias", False):
            raise ValueError("from_pretrained: mlp_bias=True is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"from_pretrained: hidden_act {config['hidden_act']!r} is not supported (silu)")
        windowed = config.get("use_sliding_window", arch == "MistralForCausalLM")
        window = config.get("sliding_window") if windowed else None
        heads = int(config["num_attention_heads"])
        return cls(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                   intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
                   rope_theta=float(theta),
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), head_dim=int(config.get("head_dim") or 0),
                   attention_bias=bool(config.get("attention_bias", arch == "Qwen2ForCausalLM")),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), rope_scaling=rope,
                   sliding_window=int(window or 0))


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# Llama-3-8B's decoder layer (one of 32), for the layer benchmark.
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1,
                        num_heads=32, num_kv_heads=8, rope_theta=500000.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's keys and values, ``[B, S, num_kv_heads, head_dim]`` each, for positions ``0..S-1``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, length: int, dtype) -> "LayerCache":
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _linear(in_features, out_features, axes, tensor_parallel, dtype, rngs, use_bias=False):
    init = nnx.initializers.normal(in_features ** -0.5)
    bias_init = nnx.initializers.zeros_init()
    if tensor_parallel:
        init = nnx.with_partitioning(init, axes)
        bias_init = nnx.with_partitioning(bias_init, (axes[1],))
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=init, bias_init=bias_init, dtype=dtype,
                      param_dtype=dtype, rngs=rngs)


def _inverse_frequencies(config: LlamaConfig) -> jax.Array:
    half = config.head_dim // 2
    freq = config.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    r = config.rope_scaling
    if r is None:
        return freq
    # Llama 3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    wavelength = 2 * math.pi / freq
    context = r.original_max_position_embeddings
    low, high = context / r.low_freq_factor, context / r.high_freq_factor
    smooth = (context / wavelength - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    blended = (1 - smooth) * freq / r.factor + smooth * freq
    return jnp.where(wavelength < high, freq, jnp.where(wavelength > low, freq / r.factor, blended))


def _rope(x, positions, inverse_frequencies):
    half = x.shape[-1] // 2
    angle = positions[:, None].astype(jnp.float32) * inverse_frequencies[None, :]  # [T, half]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        col, row = (None, MODEL_AXIS), (MODEL_AXIS, None)
        self.config = config
        bias = config.attention_bias
        self.q_proj = _linear(h, config.num_heads * d, col, tensor_parallel, dtype, rngs, bias)
        self.k_proj = _linear(h, config.num_kv_heads * d, col, tensor_parallel, dtype, rngs, bias)
        self.v_proj = _linear(h, config.num_kv_heads * d, col, tensor_parallel, dtype, rngs, bias)
        self.o_proj = _linear(config.num_heads * d, h, row, tensor_parallel, dtype, rngs)
        self.qkv_proj = nnx.data(None)  # q/k/v as one layer after jaxq.nn.fuse_projections

    def __call__(self, x, cache: LayerCache | None = None, start=0):
        """``x [B, T, hidden]`` at positions ``start..start+T-1``. Without a cache, T positions attend to
        each other; with one, its positions ``start..start+T-1`` are overwritten by x's keys and values and x
        attends to the cache. Returns ``(out, cache)``."""
        c = self.config
        b, t, _ = x.shape
        positions = start + jnp.arange(t)
        inverse_frequencies = _inverse_frequencies(c)
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = _rope(q.reshape(b, t, c.num_heads, c.head_dim), positions, inverse_frequencies)
        k = _rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions, inverse_frequencies)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if cache is None:
            key_positions = positions
        else:
            at = (0, start, 0, 0)
            cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                               jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at))
            k, v, key_positions = cache.k.astype(x.dtype), cache.v.astype(x.dtype), jnp.arange(cache.k.shape[1])
        repeat = c.num_heads // c.num_kv_heads
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(c.head_dim)
        visible = key_positions[None, :] <= positions[:, None]
        if c.sliding_window:
            visible &= key_positions[None, :] > positions[:, None] - c.sliding_window
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.num_heads * c.head_dim)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        col, row = (None, MODEL_AXIS), (MODEL_AXIS, None)
        self.gate_proj = _linear(h, i, col, tensor_parallel, dtype, rngs)
        self.up_proj = _linear(h, i, col, tensor_parallel, dtype, rngs)
        self.down_proj = _linear(i, h, row, tensor_parallel, dtype, rngs)
        self.gate_up_proj = nnx.data(None)  # gate/up as one layer after jaxq.nn.fuse_projections

    def __call__(self, x):
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool = False, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs):
        kw = dict(tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
        norm = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, **kw)

    def __call__(self, x, cache: LayerCache | None = None, start=0):
        """``x`` after the layer; with a cache (see :class:`Attention`), ``(x, cache)``."""
        attended, new_cache = self.self_attn(self.input_layernorm(x), cache, start)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, new_cache)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=dtype,
                                rngs=rngs)

    def __call__(self, tokens, cache: list[LayerCache] | None = None, start=0):
        x = self.embed_tokens(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x)
            else:
                x, layer_cache = layer(x, cache[i], start)
                new_cache.append(layer_cache)
        x = self.norm(x)
        return x if cache is None else (x, new_cache)


class LlamaForCausalLM(nnx.Module):
    """``tokens [B, T]`` int32 -> logits ``[B, T, vocab]`` float32; with ``cache`` (one :class:`LayerCache`
    per layer) and ``start`` (the tokens' first position), ``(logits, cache)``."""

    def __init__(self, config: LlamaConfig = LlamaConfig(), *, tensor_parallel: bool = False, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs):
        self.config = config
        # Sharding metadata without a mesh: parameters are placed when a mesh is set (jit with its specs).
        eager = getattr(nnx, "use_eager_sharding", None)
        lazy = eager and tensor_parallel and jax.sharding.get_abstract_mesh().empty
        scope = eager(False) if lazy else contextlib.nullcontext()
        with scope:
            self.model = LlamaModel(config, tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
            self.lm_head = None if config.tie_word_embeddings else _linear(
                config.hidden_size, config.vocab_size, (None, MODEL_AXIS), tensor_parallel, dtype, rngs)

    def __call__(self, tokens, cache: list[LayerCache] | None = None, start=0):
        hidden = self.model(tokens, cache, start)
        if cache is not None:
            hidden, cache = hidden
        logits = (self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden))
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)

    def empty_cache(self, batch: int, length: int) -> list[LayerCache]:
        """A cache for ``length`` positions of ``batch`` sequences, in the embedding's dtype."""
        dtype = self.model.embed_tokens.embedding.get_value().dtype
        return [LayerCache.empty(self.config, batch, length, dtype) for _ in range(self.config.num_layers)]


def _choose(logits, key, temperature, top_p, sample: bool):
    """The next token of each row of ``logits [B, vocab]``: the most likely, or sampled at ``temperature`` from
    the smallest set of most likely tokens whose probabilities reach ``top_p``."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1) / temperature
    probs = jax.nn.softmax(ranked, axis=-1)
    ranked = jnp.where(jnp.cumsum(probs, axis=-1) - probs < top_p, ranked, -jnp.inf)  # the first always stays
    choice = jax.random.categorical(key, ranked, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"), donate_argnames=("cache",))
def _prefill(graphdef, state, prompt, cache, key, temperature, top_p, sample):
    logits, cache = nnx.merge(graphdef, state)(prompt, cache, 0)
    return _choose(logits[:, -1], key, temperature, top_p, sample), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"), donate_argnames=("cache",))
def _decode_step(graphdef, state, token, cache, position, key, temperature, top_p, sample):
    logits, cache = nnx.merge(graphdef, state)(token[:, None], cache, position)
    return _choose(logits[:, 0], key, temperature, top_p, sample), cache


def _generation_args(model, prompt, max_new_tokens, temperature, top_p, key):
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"generate: model must be a LlamaForCausalLM; got {type(model).__name__}")
    if not hasattr(prompt, "shape") or prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"generate: prompt must be an integer array [batch, length]; got "
                         f"{getattr(prompt, 'shape', type(prompt).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    graphdef, state = nnx.split(model)
    cache = model.empty_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    keys = jax.random.split(jax.random.key(0) if key is None else key, max_new_tokens)
    return graphdef, state, prompt.astype(jnp.int32), cache, keys, jnp.float32(max(temperature, 1e-6)), \
        jnp.float32(top_p), temperature > 0


def generate(model: LlamaForCausalLM, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, key: jax.Array | None = None, timings: dict | None = None) -> jax.Array:
    """Extends ``prompt [B, P]`` (int token ids) by ``max_new_tokens`` tokens with a KV cache of
    ``P + max_new_tokens`` positions: one jitted prefill over the prompt (its projections run at M = B * P),
    then one jitted decode step per token (M = B, where the fused weight-only kernels run). Greedy when
    ``temperature`` is 0, else sampled at that temperature from the top-``top_p`` probability mass with
    ``key``. Both programs are compiled once per model structure and shape.

    Returns ``[B, P + max_new_tokens]`` int32. ``timings``, when given, receives ``prefill_s`` and
    ``decode_s``: seconds of the prefill and of all decode steps (the device synchronised after each)."""
    graphdef, state, prompt, cache, keys, temperature, top_p, sample = _generation_args(
        model, prompt, max_new_tokens, temperature, top_p, key)
    start = time.perf_counter()
    token, cache = _prefill(graphdef, state, prompt, cache, keys[0], temperature, top_p, sample)
    if timings is not None:
        jax.block_until_ready(token)
        timings["prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
    tokens = [token]
    for i in range(1, max_new_tokens):
        position = jnp.int32(prompt.shape[1] + i - 1)
        token, cache = _decode_step(graphdef, state, token, cache, position, keys[i], temperature, top_p, sample)
        tokens.append(token)
    out = jnp.concatenate([prompt, jnp.stack(tokens, axis=1)], axis=1)
    if timings is not None:
        jax.block_until_ready(out)
        timings["decode_s"] = time.perf_counter() - start
    return out


def generation_hlo(model: LlamaForCausalLM, prompt: jax.Array, max_new_tokens: int) -> dict[str, str]:
    """The lowered text (StableHLO) of :func:`generate`'s two programs for these shapes, ``{"prefill": ...,
    "decode": ...}``: what each phase runs (e.g. which jaxq custom calls)."""
    graphdef, state, prompt, cache, keys, temperature, top_p, sample = _generation_args(
        model, prompt, max_new_tokens, 0.0, 1.0, None)
    token = jnp.zeros((prompt.shape[0],), jnp.int32)
    return {"prefill": _prefill.lower(graphdef, state, prompt, cache, keys[0], temperature, top_p, sample).as_text(),
            "decode": _decode_step.lower(graphdef, state, token, cache, jnp.int32(0), keys[0], temperature, top_p,
                                         sample).as_text()}
