"""Input generators and comparison helpers shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bits_equal(actual, expected, what=""):
    a, e = bits(actual), bits(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad = np.argwhere(a != e)
    assert bad.size == 0, f"{what}: {len(bad)} of {a.size} differ, first at {tuple(bad[0])}: {a[tuple(bad[0])]:#x} != {e[tuple(bad[0])]:#x}"


def assert_within_one_ulp(got, want, dtype):
    """Equal after rounding to the 16-bit ``dtype``, except for one unit in the last place: where two
    float32 computations of the same value may round apart (a bias add fused into the last multiply or not,
    the two scales multiplied in the other order)."""
    g = np.asarray(jnp.asarray(got, dtype)).view(np.int16).astype(np.int32)
    w = np.asarray(jnp.asarray(want, dtype)).view(np.int16).astype(np.int32)
    worst = np.unravel_index(np.argmax(np.abs(g - w)), g.shape) if g.size else ()
    assert g.size == 0 or np.abs(g - w).max() <= 1, f"{np.abs(g - w).max()} ulp apart at {worst}"


def random_activations(rng: np.random.Generator, shape, dtype, *, specials=True) -> jax.Array:
    """Gaussian values with a spread of magnitudes per row, plus (when asked) the awkward cases:
    signed zeros, all-zero groups, huge and tiny magnitudes."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.exp2(rng.integers(-8, 8, size=shape[:-1] + (1,))).astype(np.float32)
    if specials and x.size >= 64:
        flat = x.reshape(-1)
        n = flat.size
        flat[rng.integers(0, n, n // 50)] = 0.0
        flat[rng.integers(0, n, n // 50)] = -0.0
        big = 6e4 if dtype == jnp.float16 else 1e30
        flat[rng.integers(0, n, max(1, n // 500))] = big * rng.choice([-1, 1])
        flat[rng.integers(0, n, n // 100)] *= 1e-6
    return jnp.asarray(x, dtype)
