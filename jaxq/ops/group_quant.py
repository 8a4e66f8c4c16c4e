"""Per-token-group 8-bit quantization: ``per_token_group_fp8_quant`` (fp8 e4m3fn or int8 output) and
``per_token_group_fp8_quant_packed`` (UE8M0 exponents packed four per int32 for DeepGEMM-style GEMMs).

Bit-compatible with vLLM's ``per_token_group_quant_8bit`` kernels. For each row of ``x[..., K]`` and each
group of ``G = group_size`` consecutive elements:

* ``amax = max(eps, max|x_g|)``, ``s = amax / Q_MAX`` in float32 (``Q_MAX`` 448 for e4m3fn, 127 for int8);
* with UE8M0 scales, ``s <- 2**ceil(log2(max(|s|, 1e-10)))``, computed from the float32 bits;
* ``q = clip(x / s, -Q_MAX, Q_MAX)`` converted to e4m3fn with round-to-nearest-even, or to int8 by
  truncation toward zero (vLLM's C cast). The division is a true IEEE division, as in vLLM.

NaN inputs give unspecified results. Differentiation through these ops raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import _numerics
from jaxq._op import Op, ShardingRule

ROW_MAJOR, COLUMN_MAJOR, PACKED_UE8M0 = 0, 1, 2  # == jaxq::ScaleLayout in csrc/kernels/group_quant.h
_Q_MAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.int8): 127.0}
_INPUT_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32))
_TMA_ROW_ALIGNMENT = 4  # DeepGEMM's TMA needs the scale columns 16-byte aligned: rows padded to 4


def _shapes(x, *, group_size, eps, scale_layout, ue8m0, out_dtype, row_alignment):
    groups = x.shape[-1] // group_size
    q = jax.ShapeDtypeStruct(x.shape, out_dtype)
    if scale_layout == ROW_MAJOR:
        return q, jax.ShapeDtypeStruct((*x.shape[:-1], groups), jnp.float32)
    padded_rows = _numerics.round_up(x.shape[-2], row_alignment)
    if scale_layout == COLUMN_MAJOR:
        return q, jax.ShapeDtypeStruct((*x.shape[:-2], groups, padded_rows), jnp.float32)
    return q, jax.ShapeDtypeStruct((*x.shape[:-2], -(-groups // 4), padded_rows), jnp.int32)


def _pad_last(a, size):
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size - a.shape[-1])])


def _reference(x, *, group_size, eps, scale_layout, ue8m0, out_dtype, row_alignment):
    q_max = np.float32(_Q_MAX[jnp.dtype(out_dtype)])
    groups = x.shape[-1] // group_size
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, group_size)
    scale = _numerics.divide(jnp.maximum(jnp.max(jnp.abs(xg), axis=-1), np.float32(eps)), q_max)
    exponent = None
    if ue8m0 or scale_layout == PACKED_UE8M0:
        exponent = _numerics.ue8m0_exponent(scale)
        scale = _numerics.exponent_to_float(exponent)
    clipped = jnp.clip(_numerics.divide(xg, scale[..., None]), -q_max, q_max).reshape(x.shape)
    q = clipped.astype(out_dtype)  # e4m3fn: round to nearest even; int8: truncation toward zero

    if scale_layout == ROW_MAJOR:
        return q, scale
    padded_rows = _numerics.round_up(x.shape[-2], row_alignment)
    if scale_layout == COLUMN_MAJOR:
        return q, _pad_last(jnp.swapaxes(scale, -1, -2), padded_rows)
    words = -(-groups // 4)
    exponent = _pad_last(exponent, 4 * words).reshape(*exponent.shape[:-1], words, 4)
    packed = jnp.sum(exponent << jnp.array([0, 8, 16, 24], jnp.uint32), axis=-1, dtype=jnp.uint32)
    packed = jax.lax.bitcast_convert_type(packed, jnp.int32)
    return q, _pad_last(jnp.swapaxes(packed, -1, -2), padded_rows)


def _sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    (x_shape,) = operand_shapes
    group_size, layout = params["group_size"], params["scale_layout"]
    groups = x_shape[-1] // group_size
    if layout == ROW_MAJOR:
        rows = tuple((f"r{i}",) for i in range(len(x_shape) - 1))
        x = (*rows, ("g", "e"))
        return ShardingRule(operands=(x,), results=(x, (*rows, ("g",))), factor_sizes={"e": group_size})

    batch = tuple((f"b{i}",) for i in range(len(x_shape) - 2))
    # Padded scale rows only line up with x's rows when no padding is needed; shards then need whole
    # multiples of the alignment so that each shard's padding is empty too.
    padded_rows = result_shapes[1][-1]
    m_scale = ("m",) if padded_rows == x_shape[-2] else ("m_padded",)
    granularity = {"m": params["row_alignment"]}
    if layout == COLUMN_MAJOR:
        x = (*batch, ("m",), ("g", "e"))
        return ShardingRule(
            operands=(x,), results=(x, (*batch, ("g",), m_scale)),
            factor_sizes={"e": group_size}, granularity=granularity,
        )
    if groups % 4 == 0:  # shards may hold whole int32 words of four groups
        x = (*batch, ("m",), ("w", "f", "e"))
        return ShardingRule(
            operands=(x,), results=(x, (*batch, ("w",), m_scale)),
            factor_sizes={"f": 4, "e": group_size}, granularity=granularity,
        )
    x = (*batch, ("m",), ("g", "e"))
    return ShardingRule(
        operands=(x,), results=(x, (*batch, ("w",), m_scale)),
        factor_sizes={"e": group_size}, granularity=granularity, replicated_factors=("g",),
    )


_per_token_group_quant = Op(
    "per_token_group_fp8_quant",
    shapes=_shapes,
    reference=_reference,
    sharding_rule=_sharding_rule,
    ffi_target="jaxq_per_token_group_quant",
    ffi_attributes=lambda *, group_size, eps, scale_layout, ue8m0, out_dtype, row_alignment: dict(
        group_size=np.int64(group_size), eps=np.float32(eps), scale_layout=np.int32(scale_layout), ue8m0=bool(ue8m0)
    ),
)


def _check_common(x, group_size, eps, allowed_dtypes, fn):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: x must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in allowed_dtypes:
        names = ", ".join(d.name for d in allowed_dtypes)
        raise TypeError(f"{fn}: x must have dtype {names}; got {jnp.dtype(x.dtype).name}")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"{fn}: group_size must be a positive int; got {group_size!r}")
    if x.ndim < 1 or x.shape[-1] % group_size != 0:
        raise ValueError(f"{fn}: the last dimension of x {tuple(x.shape)} must be a multiple of group_size {group_size}")
    if (group_size * jnp.dtype(x.dtype).itemsize) % 16 != 0:
        raise ValueError(
            f"{fn}: group_size {group_size} x {jnp.dtype(x.dtype).itemsize}-byte elements must be a multiple of 16 "
            "bytes (the kernels read whole 16-byte vectors per group)"
        )
    if not isinstance(eps, (float, int, np.floating)) or not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be a positive finite float; got {eps!r}")


def per_token_group_fp8_quant(
    x,
    group_size: int,
    *,
    eps: float = 1e-10,
    column_major_scales: bool = False,
    tma_aligned_scales: bool = False,
    scale_ue8m0: bool = False,
    out_dtype=jnp.float8_e4m3fn,
):
    """Quantizes each group of ``group_size`` consecutive elements of the last axis to 8 bits.

    Args:
      x: ``[..., M, K]`` (or ``[K]`` with row-major scales) float16, bfloat16 or float32; ``K`` a
        multiple of ``group_size``, and ``group_size * itemsize`` a multiple of 16 bytes.
      group_size: elements per group ``G`` (vLLM/DeepSeek use 128).
      eps: floor of each group's absolute maximum (keeps all-zero groups finite); must be > 0.
      column_major_scales: return the scales in vLLM's column-major storage (see Returns).
      tma_aligned_scales: with column-major scales, pad ``M`` to a multiple of 4 (vLLM's TMA-aligned
        layout for DeepGEMM); padding is zero.
      scale_ue8m0: round each scale up to a power of two (UE8M0, for Blackwell-style GEMMs).
      out_dtype: ``jnp.float8_e4m3fn`` (default) or ``jnp.int8`` (vLLM's per_token_group_quant_int8,
        which truncates toward zero).

    Returns:
      ``(q, scales)``: ``q`` has x's shape and ``out_dtype``, ``x ~= q * scale`` per group. ``scales`` is
      float32 ``[..., K/G]`` (row-major), or with ``column_major_scales`` the storage array
      ``[..., K/G, M_pad]`` whose ``[..., j, m]`` entry is the scale of group ``j`` of row ``m`` (vLLM
      returns its transposed view ``[..., M, K/G]``; here ``scales[..., :M].swapaxes(-1, -2)``).

    Runs the CUDA kernel on NVIDIA GPUs (any architecture the package was built for), the jnp reference
    elsewhere; both give the same bits.
    """
    fn = "per_token_group_fp8_quant"
    _check_common(x, group_size, eps, _INPUT_DTYPES, fn)
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in _Q_MAX:
        raise TypeError(f"{fn}: out_dtype must be float8_e4m3fn or int8; got {out_dtype.name}")
    if tma_aligned_scales and not column_major_scales:
        raise ValueError(f"{fn}: tma_aligned_scales=True needs column_major_scales=True")
    if column_major_scales and x.ndim < 2:
        raise ValueError(f"{fn}: column_major_scales needs x with at least 2 dims [..., M, K]; got {tuple(x.shape)}")
    return _per_token_group_quant(
        x,
        group_size=int(group_size),
        eps=float(eps),
        scale_layout=COLUMN_MAJOR if column_major_scales else ROW_MAJOR,
        ue8m0=bool(scale_ue8m0),
        out_dtype=out_dtype,
        row_alignment=_TMA_ROW_ALIGNMENT if tma_aligned_scales else 1,
    )


def per_token_fp8_quant_xla(x, *, eps: float = 1e-10):
    """``per_token_group_fp8_quant(x, K)`` (one group per row, row-major scales) as XLA's own ops: the same
    bits, no kernel. Its row maximum is an XLA reduction, so with ``x`` sharded along K (the input of a
    row-parallel layer) XLA adds the shards' maxima with an all-reduce of one float per row; the op, whose
    group is the whole row, would have the whole row gathered first."""
    _check_common(x, x.shape[-1], eps, _INPUT_DTYPES, "per_token_fp8_quant_xla")
    return _reference(x, group_size=x.shape[-1], eps=float(eps), scale_layout=ROW_MAJOR, ue8m0=False,
                      out_dtype=jnp.dtype(jnp.float8_e4m3fn), row_alignment=1)


def per_token_group_fp8_quant_packed(x, group_size: int, *, eps: float = 1e-10):
    """fp8 per-token-group quantization with UE8M0 scales packed for DeepGEMM (vLLM's
    ``per_token_group_quant_fp8_packed_for_deepgemm``).

    Args:
      x: ``[..., K]`` float16 or bfloat16; all leading dims are flattened into ``MN`` rows, as vLLM does.
        ``K`` a multiple of ``group_size``; ``group_size * 2`` a multiple of 16 bytes (vLLM accepts only 32
        and 128; jaxq accepts those and any other size that fits, with the same layout).
      group_size: elements per group ``G``.
      eps: floor of each group's absolute maximum; must be > 0.

    Returns:
      ``(q, packed_scales)``: ``q`` float8_e4m3fn with x's shape, quantized with the power-of-two scales.
      ``packed_scales`` int32 ``[ceil(K/G/4), round_up(MN, 4)]``: the storage of vLLM's column-major
      ``[MN, ceil(K/G/4)]`` tensor (strides ``(1, round_up(MN, 4))``). Byte ``j % 4`` (little-endian) of word
      ``[j // 4, m]`` is the UE8M0 exponent of group ``j`` of row ``m``; padding bytes and rows are zero.
    """
    fn = "per_token_group_fp8_quant_packed"
    _check_common(x, group_size, eps, _INPUT_DTYPES[:2], fn)
    rows = x.reshape(-1, x.shape[-1])
    q, packed = _per_token_group_quant(
        rows,
        group_size=int(group_size),
        eps=float(eps),
        scale_layout=PACKED_UE8M0,
        ue8m0=True,
        out_dtype=jnp.dtype(jnp.float8_e4m3fn),
        row_alignment=_TMA_ROW_ALIGNMENT,
    )
    return q.reshape(x.shape), packed
