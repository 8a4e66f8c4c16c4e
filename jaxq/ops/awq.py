"""AWQ (AutoAWQ "GEMM" format, 4-bit): ``awq_dequantize`` and ``awq_gemm``.

Tensors, as AutoAWQ checkpoints store them and vLLM loads them (see :mod:`jaxq.formats`):
``qweight`` int32 ``[K, N/8]`` (8 nibbles per word along N, interleaved ``AWQ_ORDER``), ``qzeros`` int32
``[K/G, N/8]`` packed the same way, ``scales`` float16/bfloat16 ``[K/G, N]``;
``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``, computed in float32 and rounded once to the scales'
dtype. jaxq needs the group size ``G`` to be a multiple of 32 (AutoAWQ uses 32, 64 or 128).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats
from jaxq._op import Op, ShardingRule, map_batching
from jaxq.ops import _weight_only as wo
from jaxq.ops import marlin

# Rows of x up to which awq_gemm runs its own kernel; above, dequantize + XLA's dot is faster
# (measured crossover on H100, benchmarks/RESULTS.md), or on an sm_90 GPU marlin_gemm's Hopper kernel (up to
# marlin.hopper_max_rows()).
AWQ_GEMM_KERNEL_MAX_M = 64
_SLAB_K = 32  # K rows of one warp step of the kernel (WeightOnlySlabK in csrc/kernels/weight_only.cu)


def awq_dequantize_reference(qweight, qzeros, scales) -> jax.Array:
    """``W [K, N]`` in the scales' dtype, in jnp (the spec in code)."""
    k, groups = qweight.shape[0], scales.shape[0]
    q = formats.unpack_awq(qweight)
    z = jnp.repeat(formats.unpack_awq(qzeros), k // groups, axis=0)
    s = jnp.repeat(scales.astype(jnp.float32), k // groups, axis=0)
    return ((q - z).astype(jnp.float32) * s).astype(scales.dtype)


def _weight_dims(params, q_shape, z_shape, s_shape):
    k, groups = q_shape[0], s_shape[0]
    k_dims = ("kg", "g")
    return (
        (k_dims, ("nw",)),
        (("kg",), ("nw",)),
        (("kg",), ("nw", "e")),
        k_dims,
        ("nw", "e"),
        {"g": k // groups, "e": 8},
        {"nw": wo.KERNEL_TILE_N // 8},  # shards keep N in whole kernel tiles
    )


def _dequantize_sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    q_dims, z_dims, s_dims, k_dims, n_dims, sizes, granularity = _weight_dims(params, *operand_shapes)
    return ShardingRule(operands=(q_dims, z_dims, s_dims), results=((k_dims, n_dims),), factor_sizes=sizes,
                        granularity=granularity)


def _dequantize_attributes():
    return dict(format=np.int32(wo.FORMAT_AWQ), bits=np.int32(4), zero_offset=np.int32(0))


_awq_dequantize = Op(
    "awq_dequantize",
    shapes=lambda qweight, qzeros, scales: (jax.ShapeDtypeStruct((qweight.shape[0], scales.shape[1]), scales.dtype),),
    reference=lambda qweight, qzeros, scales: (awq_dequantize_reference(qweight, qzeros, scales),),
    sharding_rule=_dequantize_sharding_rule,
    ffi_target="jaxq_weight_dequantize",
    batching_rule=map_batching,  # stacked weights: one dequantization each
    ffi_attributes=lambda: _dequantize_attributes(),
)

_awq_gemm = wo.gemm_op(
    "awq_gemm",
    dequantize=lambda qweight, qzeros, scales, **params: awq_dequantize_reference(qweight, qzeros, scales),
    weight_rule=_weight_dims,
    slab_k=lambda **params: _SLAB_K,
    ffi_attributes=lambda split_k_hint: _dequantize_attributes(),
    dequantize_op=lambda qweight, qzeros, scales, **params: _awq_dequantize(qweight, qzeros, scales)[0],
)


def _check(fn, qweight, scales, qzeros, x_dtype=None):
    wo.check_int32(fn, "qweight", qweight, 2)
    wo.check_int32(fn, "qzeros", qzeros, 2)
    k, words = qweight.shape
    groups = qzeros.shape[0]
    if qzeros.shape[1] != words:
        raise ValueError(f"{fn}: qzeros {tuple(qzeros.shape)} must have N/8 = {words} columns like qweight")
    wo.group_size_of(fn, k, groups)
    wo.check_scales(fn, scales, x_dtype, (groups, 8 * words))


def awq_dequantize(qweight, scales, zeros):
    """Dequantizes AutoAWQ tensors: ``W [K, N]`` in the scales' dtype.

    Args:
      qweight: int32 ``[K, N/8]``.
      scales: float16 or bfloat16 ``[K/G, N]``.
      zeros: int32 ``[K/G, N/8]`` (``qzeros``).
    """
    _check("awq_dequantize", qweight, scales, zeros)
    return _awq_dequantize(qweight, zeros, scales)[0]


def awq_gemm(x, qweight, scales, qzeros, *, split_k_iters: int | None = None):
    """``x @ W`` for an AutoAWQ weight, in x's dtype (vLLM's ``awq_gemm``).

    Args:
      x: float16 or bfloat16 ``[..., K]``.
      qweight, scales, qzeros: as for :func:`awq_dequantize`; scales in x's dtype.
      split_k_iters: how many blocks share the K range of a column tile in the kernel (a tuning hint;
        results do not depend on it beyond rounding). Default: chosen from the shapes.

    Returns ``[..., N]`` in x's dtype. Up to ``AWQ_GEMM_KERNEL_MAX_M`` rows (and ``N % 32 == 0``) jaxq's
    kernel runs (on CUDA; the jnp reference elsewhere), which applies each group's zero and scale to float32 sums
    of the codes. On an sm_90 GPU (N a multiple of 128, K of 64) marlin_gemm's Hopper kernel runs from 65 rows up
    to :func:`jaxq.ops.marlin.hopper_max_rows`, reading the weight as it is stored: W rounded to x's dtype, as
    the reference does, float32 sums, a row's result the same in any batch of that range. Above,
    ``awq_dequantize`` + ``jnp.dot``. Differentiable with respect to ``x`` only.
    """
    fn = "awq_gemm"
    _check(fn, qweight, scales, qzeros, getattr(x, "dtype", None))
    wo.check_activations(fn, x, qweight.shape[0])
    if split_k_iters is not None and (not isinstance(split_k_iters, int) or split_k_iters < 1):
        raise ValueError(f"{fn}: split_k_iters must be a positive int; got {split_k_iters!r}")
    k, n = qweight.shape[0], scales.shape[1]
    hopper_from = marlin.hopper_rows_past_own_kernel(math.prod(x.shape[:-1]), k, n, scales.shape[0],
                                                     AWQ_GEMM_KERNEL_MAX_M)
    return wo.matmul(
        lambda rows: _awq_gemm(rows, qweight, qzeros, scales, split_k_hint=split_k_iters,
                               hopper_from_rows=hopper_from)[0],
        lambda: awq_dequantize(qweight, scales, qzeros),
        x, max(AWQ_GEMM_KERNEL_MAX_M, marlin.hopper_max_rows() if hopper_from else 0), n, tiles_weight=True,
    )
