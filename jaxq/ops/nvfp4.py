"""NVFP4 activation quantization, ``scaled_fp4_quant``, and the helpers to read its outputs back.

Bit-compatible with vLLM's ``scaled_fp4_quant`` layout. Per block of 16 consecutive elements of a row:

* ``sf = global_scale * (amax_block * RCP6)`` with ``RCP6 = float32(1/6)``, rounded to e4m3 (nearest
  even, saturating at 448): the stored block scale;
* ``out_scale = 1 / (float(sf_e4m3) * (1 / global_scale))``, or 0 when the block scale is 0;
* each value ``x * out_scale`` rounded to e2m1 (nearest even, saturating at 6; magnitudes 0, .5, 1, 1.5,
  2, 3, 4, 6; the sign bit follows the value, so small negatives give -0), two per byte, element ``2i`` in
  the low nibble.

vLLM computes the three reciprocals with ``rcp.approx.ftz``; jaxq uses IEEE reciprocals in the same
order (as vLLM's own test reference does), in the kernel and the reference alike. vLLM runs this only on
Blackwell, where the e2m1 conversion is one instruction; jaxq's kernel converts in software and runs on
Hopper (and any architecture the package was built for).

Block scales are written in the 128x4 swizzled tensor-core layout ``[ceil(M/128), ceil(K/64), 32, 4, 4]``,
returned as vLLM returns them: ``[round_up(M, 128), round_up(K/16, 4)]`` float8_e4m3fn, padding zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import _numerics
from jaxq._op import Op, ShardingRule

BLOCK = 16
_RCP6 = np.float32(1.0) / np.float32(6.0)
# e2m1 rounding thresholds between neighbouring magnitudes; ">" or ">=" puts each midpoint on the even code.
_E2M1_UP = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _e2m1_codes(v: jax.Array) -> jax.Array:
    a = jnp.abs(v)
    magnitude = sum(((a >= t) if inclusive else (a > t)).astype(jnp.uint8) for t, inclusive in _E2M1_UP)
    sign = (jax.lax.bitcast_convert_type(v, jnp.uint32) >> 31).astype(jnp.uint8)
    return magnitude | (sign << 3)


def _tile_order(lead: int) -> tuple[int, ...]:
    """Axis order between [..., tile, inner, outer, k_tile, k_inner] (row-major scales) and
    [..., tile, k_tile, outer, inner, k_inner] (swizzled); it is its own inverse."""
    return (*range(lead), lead, lead + 3, lead + 2, lead + 1, lead + 4)


def swizzle_block_scales(scales: jax.Array) -> jax.Array:
    """``[..., M, K/16]`` block scales -> vLLM's swizzled ``[..., round_up(M,128), round_up(K/16,4)]``."""
    *lead, m, k = scales.shape
    mp, kp = _numerics.round_up(m, 128), _numerics.round_up(k, 4)
    padded = jnp.pad(scales, [(0, 0)] * len(lead) + [(0, mp - m), (0, kp - k)])
    # row = tile*128 + inner*32 + outer; column = k_tile*4 + k_inner  ->  [tile, k_tile, outer, inner, k_inner]
    tiles = padded.reshape(*lead, mp // 128, 4, 32, kp // 4, 4)
    return tiles.transpose(_tile_order(len(lead))).reshape(*lead, mp, kp)


def unswizzle_block_scales(swizzled: jax.Array, m: int, k: int) -> jax.Array:
    """Inverse of :func:`swizzle_block_scales`: ``[..., M_pad, K_pad]`` -> ``[..., m, k // 16]``
    (``m`` rows and ``k`` elements per row of the quantized tensor)."""
    *lead, mp, kp = swizzled.shape
    if k % BLOCK or mp != _numerics.round_up(m, 128) or kp != _numerics.round_up(k // BLOCK, 4):
        raise ValueError(f"unswizzle_block_scales: scales {tuple(swizzled.shape)} do not fit m={m}, k={k}")
    tiles = swizzled.reshape(*lead, mp // 128, kp // 4, 32, 4, 4)
    return tiles.transpose(_tile_order(len(lead))).reshape(*lead, mp, kp)[..., :m, : k // BLOCK]


def _shapes(x, global_scale):
    *lead, m, k = x.shape
    return (
        jax.ShapeDtypeStruct((*lead, m, k // 2), jnp.uint8),
        jax.ShapeDtypeStruct((*lead, _numerics.round_up(m, 128), _numerics.round_up(k // BLOCK, 4)), jnp.float8_e4m3fn),
    )


def _reference(x, global_scale):
    *lead, m, k = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, m, k // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    gs = _numerics.opaque(global_scale[..., None, None], amax.shape)
    scale_e4m3 = _numerics.to_e4m3_saturating(gs * (amax * _RCP6))
    scale = scale_e4m3.astype(jnp.float32)
    reciprocal_gs = _numerics.divide(np.float32(1), gs)
    out_scale = jnp.where(scale != 0, _numerics.divide(np.float32(1), scale * reciprocal_gs), np.float32(0))
    codes = _e2m1_codes(blocks * out_scale[..., None]).reshape(*lead, m, k // 2, 2)
    q = codes[..., 0] | (codes[..., 1] << 4)
    return q, swizzle_block_scales(scale_e4m3)


def _sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    x_shape = operand_shapes[0]
    batch = tuple((f"b{i}",) for i in range(len(x_shape) - 2))
    m_scale = ("m",) if result_shapes[1][-2] == x_shape[-2] else ("m_padded",)
    # A column split of the swizzled scales would cut its 512-byte tiles (four scale columns of 128 rows
    # interleaved), so the hidden dimension is never sharded; tokens are, in whole 128-row tiles.
    return ShardingRule(
        operands=((*batch, ("m",), ("k", "s")), batch),
        results=((*batch, ("m",), ("k", "h")), (*batch, m_scale, ("k_padded",))),
        factor_sizes={"s": BLOCK, "h": BLOCK // 2},
        replicated_factors=("k",),
        granularity={"m": 128},
    )


_scaled_fp4_quant = Op(
    "scaled_fp4_quant",
    shapes=_shapes,
    reference=_reference,
    sharding_rule=_sharding_rule,
    ffi_target="jaxq_scaled_fp4_quant",
)


def scaled_fp4_quant(x, global_scale):
    """Quantizes ``x`` to NVFP4 (e2m1 values with e4m3 scales per 16-element block).

    Args:
      x: ``[..., K]`` float16 or bfloat16, ``K % 16 == 0``; leading dims are flattened into ``M`` rows
        (as vLLM does).
      global_scale: float32 scalar, shape ``()`` or ``(1,)``, typically ``448 * 6 / amax(x)``; must be
        positive (not checked: it is a traced value).

    Returns:
      ``(q, block_scales)``: ``q`` uint8 ``[M, K/2]`` (two e2m1 codes per byte, element ``2i`` in the low
      nibble); ``block_scales`` float8_e4m3fn ``[round_up(M,128), round_up(K/16,4)]`` in the swizzled
      layout (:func:`unswizzle_block_scales` reads it back, :func:`nvfp4_dequantize` reconstructs ``x``).
    """
    fn = "scaled_fp4_quant"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: x must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise TypeError(f"{fn}: x must be float16 or bfloat16; got {jnp.dtype(x.dtype).name}")
    if x.ndim < 1 or x.shape[-1] % BLOCK != 0:
        raise ValueError(f"{fn}: the last dimension of x {tuple(x.shape)} must be a multiple of {BLOCK}")
    if not hasattr(global_scale, "shape") or jnp.dtype(global_scale.dtype) != jnp.dtype(jnp.float32):
        raise TypeError(f"{fn}: global_scale must be a float32 array of shape () or (1,)")
    if tuple(global_scale.shape) not in ((), (1,)):
        raise ValueError(f"{fn}: global_scale must have shape () or (1,); got {tuple(global_scale.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    return _scaled_fp4_quant(rows, global_scale.reshape(()))


def nvfp4_dequantize(q, block_scales, global_scale, *, out_dtype=jnp.float32):
    """Reconstructs ``[M, K]`` values from :func:`scaled_fp4_quant`'s outputs:
    ``e2m1(q) * float(block_scale) / global_scale``."""
    m, half_k = q.shape
    scales = unswizzle_block_scales(block_scales, m, 2 * half_k).astype(jnp.float32)
    codes = jnp.stack([q & 0xF, q >> 4], axis=-1).reshape(m, 2 * half_k)
    values = jnp.asarray(E2M1_VALUES)[codes].reshape(m, -1, BLOCK)
    gs = jnp.asarray(global_scale, jnp.float32).reshape(())
    return (values * (scales / gs)[..., None]).reshape(m, 2 * half_k).astype(out_dtype)
