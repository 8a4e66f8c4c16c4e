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
