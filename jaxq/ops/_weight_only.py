"""What the weight-only (W4A16-style) GEMM families, AWQ and GPTQ, share: the GEMM primitive built from a
family's dequantization reference and sharding rule, its workspace, gradient and batching, and the
trace-time choice between the CUDA kernel and dequantize + XLA dot.

The kernel (``csrc/kernels/weight_only.cu``) streams the packed weight once per 16 rows of ``x``,
multiplies the integer codes (exact in x's dtype) on tensor cores with float32 accumulation and applies
each group's zero and scale to those sums in float32, so ``W`` is never rounded to x's dtype (the
reference rounds it; results agree within the GPU tests' tolerances). K is split over warps and blocks,
and the partial sums are added in a fixed order (deterministic).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxq._op import Op, ShardingRule, map_batching

FORMAT_AWQ, FORMAT_GPTQ, FORMAT_GPTQ_EXLLAMA = 0, 1, 2  # == jaxq::WeightFormat in csrc/kernels/weight_only.h
ACTIVATION_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
KERNEL_TILE_N = 32  # the kernel handles N in multiples of this (and K in multiples of 32)
KERNEL_ROWS_PER_PASS = 16  # rows of x per pass over the weight
_WARPS_PER_BLOCK = 4
_WARP_COLUMNS = 128
_MIN_STEPS_PER_WARP = 4  # below this the cp.async pipeline's fill and the reduction dominate a block
_H100_SMS = 132


@functools.cache
def _sm_count() -> int:
    """Streaming multiprocessors of the first GPU (an H100's count where there is none: the split then only
    shapes the workspace of a reference lowering)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", _H100_SMS))
    except RuntimeError:
        return _H100_SMS


def split_k(m: int, n: int, k: int, slab_k: int, hint: int | None = None, *, sm_count: int | None = None) -> int:
    """Blocks that share the K range of one column tile.

    Measured on the H100 (benchmarks/history/2026-11-24-h100.md, "K split, measured"): splitting costs more
    than waves suggest (the partial sums' round trip, the arrival counters' memset, the last block's
    reduction, and blocks of one tile reading distant rows of the weight instead of sweeping K together), so
    K is split only when the column tiles alone leave SMs idle: not at all from 0.8 tiles per SM, else into
    the fewest splits that give 1.5 blocks per SM; never so many that a warp gets fewer than a few steps.
    ``hint`` (e.g. awq_gemm's ``split_k_iters``) overrides the choice (still capped at one step per warp)."""
    tiles = -(-n // _WARP_COLUMNS) * -(-m // KERNEL_ROWS_PER_PASS)
    steps = max(1, k // (slab_k * _WARPS_PER_BLOCK))
    if hint:
        return int(max(1, min(hint, steps)))
    sms = sm_count or _sm_count()
    wanted = 1 if tiles >= 0.8 * sms else -(-3 * sms // (2 * tiles))
    return int(max(1, min(wanted, steps // _MIN_STEPS_PER_WARP)))


def gemm_workspace_words(m: int, n: int, splits: int) -> int:
    """uint32 words of the kernel's workspace: float32 partial sums per split (none without a split),
    then one arrival counter per (column tile, row pass)."""
    counters = -(-n // _WARP_COLUMNS) * -(-m // KERNEL_ROWS_PER_PASS)
    return (splits * m * n if splits > 1 else 0) + counters


def dot_f32(x, w) -> jax.Array:
    """``x @ w`` accumulated in float32, rounded once to x's dtype (the kernels' numerics)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def gemm_batching(op: Op, args, dims, **params):
    """vmap over x folds into its rows; over weights (stacked layers or experts) maps one by one."""
    x, *weights = args
    x_dim, *weight_dims = dims
    if all(d is None for d in weight_dims):
        x = jnp.moveaxis(x, x_dim, 0)
        out = op.bind(x.reshape(-1, x.shape[-1]), *weights, **params)[0]
        return (out.reshape(*x.shape[:-1], out.shape[-1]),), (0,)
    return map_batching(op, args, dims, **params)


def gemm_op(
    name: str,
    *,
    dequantize: Callable,
    weight_rule: Callable,
    slab_k: Callable,
    ffi_attributes: Callable,
    dequantize_op: Callable,
) -> Op:
    """The GEMM primitive of one family.

    Args:
      dequantize: ``(qweight, qzeros, scales, **params) -> W [K, N]`` in jnp (the family's reference).
      weight_rule: ``(params, qweight, qzeros, scales shapes) -> (dims of qweight, qzeros, scales, dims of K,
        dims of N, factor_sizes, granularity)`` for the sharding rule.
      slab_k: ``(**params) -> K rows a warp step of the kernel covers`` (for the split heuristic).
      dequantize_op: ``(qweight, qzeros, scales, **params) -> W`` on the device (the gradient uses it).
    """

    def shapes(x, qweight, qzeros, scales, **params):
        return (jax.ShapeDtypeStruct((x.shape[0], scales.shape[-1]), x.dtype),)

    # hopper_from_rows (0 or the first row from which the CUDA handler runs marlin_gemm's Hopper kernel instead
    # of the family's own) picks a kernel only: the reference and the gradient do not see it.
    def reference(x, qweight, qzeros, scales, hopper_from_rows, **params):
        return (dot_f32(x, dequantize(qweight, qzeros, scales, **params)),)

    def workspace(x, qweight, qzeros, scales, **params):
        m, n = x.shape[0], scales.shape[-1]
        splits = split_k(m, n, x.shape[1], slab_k(**params), params.get("split_k_hint"))
        return jax.ShapeDtypeStruct((gemm_workspace_words(m, n, splits),), jnp.uint32)

    def sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
        q_dims, z_dims, s_dims, k_dims, n_dims, sizes, granularity = weight_rule(params, *operand_shapes[1:])
        return ShardingRule(
            operands=((("m",), k_dims), q_dims, z_dims, s_dims),
            results=((("m",), n_dims),),
            factor_sizes=sizes,
            reduction_factors=("kg",),
            granularity=granularity,
        )

    def vjp(args, cotangents, hopper_from_rows, **params):
        x, qweight, qzeros, scales = args
        (dy,) = cotangents
        w = dequantize_op(qweight, qzeros, scales, **params)
        return dot_f32(dy.astype(x.dtype), w.T), None, None, None

    return Op(
        name,
        shapes=shapes,
        reference=reference,
        sharding_rule=sharding_rule,
        ffi_target="jaxq_weight_only_gemm",
        ffi_attributes=lambda hopper_from_rows, **params: dict(ffi_attributes(**params),
                                                               hopper_from_rows=np.int64(hopper_from_rows)),
        batching_rule=gemm_batching,
        vjp=vjp,
        workspace=workspace,
        operand_names=("x", "qweight", "qzeros", "scales"),
        grad_operands=(0,),
    )


def check_activations(fn: str, x, k: int):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: x must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(f"{fn}: x must be float16 or bfloat16; got {jnp.dtype(x.dtype).name}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x {tuple(x.shape)} must end in K={k} (the weight's input dimension)")


def check_int32(fn: str, name: str, a, rank: int):
    if not hasattr(a, "dtype") or jnp.dtype(a.dtype) != jnp.dtype(jnp.int32):
        raise TypeError(f"{fn}: {name} must be an int32 array; got {getattr(a, 'dtype', type(a).__name__)}")
    if a.ndim != rank:
        raise ValueError(f"{fn}: {name} must have rank {rank}; got shape {tuple(a.shape)}")


def check_scales(fn: str, scales, x_dtype, shape):
    if x_dtype is not None and jnp.dtype(x_dtype) not in ACTIVATION_DTYPES:
        raise TypeError(f"{fn}: x must be float16 or bfloat16; got {jnp.dtype(x_dtype).name}")
    if not hasattr(scales, "dtype") or jnp.dtype(scales.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(f"{fn}: scales must be float16 or bfloat16; got {getattr(scales, 'dtype', None)}")
    if x_dtype is not None and jnp.dtype(scales.dtype) != jnp.dtype(x_dtype):
        raise TypeError(f"{fn}: scales ({jnp.dtype(scales.dtype).name}) must have x's dtype ({jnp.dtype(x_dtype).name})")
    if tuple(scales.shape) != tuple(shape):
        raise ValueError(f"{fn}: scales must have shape {tuple(shape)}; got {tuple(scales.shape)}")


def group_size_of(fn: str, k: int, groups: int) -> int:
    if groups <= 0 or k % groups:
        raise ValueError(f"{fn}: {groups} groups do not divide K={k}")
    g = k // groups
    if g % 32:
        raise ValueError(f"{fn}: the group size K/groups = {g} must be a multiple of 32")
    return g


def matmul(fn_kernel: Callable, fn_dequantize: Callable, x, max_m: int, n: int, tiles_weight: bool):
    """``x[..., K] @ W`` with the kernel for up to ``max_m`` rows (where it tiles the weight: N a
    multiple of 32, groups whole warp steps), else dequantize + XLA's dot.

    The choice is made here, at trace time, from static shapes; ``max_m`` is the family's measured
    crossover (see benchmarks/RESULTS.md)."""
    rows = x.reshape(-1, x.shape[-1])
    if is_kernel_path(rows.shape[0], n, max_m, tiles_weight):
        out = fn_kernel(rows)
    else:
        out = jnp.dot(rows, fn_dequantize())
    return out.reshape(*x.shape[:-1], n)


def is_kernel_path(m: int, n: int, max_m: int, tiles_weight: bool = True) -> bool:
    return m <= max_m and n % KERNEL_TILE_N == 0 and tiles_weight
