"""A Llama-style decoder in Flax NNX: the model the demo, the tests and the layer benchmark quantize.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``, ...), so
checkpoint tensor names read the same. Attention is causal over the whole sequence (no KV cache).
With ``tensor_parallel=True`` the projections carry sharding metadata for a ``"model"`` mesh axis:
q/k/v/gate/up column-parallel, o/down row-parallel, as Megatron-style serving lays them out.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_AXIS = "model"


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Llama-3-8B's decoder layer (one of 32), for the layer benchmark.
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1,
                        num_heads=32, num_kv_heads=8, rope_theta=500000.0)


def _linear(in_features, out_features, axes, tensor_parallel, dtype, rngs):
    init = nnx.initializers.normal(in_features ** -0.5)
    if tensor_parallel:
        init = nnx.with_partitioning(init, axes)
    return nnx.Linear(in_features, out_features, use_bias=False, kernel_init=init, dtype=dtype, param_dtype=dtype,
                      rngs=rngs)


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, half]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        col, row = (None, MODEL_AXIS), (MODEL_AXIS, None)
        self.config = config
        self.q_proj = _linear(h, config.num_heads * d, col, tensor_parallel, dtype, rngs)
        self.k_proj = _linear(h, config.num_kv_heads * d, col, tensor_parallel, dtype, rngs)
        self.v_proj = _linear(h, config.num_kv_heads * d, col, tensor_parallel, dtype, rngs)
        self.o_proj = _linear(config.num_heads * d, h, row, tensor_parallel, dtype, rngs)

    def __call__(self, x):
        c = self.config
        b, t, _ = x.shape
        positions = jnp.arange(t)
        q = _rope(self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = _rope(self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        repeat = c.num_heads // c.num_kv_heads
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(c.head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.num_heads * c.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        col, row = (None, MODEL_AXIS), (MODEL_AXIS, None)
        self.gate_proj = _linear(h, i, col, tensor_parallel, dtype, rngs)
        self.up_proj = _linear(h, i, col, tensor_parallel, dtype, rngs)
        self.down_proj = _linear(i, h, row, tensor_parallel, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool = False, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs):
        kw = dict(tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
        norm = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = nnx.RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, tensor_parallel: bool, dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=dtype,
                                rngs=rngs)

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """``tokens [B, T]`` int32 -> logits ``[B, T, vocab]`` float32."""

    def __init__(self, config: LlamaConfig = LlamaConfig(), *, tensor_parallel: bool = False, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs):
        self.config = config
        # Sharding metadata without a mesh: parameters are placed when a mesh is set (jit with its specs).
        eager = getattr(nnx, "use_eager_sharding", None)
        scope = eager(False) if eager and tensor_parallel and jax.sharding.get_abstract_mesh().empty else contextlib.nullcontext()
        with scope:
            self.model = LlamaModel(config, tensor_parallel=tensor_parallel, dtype=dtype, rngs=rngs)
            self.lm_head = _linear(config.hidden_size, config.vocab_size, (None, MODEL_AXIS), tensor_parallel, dtype,
                                   rngs)

    def __call__(self, tokens):
        return self.lm_head(self.model(tokens)).astype(jnp.float32)


def greedy_decode(model: LlamaForCausalLM, prompt: jax.Array, new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Extends ``prompt [B, P]`` by ``new_tokens`` greedy tokens. Each step runs the model over a fixed-length
    buffer (one compiled program, no KV cache).

    Returns ``(tokens [B, P + new_tokens], logits [B, P, vocab])``: the logits of the prompt positions, as
    the first step computed them (causal: later tokens do not change them)."""
    b, p = prompt.shape
    buffer = jnp.zeros((b, p + new_tokens), jnp.int32).at[:, :p].set(prompt)
    logits = jnp.zeros((b, p, model.config.vocab_size), jnp.float32)

    def step(t, carry):
        buffer, prompt_logits = carry
        logits = model(buffer)  # positions >= t do not affect position t - 1
        prompt_logits = jnp.where(t == p, logits[:, :p], prompt_logits)
        return buffer.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)), prompt_logits

    return jax.lax.fori_loop(p, p + new_tokens, step, (buffer, logits))
