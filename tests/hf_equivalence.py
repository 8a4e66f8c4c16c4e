"""jaxq's models against Hugging Face transformers on the same checkpoint (needs torch and transformers, and
compressed-tensors for the quantized checkpoints; shared by tests/test_transformers.py and
tools/transformers_check.py).

A small random transformers model is saved with ``save_pretrained`` and loaded by ``jaxq.nn.from_pretrained``;
both run in bfloat16 on the same tokens. Prefill: logits of the prompt. Decode: jaxq's KV-cache steps fed the
tokens transformers' greedy ``generate`` chose, against transformers' logits of the whole sequence at those
positions (teacher forcing, so that one near-tie cannot send the two down different paths).

Quantized checkpoints come from the compressed-tensors library itself: its ``apply_quantization_config``, scales
and zero points from its ``calculate_qparams`` over each group's min and max, its ``ModelCompressor`` packing
and ``update_config``; transformers then runs on the library's own decompression of those weights (its
activation quantization included, for the W8A8 schemes) as the reference.
"""

from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np

# architecture -> transformers config overrides beyond the shared small shape
CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama3-rope-scaling": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4}}),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 6}),
}
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


@dataclasses.dataclass
class Errors:
    prefill: float  # relative L2 of the prompt's logits
    decode: float  # relative L2 of the decode steps' logits
    greedy_agreement: float  # share of jaxq's greedy tokens equal to transformers'
    scheme_error: float | None = None  # the reference's own relative L2 from the unquantized model (prefill)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def save_random_model(case: str, directory: str, seed: int = 0):
    """A random transformers model of ``case`` in bfloat16, saved to ``directory``; returns it."""
    import torch
    import transformers

    architecture, extra = CASES[case]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**{**SHAPE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero: give them values
                parameter.normal_(0.0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                parameter.mul_(5.0)  # peaked attention, so that positions (rope, window, cache) matter
    model.save_pretrained(directory)
    return model


def compare(hf_model, directory: str, batch: int = 2, prompt: int = 7, steps: int = 8, seed: int = 1,
            float_model=None) -> Errors:
    """Loads ``directory`` with jaxq and compares it with ``hf_model`` (module docstring); with the unquantized
    ``float_model``, also how far ``hf_model`` itself is from it."""
    import torch

    import jaxq.nn as qnn

    ours = qnn.from_pretrained(directory)
    ids = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (batch, prompt))
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor(ids), max_new_tokens=steps, do_sample=False,
                                      pad_token_id=0).numpy()
        reference = hf_model(torch.tensor(generated)).logits.float().numpy()
    cache = ours.empty_cache(batch, prompt + steps)
    logits, cache = ours(jnp.asarray(ids, jnp.int32), cache, 0)
    prefill = _rel(logits, reference[:, :prompt])
    step_logits = []
    for i in range(steps - 1):
        position = prompt + i
        step, cache = ours(jnp.asarray(generated[:, position:position + 1], jnp.int32), cache, position)
        step_logits.append(np.asarray(step[:, 0]))
    decode = _rel(np.stack(step_logits, 1), reference[:, prompt:prompt + steps - 1])
    tokens = np.asarray(qnn.generate(ours, jnp.asarray(ids, jnp.int32), steps))
    agreement = float(np.mean(tokens[:, prompt:] == generated[:, prompt:]))
    scheme_error = None
    if float_model is not None:
        with torch.no_grad():
            unquantized = float_model(torch.tensor(ids)).logits.float().numpy()
        scheme_error = _rel(reference[:, :prompt], unquantized)
    return Errors(prefill, decode, agreement, scheme_error)


# scheme -> (format, weights args, input activation args or None), compressed-tensors' QuantizationArgs fields
COMPRESSED_SCHEMES = {
    "w4a16": ("pack-quantized", dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128), None),
    "w4a16-asym": ("pack-quantized", dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
                   None),
    "w8a16": ("pack-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), None),
    "fp8-dynamic": ("float-quantized", dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
                    dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)),
    "w8a8-int": ("int-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
                 dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
    "nvfp4a16": ("nvfp4-pack-quantized", dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                              group_size=16), None),
}
# Wider than SHAPE: group-128 weights need K a multiple of 128.
COMPRESSED_SHAPE = dict(SHAPE, hidden_size=256, intermediate_size=512)


def save_compressed_model(scheme: str, directory: str, seed: int = 0):
    """A random transformers Llama quantized by compressed-tensors with ``scheme`` (``lm_head`` ignored), its
    compressed checkpoint written to ``directory``; returns the model with the library's decompressed weights
    and the model before quantization."""
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    fmt, weights, activations = COMPRESSED_SCHEMES[scheme]
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMPRESSED_SHAPE)).to(torch.bfloat16).eval()
    unquantized = copy.deepcopy(model)
    weight_args = QuantizationArgs(**weights)
    group = QuantizationScheme(targets=["Linear"], weights=weight_args,
                               input_activations=QuantizationArgs(**activations) if activations else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        global_scale = None
        if hasattr(module, "weight_global_scale"):  # NVFP4: one float32 scale over the whole tensor
            global_scale = generate_gparam(w.amin(), w.amax()).reshape(module.weight_global_scale.shape)
            module.weight_global_scale.data.copy_(global_scale)
        w = w.reshape(w.shape[0], -1, weight_args.group_size) if weight_args.group_size else w[:, None, :]
        scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), weight_args, global_scale=global_scale)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape)
                                                .to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    compressor.decompress_model(model)
    return model, unquantized
