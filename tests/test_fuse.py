"""fuse_projections: q/k/v and gate/up as one layer each, for every layer class, with the same outputs as the
separate projections; what must not fuse stays apart; checkpoints save under the original names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq.nn as qnn
from jaxq.nn.checkpoint import read_safetensors
from jaxq.nn.fuse import FusedProjections, concatenate_outputs, split_outputs
from jaxq.nn.llama import LlamaConfig, LlamaForCausalLM, generate

# q 256, k and v 128 each (head_dim 64), gate and up 512: every part a whole number of 64-column Marlin tiles
# and of 128-row fp8 scale blocks.
CONFIG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                     num_kv_heads=2)
TOKENS = jax.random.randint(jax.random.key(3), (2, 7), 0, CONFIG.vocab_size, jnp.int32)

SCHEMES = [
    (None, {}),
    ("awq", {}),
    ("awq", {"backend": "marlin"}),
    ("gptq", {}),
    ("gptq", {"backend": "marlin"}),
    ("gptq", {"bits": 8, "backend": "marlin", "group_size": 64}),
    ("gptq", {"bits": 3}),
    ("fp8", {}),
    ("fp8-block", {}),
    ("fp8-weight", {}),
    ("int8", {}),
    ("int8-azp", {}),
    ("nvfp4", {}),
    ("nvfp4", {"backend": "dequantize"}),
]


def _model(scheme, options, config=CONFIG):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    if scheme is not None:
        qnn.quantize(model, scheme, filter=lambda path, m: "lm_head" not in path, **options)
    return model


def _relative(got, want):
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.mark.parametrize("scheme,options", SCHEMES)
def test_fused_model_computes_what_the_separate_projections_do(scheme, options):
    model = _model(scheme, options)
    want = model(TOKENS)
    fused = qnn.fuse_projections(model)
    assert fused == [f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.gate_up_proj", "self_attn.qkv_proj")]
    attention = model.model.layers[0].self_attn
    assert attention.q_proj is None and isinstance(attention.qkv_proj, FusedProjections)
    assert attention.qkv_proj.layer.out_features == 512 and attention.qkv_proj.sizes == (256, 128, 128)
    # One GEMM over the concatenated columns: the same up to the order of float32 sums (a wrong concatenation
    # axis or packing would be off by about 1).
    assert _relative(model(TOKENS), want) <= 1e-2


@pytest.mark.parametrize("scheme,options", SCHEMES)
def test_parts_and_checkpoints_are_bit_for_bit_the_originals(tmp_path, scheme, options):
    if scheme is None:
        pytest.skip("save_quantized writes quantized models")
    separate = _model(scheme, options)
    fused = _model(scheme, options)
    qnn.fuse_projections(fused)
    qnn.save_quantized(separate, str(tmp_path / "separate"))
    qnn.save_quantized(fused, str(tmp_path / "fused"))
    a, b = read_safetensors(str(tmp_path / "separate")), read_safetensors(str(tmp_path / "fused"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)
    assert (tmp_path / "separate" / "config.json").read_text() == (tmp_path / "fused" / "config.json").read_text()
    # Unfusing gives back layers equal to the originals, tensor for tensor.
    qnn.unfuse_projections(fused)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(separate)), nnx.to_flat_state(nnx.state(fused))):
        np.testing.assert_array_equal(np.asarray(x[...]).view(np.uint8), np.asarray(y[...]).view(np.uint8),
                                      err_msg=str(path))
    np.testing.assert_array_equal(fused(TOKENS), separate(TOKENS))


def test_gradients_reach_the_input_through_a_fused_layer():
    model = _model("gptq", {"backend": "marlin"})
    embedded = model.model.embed_tokens(TOKENS)

    def loss(x, m):
        return jnp.sum(m.model.layers[0](x).astype(jnp.float32) ** 2)

    want = jax.grad(loss)(embedded, model)
    qnn.fuse_projections(model)
    assert _relative(jax.grad(loss)(embedded, model), want) <= 1e-2


def _gptq_act_order(perm_seed):
    linear = nnx.Linear(256, 128, rngs=nnx.Rngs(perm_seed))
    return qnn.GPTQLinear.from_linear(linear, act_order=np.random.default_rng(perm_seed).permutation(256),
                                      backend="marlin")


def test_what_cannot_fuse_stays_apart():
    linear = lambda n, seed=0: nnx.Linear(256, n, rngs=nnx.Rngs(seed))  # noqa: E731
    # Different settings, classes, or tensors without an output axis that differ.
    assert concatenate_outputs([qnn.AWQLinear.from_linear(linear(128)),
                                qnn.AWQLinear.from_linear(linear(128), group_size=64)]) is None
    awq, gptq = qnn.AWQLinear.from_linear(linear(128)), qnn.GPTQLinear.from_linear(linear(128))
    assert concatenate_outputs([awq, gptq]) is None
    assert concatenate_outputs([_gptq_act_order(0), _gptq_act_order(1)]) is None  # different g_idx
    assert concatenate_outputs([_gptq_act_order(0), _gptq_act_order(0)]) is not None
    small, large = qnn.NVFP4Linear.from_linear(linear(128, 0)), qnn.NVFP4Linear.from_linear(linear(128, 1))
    large.weight_global_scale[...] = small.weight_global_scale[...] * 2  # another global scale
    assert concatenate_outputs([small, large]) is None
    # Block-wise fp8: a 64-row part would share a 128-row scale block with the next part.
    block = lambda n, seed=0: qnn.Fp8Linear.from_linear(linear(n, seed), block=True)  # noqa: E731
    assert concatenate_outputs([block(64), block(128)]) is None
    assert concatenate_outputs([block(128), block(64)]) is None  # valid, but parts must be whole blocks
    fused = concatenate_outputs([block(128), block(256, 1)])
    x = jax.random.normal(jax.random.key(0), (3, 256), jnp.bfloat16)
    assert _relative(fused(x), jnp.concatenate([block(128)(x), block(256, 1)(x)], -1)) <= 1e-2
    # A LoRA wrapper is not a layer to concatenate.
    wrapped = nnx.LoRA(256, 4, 128, base_module=qnn.AWQLinear.from_linear(linear(128)), rngs=nnx.Rngs(0))
    assert concatenate_outputs([wrapped, wrapped]) is None


def test_tensor_parallel_layers_stay_apart():
    model = LlamaForCausalLM(CONFIG, tensor_parallel=True, rngs=nnx.Rngs(0))
    qnn.quantize(model, "awq", filter=lambda path, m: "lm_head" not in path)
    assert qnn.fuse_projections(model) == []
    assert model.model.layers[0].self_attn.q_proj is not None


def test_split_outputs_checks_its_sizes_and_loading_refuses_a_fused_model(tmp_path):
    model = _model("awq", {})
    qnn.save_quantized(model, str(tmp_path / "saved"))
    qnn.fuse_projections(model)
    with pytest.raises(ValueError, match="add up to out_features=512"):
        split_outputs(model.model.layers[0].self_attn.qkv_proj.layer, (256, 128))
    with pytest.raises(ValueError, match="fused projections"):
        qnn.load_quantized(model, str(tmp_path / "saved"))
    qnn.unfuse_projections(model)
    qnn.load_quantized(model, str(tmp_path / "saved"))


def test_fusing_twice_or_a_bf16_model_then_quantizing():
    model = _model(None, {})
    assert len(qnn.fuse_projections(model)) == 4
    assert qnn.fuse_projections(model) == []
    # quantize() replaces the fused nnx.Linear itself: one quantized GEMM for q/k/v.
    replaced = qnn.quantize(model, "gptq", filter=lambda path, m: "lm_head" not in path, backend="marlin")
    assert "model.layers.0.self_attn.qkv_proj.layer" in replaced
    separate = _model("gptq", {"backend": "marlin"})
    assert _relative(model(TOKENS), separate(TOKENS)) <= 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_marlin_layers_fuse(bits):
    """One group: vLLM's other scale permutation, within 64 columns, must concatenate too."""
    parts = [qnn.GPTQLinear.from_linear(nnx.Linear(256, n, rngs=nnx.Rngs(n)), bits=bits, group_size=-1,
                                        backend="marlin") for n in (192, 64, 128)]
    fused = concatenate_outputs(parts)
    x = jax.random.normal(jax.random.key(0), (5, 256), jnp.bfloat16)
    assert _relative(fused(x), jnp.concatenate([p(x) for p in parts], -1)) <= 1e-2
    for part, back in zip(parts, split_outputs(fused, (192, 64, 128))):
        for name, value in part.checkpoint_tensors().items():
            np.testing.assert_array_equal(back.checkpoint_tensors()[name], value, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,options", [case for case in SCHEMES  # the schemes that run jaxq's kernels
                                            if case[0] is not None and case[1].get("backend") != "dequantize"])
def test_gpu_fused_model_runs_fewer_kernels_with_the_same_outputs(scheme, options):
    """On the CUDA kernels: fused and separate projections agree to the kernels' rounding (a wider layer may
    split K differently), and the fused program calls fewer jaxq kernels."""
    device = jax.devices("cuda")[0]

    def run(model):
        graphdef, state = nnx.split(model)
        state, tokens = jax.device_put((state, TOKENS), device)
        program = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        return program(state, tokens), program.lower(state, tokens).as_text().count("custom_call @jaxq_")

    want, separate_calls = run(_model(scheme, options))
    model = _model(scheme, options)
    qnn.fuse_projections(model)
    got, fused_calls = run(model)
    assert np.all(np.isfinite(np.asarray(got)))
    assert _relative(got, want) <= 1e-2
    assert 0 < fused_calls < separate_calls, (fused_calls, separate_calls)
