"""Flax NNX layers on jaxq's ops: quantized drop-ins for ``nnx.Linear``, ``quantize`` for whole models,
checkpoints in the formats vLLM loads (AutoAWQ, AutoGPTQ, compressed-tensors, FP8 block-wise),
``from_pretrained`` for Hugging Face Llama/Mistral/Qwen2 directories and ``generate`` with a KV cache.
"""

from jaxq.nn.checkpoint import load_quantized, quantization_config, save_quantized
from jaxq.nn.fuse import FusedProjections, fuse_projections, unfuse_projections
from jaxq.nn.llama import LlamaConfig, LlamaForCausalLM, generate
from jaxq.nn.layers import (
    AWQLinear,
    Fp8Linear,
    GPTQLinear,
    Int8Linear,
    NVFP4Linear,
    QuantizedLinear,
    QuantizedWeight,
    quantize_int8_per_token,
)
from jaxq.nn.pretrained import from_pretrained
from jaxq.nn.quantize import SCHEMES, add_lora, quantize, shard_model

__all__ = [
    "AWQLinear",
    "Fp8Linear",
    "FusedProjections",
    "GPTQLinear",
    "Int8Linear",
    "LlamaConfig",
    "LlamaForCausalLM",
    "NVFP4Linear",
    "QuantizedLinear",
    "QuantizedWeight",
    "SCHEMES",
    "add_lora",
    "from_pretrained",
    "fuse_projections",
    "generate",
    "load_quantized",
    "quantization_config",
    "quantize",
    "quantize_int8_per_token",
    "save_quantized",
    "shard_model",
    "unfuse_projections",
]
