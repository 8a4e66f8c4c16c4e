"""jaxq: vLLM's quantization and quantized-GEMM kernels as JAX primitives.

Every op runs under ``jax.jit``, ``vmap`` and sharding; on NVIDIA GPUs it lowers to a CUDA kernel
through XLA FFI, elsewhere (and with ``JAXQ_DISABLE_KERNELS``) to its pure-jnp reference.
"""

from jaxq import formats
from jaxq._ffi import cuda_available, export_safety_checks
from jaxq._op import NotDifferentiableError
from jaxq.ops.awq import awq_dequantize, awq_gemm
from jaxq.ops.gptq import gptq_dequantize, gptq_gemm, gptq_shuffle
from jaxq.ops.marlin import (
    awq_marlin_repack,
    awq_to_marlin_zero_points,
    batch_invariant,
    gptq_marlin_repack,
    marlin_fp4_repack,
    marlin_fp4_scale_values,
    marlin_fp4_weight,
    marlin_fp8_repack,
    marlin_fp8_scales,
    marlin_gemm,
    marlin_permute_scales,
    marlin_zero_points,
    mxfp4_marlin_process_scales,
    nvfp4_marlin_process_global_scale,
    nvfp4_marlin_process_scales,
)
from jaxq.ops.group_quant import per_token_group_fp8_quant, per_token_group_fp8_quant_packed
from jaxq.ops.scaled_mm import cutlass_azp_adj, cutlass_scaled_mm, cutlass_scaled_mm_azp
from jaxq.ops.nvfp4 import (
    nvfp4_dequantize,
    scaled_fp4_quant,
    swizzle_block_scales,
    unswizzle_block_scales,
)

__all__ = [
    "NotDifferentiableError",
    "awq_dequantize",
    "awq_gemm",
    "awq_marlin_repack",
    "awq_to_marlin_zero_points",
    "batch_invariant",
    "formats",
    "gptq_dequantize",
    "gptq_gemm",
    "gptq_marlin_repack",
    "gptq_shuffle",
    "marlin_fp4_repack",
    "marlin_fp4_scale_values",
    "marlin_fp4_weight",
    "marlin_fp8_repack",
    "marlin_fp8_scales",
    "marlin_gemm",
    "marlin_permute_scales",
    "marlin_zero_points",
    "mxfp4_marlin_process_scales",
    "nvfp4_marlin_process_global_scale",
    "nvfp4_marlin_process_scales",
    "cuda_available",
    "export_safety_checks",
    "cutlass_azp_adj",
    "cutlass_scaled_mm",
    "cutlass_scaled_mm_azp",
    "nvfp4_dequantize",
    "per_token_group_fp8_quant",
    "per_token_group_fp8_quant_packed",
    "scaled_fp4_quant",
    "swizzle_block_scales",
    "unswizzle_block_scales",
]
