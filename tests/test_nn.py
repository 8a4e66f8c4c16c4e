"""jaxq.nn on the CPU: quantized NNX layers against a NumPy oracle and the float layer, quantize(),
checkpoints (round trip and files written here from the formats' definitions), tensor parallelism on 8
virtual devices, gradients (LoRA, activations, frozen weights) and jax.export."""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jaxq
import jaxq.nn as qnn
import oracle
from jaxq.nn.checkpoint import read_safetensors
from jaxq.nn.llama import MODEL_AXIS, LlamaConfig, LlamaForCausalLM, generate

K, N = 256, 128
TINY = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=4)
ACT_ORDER = np.random.default_rng(7).permutation(K)

# name -> (layer class, from_linear options, scheme error bound: relative L2 error of the output against the
# float layer, from the format's step size: 4-bit RTN over groups of ~N(0, 1/K) weights ~0.1, 3-bit ~0.2,
# 8-bit weights ~0.01; e4m3's 3-bit mantissa on weights and activations ~0.04)
LAYERS = {
    "awq": (qnn.AWQLinear, {}, 0.15),
    "gptq4": (qnn.GPTQLinear, {}, 0.15),
    "gptq3_act_order": (qnn.GPTQLinear, dict(bits=3, act_order=ACT_ORDER), 0.3),
    "gptq8_v2_g64": (qnn.GPTQLinear, dict(bits=8, v2_format=True, group_size=64), 0.02),
    "gptq2_asym": (qnn.GPTQLinear, dict(bits=2, symmetric=False, group_size=64), 0.7),
    "fp8": (qnn.Fp8Linear, {}, 0.06),
    "fp8_block": (qnn.Fp8Linear, dict(block=True), 0.06),
    "int8": (qnn.Int8Linear, {}, 0.02),
    "int8_azp": (qnn.Int8Linear, dict(azp=True), 0.02),
    "awq_marlin": (qnn.AWQLinear, dict(backend="marlin"), 0.15),
    "gptq4_marlin_act_order": (qnn.GPTQLinear, dict(backend="marlin", act_order=ACT_ORDER), 0.15),
    "gptq8_marlin_g64": (qnn.GPTQLinear, dict(bits=8, group_size=64, backend="marlin"), 0.02),
    "fp8_weight_only": (qnn.Fp8Linear, dict(weight_only=True), 0.06),
    "fp8_block_weight_only": (qnn.Fp8Linear, dict(block=True, weight_only=True), 0.06),
    "nvfp4": (qnn.NVFP4Linear, {}, 0.15),
}


def _linear(k=K, n=N, seed=0, bias=True):
    return nnx.Linear(k, n, use_bias=bias, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      bias_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(seed))


def _x(shape, seed=1, dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer(name, seed=0, bias=True):
    cls, options, _ = LAYERS[name]
    return cls.from_linear(_linear(seed=seed, bias=bias), **options)


def _np(v):
    return np.asarray(v[...] if hasattr(v, "get_metadata") else v)


# e2m1 magnitudes of codes 0-7 (bit 3 is the sign), from the OCP microscaling spec's FP4 table.
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def nvfp4_weight(layer) -> np.ndarray:
    """W ``[out, in]`` of an NVFP4 layer from its checkpoint tensors (Marlin's layout is tested in test_marlin):
    e2m1 code x fp8 block scale / global scale."""
    tensors = {name: np.asarray(value) for name, value in layer.checkpoint_tensors().items()}
    packed = tensors.get("weight_packed", tensors.get("weight"))
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    values = E2M1[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    scale = tensors["weight_scale"].astype(np.float32)
    global_scale = (tensors["weight_global_scale"][0] if "weight_global_scale" in tensors
                    else np.float32(1) / tensors["weight_scale_2"])
    return values * np.repeat(scale, 16, axis=1) / np.float32(global_scale)


def oracle_output(layer, x) -> np.ndarray:
    """What the layer must compute, in NumPy from its stored tensors and the spec of each scheme."""
    xf = np.asarray(x, np.float32)
    bias = None if layer.bias is None else _np(layer.bias).astype(np.float32)
    if isinstance(layer, qnn.AWQLinear):
        ckpt = {k: np.asarray(v) for k, v in layer.checkpoint_tensors().items()}
        w = oracle.awq_dequantize(ckpt["qweight"], ckpt["scales"], ckpt["qzeros"])
        out = xf @ w.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif isinstance(layer, qnn.GPTQLinear):
        ckpt = {k: np.asarray(v) for k, v in layer.checkpoint_tensors().items()}
        w = oracle.gptq_dequantize(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"], ckpt["g_idx"], layer.bits,
                                   layer.v2_format)
        out = xf @ w.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif isinstance(layer, qnn.Fp8Linear) and layer.weight_only:  # scales rounded to the layer's dtype, as vLLM
        ckpt = {k: np.asarray(v, np.float32) for k, v in layer.checkpoint_tensors().items()}
        scale = (np.repeat(np.repeat(ckpt["weight_scale_inv"], 128, 0)[:layer.out_features], 128, 1)
                 if layer.block else ckpt["weight_scale"])
        w = ckpt["weight"] * scale.astype(ml_dtypes.bfloat16).astype(np.float32)
        out = xf @ w.T.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif isinstance(layer, qnn.Fp8Linear):
        group = 128 if layer.block else layer.in_features
        q, s = oracle.group_quant(xf, group, 1e-10, False, False)
        scale_b = (_np(layer.weight_scale_inv).T if layer.block else _np(layer.weight_scale).T)
        out = oracle.scaled_mm(q.view(ml_dtypes.float8_e4m3fn), _np(layer.weight).T, s, scale_b, block=layer.block)
    elif isinstance(layer, qnn.NVFP4Linear):
        w = nvfp4_weight(layer)
        out = xf @ w.T.astype(ml_dtypes.bfloat16).astype(np.float32)
    else:
        if layer.azp:
            lo, hi = np.minimum(xf.min(1, keepdims=True), 0), np.maximum(xf.max(1, keepdims=True), 0)
            s = np.maximum(hi - lo, 1e-10) / 255
            azp = np.round(-128 - lo / s)
            q = np.clip(np.round(xf / s) + azp, -128, 127).astype(np.int8)
            w = _np(layer.weight)
            out = oracle.scaled_mm(q, w.T, s, _np(layer.weight_scale).T,
                                   azp_adj=w.astype(np.int64).sum(1), azp=azp[:, 0].astype(np.int64))
        else:
            s = np.maximum(np.abs(xf).max(1, keepdims=True), 1e-10) / 127
            q = np.clip(np.round(xf / s), -128, 127).astype(np.int8)
            out = oracle.scaled_mm(q, _np(layer.weight).T, s, _np(layer.weight_scale).T)
    return out if bias is None else out + bias


# ------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_oracle_and_float_layer(name):
    linear = _linear()
    layer = _layer(name)
    x = _x((3, 5, K))
    y = jax.jit(lambda x: layer(x))(x)
    assert (layer.in_features, layer.out_features, layer.use_bias) == (K, N, True)
    assert y.shape == (3, 5, N) and y.dtype == jnp.bfloat16
    want = oracle_output(layer, x.reshape(-1, K)).reshape(3, 5, N)
    assert _rel(y, want) < 5e-3  # bf16 rounding of the output (and of the dequantized weight)
    assert _rel(y, linear(x)) < LAYERS[name][2]


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_returns_the_dtype_of_the_linear_it_replaces_and_takes_m1(name):
    """nnx.Linear's rule: its dtype whatever the input's; without one, the input promoted with param_dtype.
    A layer built directly keeps the input's dtype."""
    cls, options, _ = LAYERS[name]
    typed = _linear(bias=False)  # dtype=bfloat16
    untyped = nnx.Linear(K, N, use_bias=False, rngs=nnx.Rngs(0))  # dtype None, float32 parameters
    layer, promoted = cls.from_linear(typed, **options), cls.from_linear(untyped, **options)
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        x = _x((1, K), dtype=dtype)
        y = layer(x)
        assert y.dtype == typed(x).dtype == jnp.bfloat16 and y.shape == (1, N)
        assert promoted(x).dtype == untyped(x).dtype
    direct = qnn.Int8Linear(K, N, use_bias=False)
    assert direct(_x((1, K), dtype=jnp.float16)).dtype == jnp.float16
    layer = _layer(name, bias=False)
    assert layer.bias is None
    x = _x((1, K))
    assert _rel(layer(x), oracle_output(layer, x)) < 5e-3


def test_layer_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_size"):
        qnn.AWQLinear(K, N, group_size=96)
    with pytest.raises(ValueError, match="out_features"):
        qnn.AWQLinear(K, 100)
    with pytest.raises(ValueError, match="bits"):
        qnn.GPTQLinear(K, N, bits=5)
    with pytest.raises(ValueError, match="in_features"):
        qnn.Fp8Linear(200, N, block=True)
    with pytest.raises(TypeError, match="dtype"):
        qnn.Int8Linear(K, N, dtype=jnp.float32)
    with pytest.raises(ValueError, match="kernel_axes"):
        qnn.Int8Linear(K, N, kernel_axes=("a",))
    layer = _layer("awq")
    with pytest.raises(ValueError, match="in_features=256"):
        layer(_x((2, 128)))
    with pytest.raises(TypeError, match="float"):
        layer(jnp.ones((2, K), jnp.int32))
    with pytest.raises(ValueError, match="qweight.*shape"):
        layer.assign("qweight", jnp.zeros((K, 8), jnp.int32))
    with pytest.raises(TypeError, match="qzeros.*int32"):
        layer.assign("qzeros", jnp.zeros((2, 16), jnp.float32))
    with pytest.raises(TypeError, match="nnx.Linear"):
        qnn.AWQLinear.from_linear(nnx.Embed(4, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="permutation"):
        qnn.GPTQLinear.from_linear(_linear(), act_order=np.zeros(K, int))
    with pytest.raises(ValueError, match="backend"):
        qnn.AWQLinear(K, N, backend="exllama")
    with pytest.raises(ValueError, match="out_features a multiple of 64"):
        qnn.AWQLinear(K, 96, backend="marlin")
    with pytest.raises(ValueError, match="group sizes"):
        qnn.GPTQLinear(384, N, group_size=96, backend="marlin")
    with pytest.raises(ValueError, match="symmetric 4- and 8-bit"):
        qnn.GPTQLinear(K, N, bits=3, backend="marlin")
    with pytest.raises(ValueError, match="symmetric 4- and 8-bit"):
        qnn.GPTQLinear(K, N, symmetric=False, backend="marlin")
    with pytest.raises(ValueError, match="out_features a multiple of 64"):
        qnn.Fp8Linear(K, 96, weight_only=True)
    marlin_layer = qnn.GPTQLinear(K, N, backend="marlin")
    with pytest.raises(ValueError, match="symmetric 4- and 8-bit"):
        marlin_layer.configure_storage(act_order=False, v2_format=False, symmetric=False)
    asym = qnn.GPTQLinear.from_linear(_linear(), symmetric=False).checkpoint_tensors()
    with pytest.raises(ValueError, match="qzeros.*symmetric constant"):
        marlin_layer.set_checkpoint_tensors(asym["qweight"], asym["qzeros"], asym["scales"], asym["g_idx"])


# ------------------------------------------------------------------------------------------ quantize


def test_quantize_replaces_only_the_selected_linears():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    attn, norm, embed = model.model.layers[0].self_attn, model.model.norm, model.model.embed_tokens
    replaced = qnn.quantize(model, "int8", filter=r"mlp\.")
    assert sorted(replaced) == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    mlp = model.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, p), qnn.Int8Linear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert type(attn.q_proj) is nnx.Linear and type(model.lm_head) is nnx.Linear
    assert model.model.layers[0].self_attn is attn and model.model.norm is norm and model.model.embed_tokens is embed
    assert qnn.quantize(model, "awq", filter=lambda path, m: path.endswith("lm_head")) == ["lm_head"]
    assert isinstance(model.lm_head, qnn.AWQLinear)
    with pytest.raises(ValueError, match="scheme"):
        qnn.quantize(model, "int4")
    with pytest.raises(ValueError, match="block"):
        qnn.quantize(model, "fp8", block=True)
    with pytest.raises(TypeError, match="filter"):
        qnn.quantize(model, "fp8", filter=3)


@pytest.mark.parametrize("scheme", list(qnn.SCHEMES))
def test_quantized_model_runs_under_jit_and_decodes(scheme):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size, jnp.int32)
    reference = model(tokens)
    assert len(qnn.quantize(model, scheme)) == 8
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    assert _rel(logits, reference) < 0.5
    generated = generate(model, tokens, 4)
    assert generated.shape == (2, 12) and np.array_equal(generated[:, :8], tokens)
    # The cached decode picks what the whole-sequence forward of the same model picks.
    sequence = tokens
    for _ in range(4):
        step = jnp.argmax(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, sequence)[:, -1], -1)
        sequence = jnp.concatenate([sequence, step[:, None].astype(jnp.int32)], axis=1)
    np.testing.assert_array_equal(generated, sequence)


# --------------------------------------------------------------------------------------- checkpoints


def _variables(model):
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)}


SAVE_CASES = {
    "awq": ("awq", {}),
    "gptq3_act_order": ("gptq", dict(bits=3, act_order=ACT_ORDER)),
    "gptq8_v2_g64": ("gptq", dict(bits=8, v2_format=True, group_size=64)),
    "gptq4_compressed_tensors_asym": ("gptq", dict(checkpoint_format="compressed-tensors", v2_format=True,
                                                   symmetric=False)),
    "gptq8_compressed_tensors_act_order": ("gptq", dict(bits=8, group_size=64, act_order=ACT_ORDER, v2_format=True,
                                                        checkpoint_format="compressed-tensors")),
    "fp8": ("fp8", {}),
    "fp8_block": ("fp8-block", {}),
    "int8_azp": ("int8-azp", {}),
    "awq_marlin": ("awq", dict(backend="marlin")),
    "fp8_weight_only": ("fp8-weight", {}),
    "fp8_block_weight_only": ("fp8-block", dict(weight_only=True)),
    "gptq4_marlin_act_order": ("gptq", dict(backend="marlin", act_order=ACT_ORDER)),
    "nvfp4": ("nvfp4", {}),
    "nvfp4_modelopt": ("nvfp4", dict(checkpoint_format="modelopt")),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_then_load_is_bit_exact(tmp_path, case):
    scheme, options = SAVE_CASES[case]
    selected = r"mlp\.(gate|up)_proj"  # the rest stays float and is saved and loaded as such
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    qnn.quantize(model, scheme, filter=selected, **options)
    path = tmp_path / "ckpt"
    qnn.save_quantized(model, str(path))
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config == {**qnn.quantization_config(model.model.layers[0].mlp.up_proj), **config}

    fresh = LlamaForCausalLM(TINY, rngs=nnx.Rngs(5))  # other weights everywhere
    qnn.quantize(fresh, scheme, filter=selected, **options)
    qnn.load_quantized(fresh, str(path))
    want, got = _variables(model), _variables(fresh)
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and np.array_equal(want[key].view(np.uint8), got[key].view(np.uint8)), key
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(fresh(tokens), model(tokens))


def _write(tmp_path, tensors, config, config_file="config.json"):
    """A checkpoint directory: tensors in model.safetensors, and ``config`` in Hugging Face's config.json
    (as its quantization_config) or as a file of its own (AutoGPTQ's quantize_config.json, AutoAWQ's
    quant_config.json)."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    content = {"quantization_config": config} if config_file == "config.json" else config
    (tmp_path / config_file).write_text(json.dumps(content))
    return str(tmp_path)


def _single_layer_model(layer):
    class Wrapper(nnx.Module):
        def __init__(self):
            self.proj = layer

    return Wrapper()


def test_load_autoawq_written_from_the_format(tmp_path):
    rng = np.random.default_rng(0)
    q, z = rng.integers(0, 16, (K, N)), rng.integers(0, 16, (K // 128, N))
    scales = (rng.random((K // 128, N)) * 0.02 + 0.001).astype(ml_dtypes.bfloat16)
    # AutoAWQ's own quant_config.json, as older AutoAWQ checkpoints carry it
    path = _write(tmp_path, {"proj.qweight": oracle.awq_pack(q), "proj.qzeros": oracle.awq_pack(z),
                             "proj.scales": scales},
                  {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                  config_file="quant_config.json")
    model = qnn.load_quantized(_single_layer_model(qnn.AWQLinear(K, N, use_bias=False)), path)
    w = (q - np.repeat(z, 128, 0)) * np.repeat(scales.astype(np.float32), 128, 0)
    x = _x((5, K))
    assert _rel(model.proj(x), np.asarray(x, np.float32) @ w) < 5e-3


@pytest.mark.parametrize("bits,desc_act,fmt", [(4, True, "gptq"), (3, False, "gptq_v2"), (8, True, "gptq")])
def test_load_autogptq_written_from_the_format(tmp_path, bits, desc_act, fmt):
    rng = np.random.default_rng(bits)
    g = 64
    q = rng.integers(0, 1 << bits, (K, N))
    zeros = rng.integers(1, 1 << bits, (K // g, N))
    stored = zeros if fmt == "gptq_v2" else zeros - 1
    g_idx = (np.argsort(rng.permutation(K)) // g if desc_act else np.arange(K) // g).astype(np.int32)
    scales = (rng.random((K // g, N)) * 0.02 + 0.001).astype(np.float16)
    bias = rng.standard_normal(N).astype(np.float16)
    path = _write(tmp_path, {"proj.qweight": oracle.bitstream_pack(q, bits, 0),
                             "proj.qzeros": oracle.bitstream_pack(stored, bits, 1),
                             "proj.scales": scales, "proj.g_idx": g_idx, "proj.bias": bias},
                  {"bits": bits, "group_size": g, "desc_act": desc_act, "sym": False, "checkpoint_format": fmt,
                   **({} if bits == 8 else {"quant_method": "gptq"})},
                  config_file="quantize_config.json" if bits == 8 else "config.json")  # AutoGPTQ's own file too
    layer = qnn.GPTQLinear(K, N, bits=bits, group_size=g, dtype=jnp.float16)
    qnn.load_quantized(_single_layer_model(layer), path)
    assert (layer.act_order, layer.v2_format, layer.symmetric) == (desc_act, fmt == "gptq_v2", False)
    w = (q - zeros[g_idx]) * scales.astype(np.float32)[g_idx]
    x = _x((3, K), dtype=jnp.float16)
    assert _rel(layer(x), np.asarray(x, np.float32) @ w + bias.astype(np.float32)) < 5e-3


@pytest.mark.parametrize("bits,desc_act", [(4, True), (8, False)])
def test_load_symmetric_autogptq_into_marlin_layer(tmp_path, bits, desc_act):
    """A symmetric AutoGPTQ file (v1 zeros: 2**(bits-1) - 1) read into backend="marlin", and saved back as it was."""
    rng = np.random.default_rng(bits)
    g = 64
    q = rng.integers(0, 1 << bits, (K, N))
    stored = np.full((K // g, N), (1 << (bits - 1)) - 1)
    g_idx = (np.argsort(rng.permutation(K)) // g if desc_act else np.arange(K) // g).astype(np.int32)
    scales = (rng.random((K // g, N)) * 0.02 + 0.001).astype(np.float16)
    tensors = {"proj.qweight": oracle.bitstream_pack(q, bits, 0), "proj.qzeros": oracle.bitstream_pack(stored, bits, 1),
               "proj.scales": scales, "proj.g_idx": g_idx}
    path = _write(tmp_path, tensors, {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": desc_act,
                                      "sym": True})
    layer = qnn.GPTQLinear(K, N, bits=bits, group_size=g, dtype=jnp.float16, use_bias=False, backend="marlin")
    model = qnn.load_quantized(_single_layer_model(layer), path)
    assert layer.qweight.shape == (K // 16, N * bits // 2) and not hasattr(layer, "qzeros")
    w = (q - (1 << (bits - 1))) * scales.astype(np.float32)[g_idx]
    x = _x((3, K), dtype=jnp.float16)
    assert _rel(layer(x), np.asarray(x, np.float32) @ w) < 5e-3
    saved = qnn.save_quantized(model, str(tmp_path / "saved"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(read_safetensors(saved)[name], value)


def test_act_order_gptq_runs_without_act_order_where_its_groups_are_whole(monkeypatch):
    """GPTQ's act-order g_idx (groups of group_size rows once sorted) runs marlin_gemm without act-order on the
    permuted activations, bit for bit what the act-order form gives; a g_idx of uneven groups keeps the act-order
    form (and the oracle's result), and backend="kernel" (exllama's layout) refuses it."""
    from jaxq.ops import marlin

    rng = np.random.default_rng(21)
    g = 64
    q = rng.integers(0, 16, (K, N))
    scales = jnp.asarray(rng.random((K // g, N)) * 0.02 + 0.001, jnp.bfloat16)
    qweight = jnp.asarray(oracle.bitstream_pack(q, 4, 0))
    qzeros = jnp.asarray(oracle.bitstream_pack(np.full((K // g, N), 7), 4, 1))
    x = _x((3, K))
    calls = []
    gemm = marlin._marlin_gemm
    monkeypatch.setattr(marlin, "_marlin_gemm", lambda *a, **params: calls.append(params) or gemm(*a, **params))
    whole = (np.argsort(rng.permutation(K)) // g).astype(np.int32)
    uneven = np.sort(rng.integers(0, K // g, K)).astype(np.int32)[rng.permutation(K)]
    assert len(set(np.bincount(uneven))) > 1
    for g_idx, contiguous in ((whole, True), (uneven, False)):
        layer = qnn.GPTQLinear(K, N, group_size=g, act_order=True, use_bias=False, backend="marlin")
        layer.set_checkpoint_tensors(qweight, qzeros, scales, jnp.asarray(g_idx))
        assert layer.contiguous_groups == contiguous
        calls.clear()
        got = layer(x)
        assert [params["has_g_idx"] for params in calls] == [not contiguous]
        w = (q - 8) * np.asarray(scales, np.float32)[g_idx]
        assert _rel(got, np.asarray(x, np.float32) @ w) < 1e-2
        if contiguous:
            layer.contiguous_groups = False  # the act-order form
            np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(got))
        kernel_layer = qnn.GPTQLinear(K, N, group_size=g, act_order=True, use_bias=False)
        if contiguous:
            kernel_layer.set_checkpoint_tensors(qweight, qzeros, scales, jnp.asarray(g_idx))
            assert _rel(kernel_layer(x), np.asarray(x, np.float32) @ w) < 1e-2
        else:
            with pytest.raises(ValueError, match=r"g_idx: act-order group \d+ has \d+ rows, not group_size=64"):
                kernel_layer.set_checkpoint_tensors(qweight, qzeros, scales, jnp.asarray(g_idx))


@pytest.mark.parametrize("symmetric,strategy,actorder", [(True, "group", None), (False, "group", "weight"),
                                                         (True, "channel", "static")])
def test_load_compressed_tensors_pack_quantized_written_from_the_format(tmp_path, symmetric, strategy, actorder):
    """actorder "weight" / "static" (compressed-tensors 0.20's only kind) store no g_idx: read as none."""
    rng = np.random.default_rng(11)
    g = K if strategy == "channel" else 64
    signed = rng.integers(-8, 8, (N, K))
    zero = np.zeros((N, K // g), np.int64) if symmetric else rng.integers(-3, 4, (N, K // g))
    scales = (rng.random((N, K // g)) * 0.02 + 0.001).astype(ml_dtypes.bfloat16)
    tensors = {"proj.weight_packed": oracle.bitstream_pack(signed + 8, 4, axis=1), "proj.weight_scale": scales,
               "proj.weight_shape": np.array([N, K], np.int64)}
    if not symmetric:
        tensors["proj.weight_zero_point"] = oracle.bitstream_pack(zero + 8, 4, axis=0)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": g if strategy == "group" else None, "actorder": actorder}
    assert not qnn.checkpoint.stores_group_index(weights) and qnn.checkpoint.stores_group_index({"actorder": "dynamic"})
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}
    layer = qnn.GPTQLinear(K, N, group_size=g, v2_format=True, use_bias=False, checkpoint_format="compressed-tensors")
    qnn.load_quantized(_single_layer_model(layer), _write(tmp_path, tensors, config))
    w = ((signed - np.repeat(zero, g, axis=1)) * np.repeat(scales.astype(np.float32), g, axis=1)).T  # [K, N]
    x = _x((3, K))
    assert _rel(layer(x), np.asarray(x, np.float32) @ w) < 5e-3
    with pytest.raises(ValueError, match="v2_format"):
        qnn.GPTQLinear(K, N, checkpoint_format="compressed-tensors")


def test_load_fp8_block_and_compressed_tensors_written_from_the_format(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, K)) * 0.05
    codes = oracle.e4m3_encode(w / 0.001)  # one scale for simplicity: the loader does not care
    scale_inv = np.full((N // 128, K // 128), 0.001, np.float32)
    path = _write(tmp_path, {"proj.weight": codes.view(ml_dtypes.float8_e4m3fn), "proj.weight_scale_inv": scale_inv},
                  {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]})
    layer = qnn.Fp8Linear(K, N, block=True, use_bias=False)
    qnn.load_quantized(_single_layer_model(layer), path)
    assert np.array_equal(_np(layer.weight).view(np.uint8), codes)
    x = _x((4, K))
    assert _rel(layer(x), oracle_output(layer, x)) < 5e-3

    int8 = rng.integers(-127, 128, (N, K)).astype(np.int8)
    scale = (rng.random((N, 1)) * 0.01).astype(np.float32)
    ct = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True,
                              "symmetric": False}}}}
    (tmp_path / "ct").mkdir()
    path = _write(tmp_path / "ct", {"proj.weight": int8, "proj.weight_scale": scale}, ct)
    layer = qnn.Int8Linear(K, N, azp=True, use_bias=False)
    qnn.load_quantized(_single_layer_model(layer), path)
    np.testing.assert_array_equal(_np(layer.azp_adj), int8.astype(np.int64).sum(1))
    assert _rel(layer(x), oracle_output(layer, x)) < 5e-3
    symmetric = qnn.Int8Linear(K, N, azp=False, use_bias=False)
    with pytest.raises(ValueError, match="input_activations.symmetric"):
        qnn.load_quantized(_single_layer_model(symmetric), path)


def test_load_fp8_weight_only_written_from_the_format(tmp_path):
    """compressed-tensors FP8 W8A16 (per-channel weights, no input_activations) and a block-wise fp8 file, both
    into weight-only layers: the codes land in the Marlin layout and the file comes back unchanged."""
    rng = np.random.default_rng(4)
    codes = oracle.e4m3_encode(rng.standard_normal((N, K)) * 50).view(ml_dtypes.float8_e4m3fn)
    scale = (rng.random((N, 1)) * 0.01 + 1e-3).astype(np.float32)
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                           "dynamic": False}, "input_activations": None}}}
    block = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    scale_inv = (rng.random((N // 128, K // 128)) * 0.01 + 1e-3).astype(np.float32)
    for name, tensors, config, options in (("ct", {"proj.weight": codes, "proj.weight_scale": scale}, ct, {}),
                                           ("block", {"proj.weight": codes, "proj.weight_scale_inv": scale_inv}, block,
                                            dict(block=True))):
        (tmp_path / name).mkdir()
        path = _write(tmp_path / name, tensors, config)
        layer = qnn.Fp8Linear(K, N, weight_only=True, use_bias=False, **options)
        model = qnn.load_quantized(_single_layer_model(layer), path)
        assert layer.weight.shape == (K // 16, 4 * N)
        x = _x((4, K))
        assert _rel(layer(x), oracle_output(layer, x)) < 5e-3
        saved = read_safetensors(qnn.save_quantized(model, str(tmp_path / name / "saved")))
        for key, value in tensors.items():
            np.testing.assert_array_equal(saved[key].view(np.uint8), value.view(np.uint8))


def test_load_casts_float_scales_and_checks_g_idx(tmp_path):
    """AutoGPTQ writes float16 scales, compressed-tensors bf16 ones for bf16 layers: a bfloat16 model loads them
    (cast, as vLLM does); integer/float mix-ups and g_idx entries outside the groups stay errors naming the
    tensor."""
    rng = np.random.default_rng(6)
    q = rng.integers(0, 16, (K, N))
    scales = (rng.random((K // 128, N)) * 0.02 + 0.001).astype(np.float16)
    g_idx = (np.arange(K) // 128).astype(np.int32)
    tensors = {"proj.qweight": oracle.bitstream_pack(q, 4, 0),
               "proj.qzeros": oracle.bitstream_pack(np.full((K // 128, N), 7), 4, 1), "proj.scales": scales,
               "proj.g_idx": g_idx}
    config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    for backend in ("kernel", "marlin"):
        layer = qnn.GPTQLinear(K, N, use_bias=False, backend=backend)  # bfloat16
        qnn.load_quantized(_single_layer_model(layer), _write(tmp_path, tensors, config))
        x = _x((2, K))
        w = (q - 8) * scales.astype(ml_dtypes.bfloat16).astype(np.float32)[g_idx]
        assert _rel(layer(x), np.asarray(x, np.float32) @ w) < 5e-3
    for bad in (K // 128, -1):
        corrupt = {**tensors, "proj.g_idx": g_idx.copy()}
        corrupt["proj.g_idx"][5] = bad
        with pytest.raises(ValueError, match=r"proj\.g_idx: entries must be groups in \[0, 2\); row 5"):
            qnn.load_quantized(_single_layer_model(qnn.GPTQLinear(K, N, use_bias=False)), _write(tmp_path, corrupt, config))
    with pytest.raises(TypeError, match=r"proj\.qzeros: expected dtype int32"):
        qnn.load_quantized(_single_layer_model(qnn.GPTQLinear(K, N, use_bias=False)),
                           _write(tmp_path, {**tensors, "proj.qzeros": np.zeros((K // 128, N // 8), np.float32)}, config))
    codes = oracle.e4m3_encode(rng.standard_normal((N, K)) * 50).view(ml_dtypes.float8_e4m3fn)
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    bf16_scale = (rng.random((N, 1)) * 0.01 + 1e-3).astype(ml_dtypes.bfloat16)
    layer = qnn.Fp8Linear(K, N, use_bias=False)
    qnn.load_quantized(_single_layer_model(layer), _write(tmp_path, {"proj.weight": codes, "proj.weight_scale": bf16_scale}, ct))
    np.testing.assert_array_equal(_np(layer.weight_scale), bf16_scale.astype(np.float32))


def test_load_errors_name_the_tensor(tmp_path):
    rng = np.random.default_rng(0)
    config = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    good = {"proj.qweight": oracle.awq_pack(rng.integers(0, 16, (K, N))),
            "proj.qzeros": oracle.awq_pack(rng.integers(0, 16, (2, N))),
            "proj.scales": np.ones((2, N), ml_dtypes.bfloat16)}
    cases = [
        ({k: v for k, v in good.items() if k != "proj.qzeros"}, config, KeyError, "proj.qzeros"),
        (good, {**config, "bits": 8}, ValueError, "bits"),
        ({**good, "proj.scales": np.ones((2, N), np.int32)}, config, TypeError, "proj.scales.*bfloat16"),
        ({**good, "proj.qweight": good["proj.qweight"][:128]}, config, ValueError, "proj.qweight.*shape"),
        (good, {**config, "group_size": 64}, ValueError, "group_size"),
        (good, {"quant_method": "gptq", "bits": 4}, ValueError, "quant_method"),
        ({**good, "other.weight": np.ones(3, np.float32)}, config, ValueError, "other.weight"),
    ]
    for i, (tensors, cfg, error, match) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        path = _write(tmp_path / str(i), tensors, cfg)
        with pytest.raises(error, match=match):
            qnn.load_quantized(_single_layer_model(qnn.AWQLinear(K, N, use_bias=False)), path)
    with pytest.raises(ValueError, match="no quantized layer"):
        qnn.save_quantized(_single_layer_model(_linear()), str(tmp_path / "none"))
    mixed = _single_layer_model(_layer("awq"))
    mixed.other = _layer("int8")
    with pytest.raises(ValueError, match="different configs"):
        qnn.save_quantized(mixed, str(tmp_path / "mixed"))


# ---------------------------------------------------------------------------------- tensor parallel


def _mesh():
    return jax.make_mesh((4, 2), ("data", MODEL_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("scheme,options", [(s, {}) for s in qnn.SCHEMES]
                         + [("awq", dict(backend="marlin")), ("gptq", dict(backend="marlin"))])
def test_tensor_parallel_layers_equal_unsharded(scheme, options):
    """A column-parallel up projection and a row-parallel down projection on 8 virtual devices: the first
    gives the bits of one device, the second differs by the bf16 rounding of its two partial sums (each
    jitted on its own: in one program XLA may keep the f32 of a fused silu, which moves dynamic activation
    quantization's rounding decisions)."""
    mesh = _mesh()

    class MLP(nnx.Module):
        def __init__(self, tensor_parallel):
            def lin(k, n, axes, seed):
                init = nnx.initializers.normal(k ** -0.5)
                return nnx.Linear(k, n, use_bias=True, kernel_init=nnx.with_partitioning(init, axes) if tensor_parallel
                                  else init, bias_init=nnx.initializers.normal(0.1), dtype=jnp.bfloat16,
                                  param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))

            with nnx.use_eager_sharding(False):
                self.up = lin(K, 512, (None, MODEL_AXIS), 0)
                self.down = lin(512, K, (MODEL_AXIS, None), 1)

    x = _x((8, K))
    single, sharded = MLP(False), MLP(True)
    qnn.quantize(single, scheme, **options)
    qnn.quantize(sharded, scheme, **options)
    qnn.shard_model(sharded, mesh)
    down_weight = {"awq": "scales", "gptq": "scales", "nvfp4": "weight_packed"}.get(scheme, "weight")
    spec = getattr(sharded.down, down_weight).sharding.spec
    assert MODEL_AXIS in tuple(spec)
    graphdef, state = nnx.split(sharded)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    hidden = jax.jit(lambda s, x: jax.nn.silu(nnx.merge(graphdef, s).up(x)))(state, xs)
    assert MODEL_AXIS in tuple(hidden.sharding.spec)
    np.testing.assert_array_equal(hidden, jax.nn.silu(single.up(x)))
    down = jax.jit(lambda s, h: nnx.merge(graphdef, s).down(h))
    got = down(state, hidden)
    assert _rel(got, single.down(hidden)) < 6e-3  # 2^-9 per rounding, three roundings
    # The row-parallel layer adds partial sums (all-reduce) and gathers nothing over the model axis (axis_1 of
    # the mesh): neither its weight nor, for dynamic activation quantization, its K-sharded input (per-token
    # maxima are all-reduced instead).
    compiled = down.lower(state, hidden).compile().as_text()
    gathered_axes = re.findall(r" all-gather\(.*?replica_groups=mesh\[[^\]]*\] \{([^}]*)\}", compiled)
    assert "all-reduce" in compiled and not [axes for axes in gathered_axes if "axis_1" in axes], gathered_axes


def test_shard_model_names_a_tensor_the_mesh_does_not_divide():
    """A row-parallel layer with 4 groups of scales on an 8-way model axis: a ValueError naming the tensor."""
    mesh = jax.make_mesh((1, 8), ("data", MODEL_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with nnx.use_eager_sharding(False):
        init = nnx.with_partitioning(nnx.initializers.normal(0.04), (MODEL_AXIS, None))
        linear = nnx.Linear(512, 128, kernel_init=init, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer = qnn.GPTQLinear.from_linear(linear, group_size=128)
    with pytest.raises(ValueError, match=r"shard_model: (qzeros|scales) \(4, \d+\) cannot be split 8 ways along its "
                                         r"dimension 0"):
        qnn.shard_model(layer, mesh)


def test_tensor_parallel_model_equals_unsharded():
    mesh = _mesh()
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, TINY.vocab_size, jnp.int32)
    single = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    sharded = LlamaForCausalLM(TINY, tensor_parallel=True, rngs=nnx.Rngs(0))
    for model in (single, sharded):
        qnn.quantize(model, "gptq")
    qnn.shard_model(sharded, mesh)
    graphdef, state = nnx.split(sharded)
    tokens_sharded = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens_sharded)
    assert _rel(got, single(tokens)) < 1e-2


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", ["awq", "gptq3_act_order", "fp8_block", "int8_azp"])
def test_gradient_reaches_the_input_through_the_dequantized_weight(name):
    layer = _layer(name, bias=False)
    x = _x((4, K))
    dy = _x((4, N), seed=2)
    dx = jax.grad(lambda x: jnp.sum(layer(x).astype(jnp.float32) * dy.astype(jnp.float32)))(x)
    eye = jnp.eye(K, dtype=jnp.bfloat16)  # the layer applied to the identity: its effective weight
    if isinstance(layer, (qnn.AWQLinear, qnn.GPTQLinear)):
        w = np.asarray(layer(eye), np.float32)
    else:
        w = np.asarray(layer._dequantized(*[_np(getattr(layer, t)) for t in list(layer.tensor_specs())[:2]])
                       if isinstance(layer, qnn.Fp8Linear) else
                       _np(layer.weight).astype(np.float32) * _np(layer.weight_scale)).T
    assert dx.dtype == x.dtype
    assert _rel(dx, np.asarray(dy, np.float32) @ w.T) < 1e-2


@pytest.mark.parametrize("name", ["awq", "fp8", "int8"])
def test_asking_for_a_quantized_weight_gradient_is_an_error(name):
    layer = _layer(name)
    x = _x((2, K))
    frozen = nnx.All(qnn.QuantizedWeight, lambda path, v: jnp.issubdtype(v[...].dtype, jnp.floating))
    with pytest.raises(jaxq.NotDifferentiableError, match="frozen"):
        nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)), argnums=nnx.DiffState(0, frozen))(layer)
    integer = nnx.All(qnn.QuantizedWeight, lambda path, v: jnp.issubdtype(v[...].dtype, jnp.integer))
    if name != "fp8":  # JAX's own error for integer inputs
        with pytest.raises(TypeError, match="int"):
            nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)), argnums=nnx.DiffState(0, integer))(layer)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(layer)  # nnx.Param only: the bias
    assert set(grads.keys()) == {"bias"}
    np.testing.assert_allclose(np.asarray(grads["bias"][...], np.float32), 2.0)  # d sum(y) / d bias: two rows


def test_qlora_training_lowers_the_loss():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    qnn.quantize(model, "awq")
    frozen = _variables(model)
    assert sorted(qnn.add_lora(model, 4, rngs=nnx.Rngs(1), filter=r"(q_proj|v_proj)$")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, TINY.vocab_size, jnp.int32)

    def loss_fn(model):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    after = _variables(model)
    for key, value in frozen.items():  # the quantized base is untouched (paths gain base_module)
        moved = key.replace("q_proj/", "q_proj/base_module/").replace("v_proj/", "v_proj/base_module/")
        assert np.array_equal(after[moved].view(np.uint8), value.view(np.uint8)) or "lora" in key, key


# ---------------------------------------------------------------------------------------------- export


def test_export_round_trip():
    from jax import export

    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    qnn.quantize(model, "gptq", filter=r"mlp\.")
    qnn.quantize(model, "fp8-block")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)  # plain arrays: export serializes no NNX variable types
    forward = jax.jit(lambda leaves, t: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(t))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    exported = export.export(forward, disabled_checks=jaxq.export_safety_checks())(leaves, tokens)
    restored = export.deserialize(exported.serialize())
    np.testing.assert_array_equal(restored.call(leaves, tokens), forward(leaves, tokens))


# ------------------------------------------------------------------------------------- GPU (-m gpu)


def _run_on(kind, module, fn, *args):
    """``fn(module, *args)`` jitted on the first device of ``kind`` (CUDA kernels, or the CPU reference),
    and the lowered program's text."""
    device = jax.devices(kind)[0]
    graphdef, state = nnx.split(module)
    state, args = jax.device_put((state, args), device)
    program = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    return program(state, *args), program.lower(state, *args).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("name", list(LAYERS))
def test_gpu_layer_kernels_match_reference(name, m):
    layer = _layer(name)
    x = _x((m, K), seed=m)
    got, text = _run_on("cuda", layer, lambda l, x: l(x), x)
    want, _ = _run_on("cpu", layer, lambda l, x: l(x), x)
    if m == 1:
        assert "custom_call @jaxq_" in text
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert _rel(got, want) <= 1e-2  # bf16 GEMM tolerance (the op tests' own)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(qnn.SCHEMES))
def test_gpu_model_on_kernels_matches_reference(scheme, monkeypatch):
    """The tiny Llama on the GPU with jaxq's kernels and with their reference lowering
    (``JAXQ_DISABLE_KERNELS=all``; XLA's own ops the same in both): they differ by the kernels' rounding, and
    with dynamic activation quantization by the rounding decisions that moves in later layers, well under
    what quantization itself costs against the bf16 model."""
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY.vocab_size, jnp.int32)
    float_logits, _ = _run_on("cuda", LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)), lambda m, t: m(t), tokens)
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    qnn.quantize(model, scheme)
    got, text = _run_on("cuda", model, lambda m, t: m(t), tokens)
    monkeypatch.setenv("JAXQ_DISABLE_KERNELS", "all")
    want, reference_text = _run_on("cuda", model, lambda m, t: m(t), tokens)
    assert "custom_call @jaxq_" not in reference_text
    assert "custom_call @jaxq_" in text
    quantization_error = _rel(want, float_logits)
    assert _rel(got, want) <= max(1e-2, 0.5 * quantization_error)
    assert abs(_rel(got, float_logits) - quantization_error) <= 0.25 * quantization_error


@pytest.mark.parametrize("scale_2_shape", [(), (1,)])
def test_load_modelopt_nvfp4_written_from_the_format(tmp_path, scale_2_shape):
    """NVIDIA ModelOpt NVFP4 (hf_quant_config.json): W = e2m1(code) * weight_scale * weight_scale_2, two codes
    per byte (the even input in the low nibble); weight_scale_2 stored as [] or [1]."""
    rng = np.random.default_rng(21)
    codes = rng.integers(0, 16, (N, K))
    scale = (rng.random((N, K // 16)) * 3 + 0.25).astype(ml_dtypes.float8_e4m3fn)
    scale_2 = np.float32(0.0123)
    tensors = {"proj.weight": (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), "proj.weight_scale": scale,
               "proj.weight_scale_2": np.full(scale_2_shape, scale_2, np.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                            "exclude_modules": ["lm_head"]}}))
    layer = qnn.NVFP4Linear(K, N, use_bias=False, checkpoint_format="modelopt")
    qnn.load_quantized(_single_layer_model(layer), str(tmp_path))
    w = E2M1[codes & 7] * np.where(codes & 8, -1.0, 1.0) * np.repeat(scale.astype(np.float32), 16, axis=1) * scale_2
    x = _x((3, K))
    assert _rel(layer(x), np.asarray(x, np.float32) @ w.T) < 5e-3
    saved = read_safetensors(qnn.save_quantized(_single_layer_model(layer), str(tmp_path / "saved")))
    np.testing.assert_array_equal(saved["proj.weight"], tensors["proj.weight"])
    np.testing.assert_array_equal(saved["proj.weight_scale"].view(np.uint8), scale.view(np.uint8))
    np.testing.assert_allclose(saved["proj.weight_scale_2"], scale_2, rtol=1e-7)
    with pytest.raises(ValueError, match="quant_method='modelopt'"):  # a compressed-tensors layer
        qnn.load_quantized(_single_layer_model(qnn.NVFP4Linear(K, N, use_bias=False)), str(tmp_path))


def test_nvfp4_layer_errors():
    with pytest.raises(ValueError, match="in_features"):
        qnn.NVFP4Linear(24, N)
    with pytest.raises(ValueError, match="checkpoint_format"):
        qnn.NVFP4Linear(K, N, checkpoint_format="gptq")
    layer = qnn.NVFP4Linear(K, N, use_bias=False)
    with pytest.raises(ValueError, match="weight_packed"):
        layer.set_checkpoint_tensors(weight_packed=np.zeros((N, K), np.uint8),
                                     weight_scale=np.zeros((N, K // 16), ml_dtypes.float8_e4m3fn),
                                     weight_global_scale=np.ones((1,), np.float32))
    with pytest.raises(TypeError, match="weight_scale"):
        layer.set_checkpoint_tensors(weight_packed=np.zeros((N, K // 2), np.uint8),
                                     weight_scale=np.zeros((N, K // 16), np.int8),
                                     weight_global_scale=np.ones((1,), np.float32))
