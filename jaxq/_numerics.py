"""Bit-level numeric helpers shared by the references (jnp) of several op families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8_E4M3_MAX = 448.0


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def opaque(x, shape) -> jax.Array:
    """``x`` broadcast to ``shape`` behind an optimization barrier.

    XLA's algebraic simplifier rewrites arithmetic on broadcasts: ``x / broadcast(y)`` becomes
    ``x * broadcast(1 / y)`` and products with broadcast operands are reassociated, each off by an ulp at
    times. The kernels (like vLLM's) evaluate exactly as written; operands passed through here keep XLA
    to that order.
    """
    return jax.lax.optimization_barrier(jnp.broadcast_to(x, shape))


def divide(numerator, denominator) -> jax.Array:
    """IEEE division, elementwise, as the CUDA kernels compute it (see :func:`opaque`)."""
    numerator = jnp.asarray(numerator)
    shape = jnp.broadcast_shapes(numerator.shape, jnp.shape(denominator))
    return numerator / opaque(jnp.asarray(denominator, numerator.dtype), shape)


def ue8m0_exponent(scale: jax.Array) -> jax.Array:
    """uint32 biased exponent of ``2**ceil(log2(max(|scale|, 1e-10)))``, computed from the float32 bits
    (exponent field, plus one when the mantissa is non-zero) exactly as vLLM's kernels do."""
    bits = jax.lax.bitcast_convert_type(jnp.maximum(jnp.abs(scale), np.float32(1e-10)), jnp.uint32)
    return ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)


def exponent_to_float(exponent: jax.Array) -> jax.Array:
    """float32 power of two whose biased exponent is ``exponent`` (uint32)."""
    return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


def to_e4m3_saturating(x: jax.Array) -> jax.Array:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 like ``cvt.rn.satfinite``
    (a plain convert would turn overflow into NaN)."""
    return jnp.clip(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
