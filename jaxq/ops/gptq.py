"""GPTQ (AutoGPTQ format, 2/3/4/8-bit): ``gptq_shuffle``, ``gptq_dequantize`` and ``gptq_gemm``.

Tensors (see :mod:`jaxq.formats`): ``qweight`` int32 ``[K*bits/32, N]`` packed along K, ``qzeros`` int32
``[groups, N*bits/32]`` packed along N, ``scales`` float16/bfloat16 ``[groups, N]``, ``g_idx`` int32 ``[K]``
(or empty). ``W[k, n] = (q[k, n] - zero[g, n]) * s[g, n]`` with ``zero`` the stored value plus one for v1
checkpoints (``use_v2_format=False``) and ``g`` the row's group. jaxq needs the group size ``K / groups``
to be a multiple of 32.

jaxq keeps vLLM's calling convention for act-order checkpoints:

* ``use_exllama=True``: ``qweight`` comes from :func:`gptq_shuffle` and ``g_idx`` is what vLLM stores after
  loading: empty without act-order, else the permutation ``perm = argsort(checkpoint g_idx)`` that was
  passed to :func:`gptq_shuffle`. The rows of the shuffled weight are in ``perm`` order, whose groups are
  consecutive, and ``gptq_gemm`` permutes the columns of ``x`` to match.
* ``use_exllama=False``: ``qweight`` as stored in the checkpoint and ``g_idx`` the checkpoint's group of
  every row (or empty for ``k // G``).
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

# Rows of x up to which gptq_gemm runs its own kernel; above, dequantize + XLA's dot is faster
# (measured crossover on H100, benchmarks/RESULTS.md), or on an sm_90 GPU marlin_gemm's Hopper kernel for 4-bit
# weights in exllama's layout (up to marlin.hopper_max_rows()).
GPTQ_GEMM_KERNEL_MAX_M = 64


def _slab_k(bits: int) -> int:
    """K rows of one warp step of the kernel (WeightOnlySlabK in csrc/kernels/weight_only.cu): a group
    must hold whole steps for the kernel to run."""
    return 4 * 32 * (3 if bits == 3 else 1) // bits


def _unit(bits: int) -> int:
    """Columns per whole number of qzeros words."""
    return 32 // math.gcd(32, bits)


def gptq_dequantize_reference(qweight, qzeros, scales, g_idx=None, *, bits, exllama, v2) -> jax.Array:
    """``W [K, N]`` (rows in qweight's order) in the scales' dtype, in jnp; ``g_idx=None``: groups ``k // G``."""
    words = formats.exllama_unshuffle(qweight, bits) if exllama else qweight
    q = formats.unpack_gptq(words, bits, axis=0)
    k, groups = q.shape[0], scales.shape[0]
    # A corrupt g_idx (negative, or past the last group) is clamped, as the kernels do.
    rows = jnp.arange(k) // (k // groups) if g_idx is None else jnp.clip(g_idx, 0, groups - 1)
    zeros = formats.unpack_gptq(qzeros, bits, axis=1) + (0 if v2 else 1)
    w = (q - zeros[rows]).astype(jnp.float32) * scales.astype(jnp.float32)[rows]
    return w.astype(scales.dtype)


def _weight_dims(params, q_shape, z_shape, s_shape):
    bits = params["bits"]
    groups, n = s_shape
    k = q_shape[0] * 32 // bits
    u = _unit(bits)
    zw = bits * u // 32
    n_dims = ("nb", "u")
    return (
        (("kg", "gw"), n_dims),
        (("kg",), ("nb", "zw") if zw > 1 else ("nb",)),
        (("kg",), n_dims),
        ("kg", "g"),
        n_dims,
        {"gw": (k // groups) * bits // 32, "g": k // groups, "u": u, **({"zw": zw} if zw > 1 else {})},
        {"nb": max(1, wo.KERNEL_TILE_N // u)},  # shards keep N in whole kernel tiles
    )


def _dequantize_sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    q_dims, z_dims, s_dims, k_dims, n_dims, sizes, granularity = _weight_dims(params, *operand_shapes[:3])
    return ShardingRule(
        operands=(q_dims, z_dims, s_dims, (k_dims,)),
        results=((k_dims, n_dims),),
        factor_sizes=sizes,
        # An act-order row may use any group: its shard needs every group's scales and zeros.
        replicated_factors=("kg",) if params["act_order"] else (),
        granularity=granularity,
    )


def _attributes(bits, exllama, v2, **_):
    return dict(
        format=np.int32(wo.FORMAT_GPTQ_EXLLAMA if exllama else wo.FORMAT_GPTQ),
        bits=np.int32(bits),
        zero_offset=np.int32(0 if v2 else 1),
    )


def _dequantize_shapes(qweight, qzeros, scales, g_idx, **params):
    return (jax.ShapeDtypeStruct((qweight.shape[0] * 32 // params["bits"], scales.shape[1]), scales.dtype),)


def _dequantize_reference(qweight, qzeros, scales, g_idx, *, bits, exllama, v2, act_order):
    return (gptq_dequantize_reference(qweight, qzeros, scales, g_idx if act_order else None,
                                      bits=bits, exllama=exllama, v2=v2),)


_gptq_dequantize = Op(
    "gptq_dequantize",
    shapes=_dequantize_shapes,
    reference=_dequantize_reference,
    sharding_rule=_dequantize_sharding_rule,
    ffi_target="jaxq_weight_dequantize_g_idx",
    batching_rule=map_batching,  # stacked weights: one dequantization each
    ffi_attributes=lambda act_order, **params: dict(_attributes(**params), act_order=bool(act_order)),
)


def _sequential_groups(k: int, groups: int) -> jax.Array:
    return (jnp.arange(k, dtype=jnp.int32) // (k // groups)).astype(jnp.int32)


_gptq_gemm = wo.gemm_op(
    "gptq_gemm",
    dequantize=lambda qweight, qzeros, scales, **params: gptq_dequantize_reference(qweight, qzeros, scales, **params),
    weight_rule=_weight_dims,
    slab_k=lambda bits, **params: _slab_k(bits),
    ffi_attributes=_attributes,
    dequantize_op=lambda qweight, qzeros, scales, **params: _gptq_dequantize(
        qweight, qzeros, scales, _sequential_groups(qweight.shape[0] * 32 // params["bits"], scales.shape[0]),
        act_order=False, **params)[0],
)


def _check(fn, qweight, qzeros, scales, g_idx, bits, x_dtype=None):
    if bits not in formats.GPTQ_BITS:
        raise ValueError(f"{fn}: bits must be one of {formats.GPTQ_BITS}; got {bits!r}")
    wo.check_int32(fn, "qweight", qweight, 2)
    wo.check_int32(fn, "qzeros", qzeros, 2)
    wo.check_int32(fn, "g_idx", g_idx, 1)
    if (qweight.shape[0] * 32) % bits:
        raise ValueError(f"{fn}: qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit rows")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = qzeros.shape[0]
    wo.group_size_of(fn, k, groups)
    if n % _unit(bits) or qzeros.shape[1] != n * bits // 32:
        raise ValueError(f"{fn}: qzeros {tuple(qzeros.shape)} does not pack N={n} {bits}-bit zeros "
                         f"(N must be a multiple of {_unit(bits)} and qzeros [groups, N*bits/32])")
    wo.check_scales(fn, scales, x_dtype, (groups, n))
    if g_idx.shape[0] not in (0, k):
        raise ValueError(f"{fn}: g_idx must have K={k} entries or none; got {g_idx.shape[0]}")
    return k, n


def gptq_shuffle(qweight, perm, bits: int):
    """The exllama layout of a GPTQ ``qweight`` (vLLM's ``gptq_shuffle``, returning a new array).

    Args:
      qweight: int32 ``[K*bits/32, N]`` as stored by AutoGPTQ.
      perm: int32 ``[K]`` row permutation (vLLM passes ``argsort(g_idx)`` for act-order checkpoints) or
        an empty array.
      bits: 2, 3, 4 or 8.

    Returns int32 ``[K*bits/32, N]``: rows reordered to ``perm`` (row ``i`` holds original row
    ``perm[i]``), values interleaved within words as exllama's kernels expect.
    """
    fn = "gptq_shuffle"
    if bits not in formats.GPTQ_BITS:
        raise ValueError(f"{fn}: bits must be one of {formats.GPTQ_BITS}; got {bits!r}")
    wo.check_int32(fn, "qweight", qweight, 2)
    wo.check_int32(fn, "perm", perm, 1)
    k = qweight.shape[0] * 32 // bits
    if (qweight.shape[0] * 32) % bits or k % 32:
        raise ValueError(f"{fn}: qweight {tuple(qweight.shape)} must hold a multiple of 32 rows of {bits}-bit values")
    if perm.shape[0] not in (0, k):
        raise ValueError(f"{fn}: perm must have K={k} entries or none; got {perm.shape[0]}")
    values = formats.unpack_gptq(qweight, bits, axis=0)
    if perm.shape[0]:
        values = values[perm]
    return formats.exllama_shuffle(values, bits)


def _permuted(g_idx, exllama):
    """(act_order for the dequantizer, permutation of x's columns) under vLLM's convention."""
    if not g_idx.shape[0]:
        return False, None
    return (False, g_idx) if exllama else (True, None)


def gptq_dequantize(qweight, qzeros, scales, g_idx, *, bits: int, use_v2_format: bool = False,
                    use_exllama: bool = False):
    """Dequantizes GPTQ tensors to ``W [K, N]`` (rows in the checkpoint's order) in the scales' dtype.

    Arguments as for :func:`gptq_gemm` (without ``x``)."""
    k, n = _check("gptq_dequantize", qweight, qzeros, scales, g_idx, bits)
    act_order, perm = _permuted(g_idx, use_exllama)
    groups = g_idx if act_order else _sequential_groups(k, scales.shape[0])
    w = _gptq_dequantize(qweight, qzeros, scales, groups, bits=bits, exllama=bool(use_exllama),
                         v2=bool(use_v2_format), act_order=act_order)[0]
    if perm is not None:  # rows are in perm order: put row perm[i] back at perm[i]
        w = jnp.zeros_like(w).at[perm].set(w)
    return w


def gptq_gemm(x, qweight, qzeros, scales, g_idx, *, use_exllama: bool, use_v2_format: bool = False,
              bits: int = 4):
    """``x @ W`` for a GPTQ weight, in x's dtype (vLLM's ``gptq_gemm``).

    Args:
      x: float16 or bfloat16 ``[..., K]``.
      qweight: int32 ``[K*bits/32, N]``, shuffled by :func:`gptq_shuffle` when ``use_exllama``.
      qzeros: int32 ``[groups, N*bits/32]``.
      scales: ``[groups, N]`` in x's dtype.
      g_idx: int32 ``[K]`` or empty; see the module docstring for what it means with and without exllama.
      use_exllama: whether ``qweight`` is in the exllama layout. Same numbers either way.
      use_v2_format: zeros stored as they are (v2) rather than minus one (v1).
      bits: 2, 3, 4 or 8.

    Returns ``[..., N]`` in x's dtype. Up to ``GPTQ_GEMM_KERNEL_MAX_M`` rows jaxq's kernel runs (on CUDA;
    the jnp reference elsewhere) where it tiles the weight: ``N % 32 == 0`` and groups of at least 64
    (2-bit) or 128 (3-bit) rows; it multiplies the codes and applies each group's zero and scale to the float32
    sums. On an sm_90 GPU, 4-bit weights in exllama's layout (N a multiple of 128, K of 64) run marlin_gemm's
    Hopper kernel from 65 rows up to :func:`jaxq.ops.marlin.hopper_max_rows` (the weight as it is stored): W
    rounded to x's dtype, as the reference does, float32 sums, a row's result the same in any batch of that
    range. Otherwise, and for act-order without exllama (whose rows pick groups at random), dequantize +
    ``jnp.dot``. Differentiable with respect to ``x`` only.
    """
    fn = "gptq_gemm"
    k, n = _check(fn, qweight, qzeros, scales, g_idx, bits, getattr(x, "dtype", None))
    wo.check_activations(fn, x, k)
    act_order, perm = _permuted(g_idx, use_exllama)
    params = dict(bits=bits, exllama=bool(use_exllama), v2=bool(use_v2_format))
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)
    hopper_from = 0  # the first row from which the kernel call runs the Hopper kernel
    if bits == 4 and use_exllama:  # act-order in exllama's layout: x's columns were permuted above
        hopper_from = marlin.hopper_rows_past_own_kernel(math.prod(x.shape[:-1]), k, n, scales.shape[0],
                                                         GPTQ_GEMM_KERNEL_MAX_M)
    max_m = -1 if act_order else max(GPTQ_GEMM_KERNEL_MAX_M, marlin.hopper_max_rows() if hopper_from else 0)
    return wo.matmul(
        lambda rows: _gptq_gemm(rows, qweight, qzeros, scales, **params, hopper_from_rows=hopper_from)[0],
        lambda: _gptq_dequantize(qweight, qzeros, scales, g_idx if act_order else _sequential_groups(k, scales.shape[0]),
                                 act_order=act_order, **params)[0],
        x, max_m, n, tiles_weight=(k // scales.shape[0]) % _slab_k(bits) == 0,
    )
