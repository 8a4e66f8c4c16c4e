"""from_pretrained on Hugging Face-style directories written here (config.json in transformers' keys, tensors in
its names), the KV-cache generate, and the rope scaling against an independent NumPy version of Llama 3's."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jaxq.nn as qnn
from jaxq.nn.checkpoint import read_safetensors
from jaxq.nn.llama import LlamaConfig, LlamaForCausalLM, RopeScaling, _inverse_frequencies, generate

SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


def _hf_config(config: LlamaConfig, architecture: str, **extra) -> dict:
    return {"architectures": [architecture], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_word_embeddings, **extra}


def _hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """transformers' names and layouts (Linear weights [out, in]) of a float model's parameters."""
    out = {"model.embed_tokens.weight": model.model.embed_tokens.embedding[...],
           "model.norm.weight": model.model.norm.scale[...]}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        out[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.scale[...]
        out[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.scale[...]
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(getattr(layer, block), name)
                out[f"{prefix}.{block}.{name}.weight"] = linear.kernel[...].T
                if linear.bias is not None:
                    out[f"{prefix}.{block}.{name}.bias"] = linear.bias[...]
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.kernel[...].T
    return {name: np.ascontiguousarray(np.asarray(value)) for name, value in out.items()}


def _write(directory, config: dict, tensors: dict, shards: int = 1):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[s::shards]}
        save_file(part, str(directory / file))
        weight_map.update({name: file for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _random_biases(model):
    for i, layer in enumerate(model.model.layers):
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            bias = getattr(layer.self_attn, name).bias
            bias[...] = jax.random.normal(jax.random.key(10 * i + j), bias.shape, bias.dtype)


TOKENS = jax.random.randint(jax.random.key(5), (2, 9), 0, SMALL["vocab_size"], jnp.int32)


@pytest.mark.parametrize("architecture,extra", [
    ("LlamaForCausalLM", {}),
    ("Qwen2ForCausalLM", {"tie": True}),
    ("MistralForCausalLM", {"sliding_window": 4}),
])
def test_float_checkpoints_give_the_same_model(tmp_path, architecture, extra):
    config = LlamaConfig(**SMALL, attention_bias=architecture == "Qwen2ForCausalLM",
                         tie_word_embeddings=extra.get("tie", False), sliding_window=extra.get("sliding_window", 0))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    if config.attention_bias:
        _random_biases(model)
    hf = _hf_config(config, architecture, sliding_window=extra.get("sliding_window"))
    _write(tmp_path / "ckpt", hf, _hf_tensors(model), shards=3)
    separate = qnn.from_pretrained(str(tmp_path / "ckpt"), fuse=False)
    assert separate.config == config
    np.testing.assert_array_equal(separate(TOKENS), model(TOKENS))
    # from_pretrained fuses q/k/v and gate/up; a wider dot may add along K in another order (XLA's CPU dot
    # does on some CPUs), so the loaded model is compared with the same model fused.
    loaded = qnn.from_pretrained(str(tmp_path / "ckpt"))
    qnn.fuse_projections(model)
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))
    np.testing.assert_array_equal(generate(loaded, TOKENS, 3), generate(model, TOKENS, 3))


def test_sliding_window_limits_attention():
    windowed = LlamaForCausalLM(LlamaConfig(**SMALL, sliding_window=3), rngs=nnx.Rngs(0))
    full = LlamaForCausalLM(LlamaConfig(**SMALL), rngs=nnx.Rngs(0))
    a, b = np.asarray(windowed(TOKENS)), np.asarray(full(TOKENS))
    np.testing.assert_array_equal(a[:, :3], b[:, :3])  # the first 3 positions see all they would anyway
    assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("scheme,options", [
    ("awq", {}),
    ("gptq", dict(act_order=np.random.default_rng(0).permutation(256))),
    ("gptq", dict(checkpoint_format="compressed-tensors", v2_format=True, bits=8)),
    ("fp8-block", {}),
    ("int8", {}),
    ("fp8-weight", {}),
])
def test_quantized_checkpoints_give_the_same_model(tmp_path, scheme, options):
    config = LlamaConfig(**{**SMALL, "intermediate_size": 256})  # every layer has 256 inputs (one act-order perm)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    qnn.quantize(model, scheme, filter=lambda path, m: "lm_head" not in path, **options)
    saved = tmp_path / "saved"
    qnn.save_quantized(model, str(saved))
    quantization = json.loads((saved / "config.json").read_text())["quantization_config"]
    tensors = read_safetensors(str(saved))
    _write(tmp_path / "ckpt", _hf_config(config, "LlamaForCausalLM", quantization_config=quantization), tensors,
           shards=2)
    loaded = qnn.from_pretrained(str(tmp_path / "ckpt"))
    assert type(loaded.model.layers[0].mlp.down_proj) is type(model.model.layers[0].mlp.down_proj)
    assert isinstance(loaded.lm_head, nnx.Linear)
    qnn.fuse_projections(model)  # as from_pretrained did; a wider GEMM may add along K in another order
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))


def test_compressed_tensors_config_groups_and_ignore(tmp_path):
    """Two config groups (attention in one, the MLP in the other) and lm_head ignored."""
    config = LlamaConfig(**SMALL)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    qnn.quantize(model, "gptq", filter=lambda path, m: "lm_head" not in path, checkpoint_format="compressed-tensors",
                 v2_format=True)
    saved = tmp_path / "saved"
    qnn.save_quantized(model, str(saved))
    quantization = json.loads((saved / "config.json").read_text())["quantization_config"]
    group = quantization["config_groups"].pop("group_0")
    quantization["config_groups"] = {"attention": {**group, "targets": ["re:.*self_attn\\..*"]},
                                     "mlp": {**group, "targets": ["re:.*mlp\\..*_proj"]}}
    quantization["ignore"] = ["lm_head"]
    _write(tmp_path / "ckpt", _hf_config(config, "LlamaForCausalLM", quantization_config=quantization),
           read_safetensors(str(saved)))
    loaded = qnn.from_pretrained(str(tmp_path / "ckpt"), backend="marlin")
    fused = loaded.model.layers[1].self_attn.qkv_proj.layer  # q/k/v fused at load
    assert isinstance(fused, qnn.GPTQLinear) and fused.backend == "marlin" and fused.out_features == 512
    assert isinstance(loaded.model.layers[1].mlp.gate_up_proj.layer, qnn.GPTQLinear)
    assert isinstance(loaded.lm_head, nnx.Linear)
    separate = qnn.from_pretrained(str(tmp_path / "ckpt"), backend="marlin", fuse=False)
    assert isinstance(separate.model.layers[1].self_attn.k_proj, qnn.GPTQLinear)
    assert separate.model.layers[1].self_attn.qkv_proj is None
    reference = model(TOKENS)
    for got in (loaded(TOKENS), separate(TOKENS)):
        assert float(jnp.linalg.norm(got - reference) / jnp.linalg.norm(reference)) < 1e-2


def test_errors_name_the_setting_tensor_and_file(tmp_path):
    config = LlamaConfig(**SMALL)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    tensors = _hf_tensors(model)
    with pytest.raises(FileNotFoundError, match="config.json"):
        qnn.from_pretrained(str(tmp_path))
    _write(tmp_path / "arch", _hf_config(config, "GPT2LMHeadModel"), tensors)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        qnn.from_pretrained(str(tmp_path / "arch"))
    _write(tmp_path / "rope", _hf_config(config, "LlamaForCausalLM", rope_scaling={"rope_type": "yarn"}), tensors)
    with pytest.raises(ValueError, match="yarn"):
        qnn.from_pretrained(str(tmp_path / "rope"))
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :128]
    _write(tmp_path / "shape", _hf_config(config, "LlamaForCausalLM"), bad, shards=2)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*model-0000\d-of-00002\.safetensors"):
        qnn.from_pretrained(str(tmp_path / "shape"))
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    _write(tmp_path / "missing", _hf_config(config, "LlamaForCausalLM"), missing)
    with pytest.raises(KeyError, match="model.norm.weight"):
        qnn.from_pretrained(str(tmp_path / "missing"))
    extra = dict(tensors, **{"model.layers.0.mlp.extra": np.zeros(3, np.float32)})
    _write(tmp_path / "extra", _hf_config(config, "LlamaForCausalLM"), extra)
    with pytest.raises(ValueError, match="match no module"):
        qnn.from_pretrained(str(tmp_path / "extra"))
    assert qnn.from_pretrained(str(tmp_path / "extra"), strict=False) is not None


def test_llama3_rope_scaling_matches_an_independent_version():
    """transformers' llama3 rope init, written here from its definition in NumPy."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = LlamaConfig(**SMALL, rope_theta=500000.0, head_dim=128, rope_scaling=scaling)
    dim, base = 128, 500000.0
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    want = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            want.append(f)
        elif wavelen > low_wavelen:
            want.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(np.asarray(_inverse_frequencies(config)), want, rtol=1e-6)
    hf = LlamaConfig.from_hf(_hf_config(LlamaConfig(**SMALL), "LlamaForCausalLM", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert hf.rope_scaling == scaling


def test_generate_samples_and_checks_its_arguments():
    model = LlamaForCausalLM(LlamaConfig(**SMALL), rngs=nnx.Rngs(0))
    a = generate(model, TOKENS, 5, temperature=1.0, top_p=0.9, key=jax.random.key(1))
    b = generate(model, TOKENS, 5, temperature=1.0, top_p=0.9, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 14) and np.array_equal(a[:, :9], TOKENS)
    # top_p small enough keeps only the most likely token: sampling is then greedy.
    np.testing.assert_array_equal(generate(model, TOKENS, 5, temperature=1.0, top_p=1e-6, key=jax.random.key(2)),
                                  generate(model, TOKENS, 5))
    timings = {}
    generate(model, TOKENS, 2, timings=timings)
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, TOKENS, 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, TOKENS, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, TOKENS[0], 2)


@pytest.mark.parametrize("scheme", [None, "awq"])
def test_loading_onto_a_mesh_shards_each_layer(tmp_path, scheme):
    config = LlamaConfig(**{**SMALL, "intermediate_size": 256})
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    if scheme is None:
        tensors, hf = _hf_tensors(model), _hf_config(config, "LlamaForCausalLM")
    else:
        qnn.quantize(model, scheme, filter=lambda path, m: "lm_head" not in path)
        qnn.save_quantized(model, str(tmp_path / "saved"))
        quantization = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
        tensors = read_safetensors(str(tmp_path / "saved"))
        hf = _hf_config(config, "LlamaForCausalLM", quantization_config=quantization)
    _write(tmp_path / "ckpt", hf, tensors)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    loaded = qnn.from_pretrained(str(tmp_path / "ckpt"), mesh=mesh)
    down = loaded.model.layers[0].mlp.down_proj
    weight = down.kernel if scheme is None else down.qweight
    assert "model" in tuple(weight[...].sharding.spec), weight[...].sharding
    assert "model" in tuple(loaded.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec if scheme is None
                            else loaded.model.layers[0].self_attn.q_proj.scales[...].sharding.spec)
    graphdef, state = nnx.split(loaded)
    batch = TOKENS[:, :8].repeat(2, axis=0)  # 4 rows: one per data shard
    tokens = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    want = model(batch)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2
