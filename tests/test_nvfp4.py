"""scaled_fp4_quant on the CPU: reference vs the NumPy oracle, helpers, transformations, errors, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
import oracle
from helpers import assert_bits_equal, random_activations


def _global_scale(x):
    return jnp.float32(448.0 * 6.0 / max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))), 1e-3))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (7, 64), (130, 80), (3, 4, 48)])
def test_reference_matches_oracle(dtype, shape):
    rng = np.random.default_rng(shape[-1] * 7 + len(shape))
    x = random_activations(rng, shape, dtype)
    x = x.at[..., 0, :16].set(0)  # an all-zero block: scale 0, values 0
    gs = _global_scale(x)
    q, s = jax.jit(jaxq.scaled_fp4_quant)(x, gs)
    rows = np.asarray(x.astype(jnp.float32)).reshape(-1, shape[-1])
    q_ref, s_ref, _ = oracle.nvfp4_quant(rows, float(gs))
    assert q.dtype == jnp.uint8 and s.dtype == jnp.float8_e4m3fn
    assert_bits_equal(q, q_ref, "q")
    assert_bits_equal(s, s_ref, "block scales")


def test_e2m1_ties_saturation_and_signed_zero():
    # global scale 1 and block max 6: block scale 1.0, out_scale 1, so values are rounded as they are.
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2, 5.0625, -0.25, -0.0, 0.0, -0.1, -2.5, -6.0]
    x = jnp.asarray([vals], jnp.bfloat16)
    q, s = jaxq.scaled_fp4_quant(x, jnp.float32(1.0))
    codes = np.stack([np.asarray(q) & 0xF, np.asarray(q) >> 4], -1).reshape(-1)
    assert float(s[0, 0].astype(jnp.float32)) == 1.0
    expected = [0x7, 0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x0, 0x7, 0x8, 0x8, 0x0, 0x8, 0xC, 0xF]
    assert codes.tolist() == expected
    # and block scales saturate at 448 for a global scale that overflows e4m3
    q, s = jaxq.scaled_fp4_quant(x, jnp.float32(1e6))
    assert float(s[0, 0].astype(jnp.float32)) == 448.0


def test_dequantize_recovers_values_within_fp4_error():
    x = random_activations(np.random.default_rng(1), (33, 256), jnp.bfloat16, specials=False)
    gs = _global_scale(x)
    q, s = jaxq.scaled_fp4_quant(x, gs)
    back = jaxq.nvfp4_dequantize(q, s, gs)
    xf = np.asarray(x, np.float32)
    rel = np.linalg.norm(np.asarray(back) - xf) / np.linalg.norm(xf)
    assert 0.02 < rel < 0.15  # e2m1 keeps ~1.5 bits: far from exact, far from noise
    # each value is within half an e2m1 step (1.0 at the top of the range) times its block scale
    scales = np.asarray(jaxq.unswizzle_block_scales(s, 33, 256).astype(jnp.float32)) / float(gs)
    bound = np.repeat(scales, 16, axis=1) * 1.0 + 1e-6
    assert np.all(np.abs(np.asarray(back) - xf) <= bound)


def test_swizzle_round_trip_and_layout():
    rng = np.random.default_rng(2)
    sf = rng.integers(0, 127, size=(130, 9)).astype(np.uint8)
    swizzled = jaxq.swizzle_block_scales(jnp.asarray(sf))
    assert swizzled.shape == (256, 12)
    assert_bits_equal(swizzled, oracle.swizzle(sf))
    assert_bits_equal(jaxq.unswizzle_block_scales(swizzled, 130, 9 * 16), sf)


def test_vmap_with_batched_and_shared_global_scale():
    x = random_activations(np.random.default_rng(12), (3, 130, 256), jnp.bfloat16)
    gs = jnp.asarray([0.5, 3.0, 2000.0], jnp.float32)  # 3.0: inexact reciprocal; 2000: saturating scales
    q, s = jax.jit(jax.vmap(jaxq.scaled_fp4_quant))(x, gs)
    assert q.shape == (3, 130, 128) and s.shape == (3, 256, 16)
    for i in range(3):
        q_ref, s_ref, _ = oracle.nvfp4_quant(np.asarray(x[i].astype(jnp.float32)), float(gs[i]))
        assert_bits_equal(q[i], q_ref)
        assert_bits_equal(s[i], s_ref)
        qi, si = jaxq.scaled_fp4_quant(x[i], gs[i])
        assert_bits_equal(q[i], qi)
        assert_bits_equal(s[i], si)
    q2, _ = jax.vmap(jaxq.scaled_fp4_quant, in_axes=(0, None))(x, gs[1])
    assert_bits_equal(q2[2], jaxq.scaled_fp4_quant(x[2], gs[1])[0])


def test_leading_dims_flatten_like_vllm():
    x = random_activations(np.random.default_rng(4), (2, 3, 32), jnp.bfloat16)
    q, s = jaxq.scaled_fp4_quant(x, jnp.float32(10.0))
    q2, s2 = jaxq.scaled_fp4_quant(x.reshape(6, 32), jnp.float32(10.0))
    assert q.shape == (6, 16)
    assert_bits_equal(q, q2)
    assert_bits_equal(s, s2)


def test_grad_raises():
    with pytest.raises(jaxq.NotDifferentiableError, match="scaled_fp4_quant"):
        jax.grad(lambda x: jaxq.scaled_fp4_quant(x, jnp.float32(1.0))[0].astype(jnp.float32).sum())(
            jnp.ones((2, 16), jnp.bfloat16)
        )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: jaxq.scaled_fp4_quant(jnp.ones((2, 24), jnp.bfloat16), jnp.float32(1)), ValueError, "multiple of 16"),
        (lambda: jaxq.scaled_fp4_quant(jnp.ones((2, 32), jnp.float32), jnp.float32(1)), TypeError, "float16 or bfloat16"),
        (lambda: jaxq.scaled_fp4_quant(jnp.ones((2, 32), jnp.bfloat16), jnp.ones((2,), jnp.float32)), ValueError, "global_scale must have shape"),
        (lambda: jaxq.scaled_fp4_quant(jnp.ones((2, 32), jnp.bfloat16), jnp.bfloat16(1)), TypeError, "global_scale must be a float32"),
        (lambda: jaxq.scaled_fp4_quant(jnp.ones((2, 32), jnp.bfloat16), 1.0), TypeError, "global_scale"),
        (lambda: jaxq.scaled_fp4_quant(np.ones((2, 32)), jnp.float32(1)), TypeError, "float16 or bfloat16"),
        (lambda: jaxq.unswizzle_block_scales(jnp.zeros((128, 4), jnp.uint8), 130, 64), ValueError, "do not fit"),
    ],
)
def test_bad_inputs_raise_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("m,spec", [(512, P("a", None)), (512, P("a", "b")), (100, P("b", "a")), (256, P(("a", "b"), None))])
def test_sharded_equals_unsharded(m, spec):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    x = random_activations(np.random.default_rng(m), (m, 256), jnp.bfloat16)
    f = jax.jit(lambda x: jaxq.scaled_fp4_quant(x, jnp.float32(7.0)))
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    q, s = f(xs)
    q0, s0 = f(x)
    assert_bits_equal(q, q0)
    assert_bits_equal(s, s0)
    if m == 512 and spec == P("a", None):  # whole 128-row tiles per shard: no communication at all
        text = f.lower(xs).compile().as_text()
        assert not any(c in text for c in ("all-gather", "all-to-all", "all-reduce"))
        assert s.sharding.is_equivalent_to(NamedSharding(mesh, P("a", None)), 2)
