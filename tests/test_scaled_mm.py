"""cutlass_scaled_mm / cutlass_scaled_mm_azp: reference vs the NumPy oracle, sharding, errors (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
import oracle
from helpers import assert_within_one_ulp


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def int8(rng, shape):
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


def fp8(rng, shape):
    return jnp.asarray(rng.standard_normal(shape) * 4, jnp.float8_e4m3fn)


def scales(rng, shape):
    return jnp.asarray(rng.uniform(0.5, 2.0, shape) * 1e-2, jnp.float32)


SCALE_FORMS = {"tensor": lambda m, n: ((), (1,)), "token": lambda m, n: ((m, 1), (1,)),
               "channel": lambda m, n: ((1,), (1, n)), "token_channel": lambda m, n: ((m, 1), (1, n))}


def _out(dtype, d):
    return np.asarray(jnp.asarray(d, dtype).astype(jnp.float32))


INT8_CASES = [(m, form, out_dtype, bias) for m in (1, 5, 33) for form in SCALE_FORMS
              for out_dtype in (jnp.bfloat16, jnp.float16) for bias in (False, True)]
INT8_CASES += [(4097, "token_channel", jnp.bfloat16, True)]


@pytest.mark.parametrize("m,form,out_dtype,with_bias", INT8_CASES)
def test_int8_matches_oracle_exactly(m, form, out_dtype, with_bias):
    rng = np.random.default_rng(m)
    k, n = 256, 64
    a, b = int8(rng, (m, k)), int8(rng, (k, n))
    sa_shape, sb_shape = SCALE_FORMS[form](m, n)
    sa, sb = scales(rng, sa_shape), scales(rng, sb_shape)
    bias = jnp.asarray(rng.standard_normal(n), out_dtype) if with_bias else None
    got = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x[:4], out_dtype, bias=x[4] if with_bias else None))(a, b, sa, sb, bias)
    assert got.dtype == out_dtype and got.shape == (m, n)
    want = oracle.scaled_mm(a, b, sa, sb, bias)
    if with_bias:
        assert_within_one_ulp(got, want, out_dtype)
    else:
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), _out(out_dtype, want))


@pytest.mark.parametrize("form", SCALE_FORMS)
@pytest.mark.parametrize("m", [1, 33])
def test_fp8_matches_oracle(form, m):
    rng = np.random.default_rng(7 + m)
    k, n = 384, 96
    a, b = fp8(rng, (m, k)), fp8(rng, (k, n))
    sa_shape, sb_shape = SCALE_FORMS[form](m, n)
    sa, sb = scales(rng, sa_shape), scales(rng, sb_shape)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    got = jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16, bias=bias)
    assert rel_l2(got, oracle.scaled_mm(a, b, sa, sb, bias)) < 2e-3


@pytest.mark.parametrize("m", [1, 65, 130])
def test_fp8_fast_accum_reference_keeps_float32_sums(m):
    """use_fast_accum changes the CUDA kernel's accumulator only: the reference lowering's result is the same."""
    rng = np.random.default_rng(11 + m)
    a, b = fp8(rng, (m, 256)), fp8(rng, (256, 48))
    sa, sb = scales(rng, (m, 1)), scales(rng, (1, 48))
    exact = jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16)
    fast = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x, jnp.bfloat16, use_fast_accum=True))(a, b, sa, sb)
    np.testing.assert_array_equal(np.asarray(fast.astype(jnp.float32)), np.asarray(exact.astype(jnp.float32)))
    assert rel_l2(fast, oracle.scaled_mm(a, b, sa, sb)) < 2e-3


@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (5, 512, 208), (33, 128, 384)])
def test_fp8_blockwise_matches_oracle(m, k, n):
    rng = np.random.default_rng(m + n)
    a, b = fp8(rng, (m, k)), fp8(rng, (k, n))
    sa, sb = scales(rng, (m, k // 128)), scales(rng, (k // 128, -(-n // 128)))
    got = jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.float16)
    assert rel_l2(got, oracle.scaled_mm(a, b, sa, sb, block=sb.shape not in ((1, 1), (1, n)))) < 2e-3


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_azp_matches_oracle_exactly(per_token, with_bias):
    rng = np.random.default_rng(11)
    m, k, n = 7, 256, 48
    a, b = int8(rng, (m, k)), int8(rng, (k, n))
    sa, sb = scales(rng, (m, 1)), scales(rng, (1, n))
    azp = jnp.asarray(rng.integers(-20, 20, m), jnp.int32) if per_token else None
    adj = jaxq.cutlass_azp_adj(b) if per_token else jaxq.cutlass_azp_adj(b, 3)
    np.testing.assert_array_equal(np.asarray(jaxq.cutlass_azp_adj(b)), np.asarray(b, np.int64).sum(0))
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if with_bias else None
    got = jaxq.cutlass_scaled_mm_azp(a, b, sa, sb, jnp.bfloat16, adj, azp=azp, bias=bias)
    want = oracle.scaled_mm(a, b, sa, sb, bias, azp_adj=adj, azp=azp)
    if with_bias:
        assert_within_one_ulp(got, want, jnp.bfloat16)
    else:
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), _out(jnp.bfloat16, want))
    # The zero-point correction is what dequantizing a - azp first gives.
    shift = azp[:, None] if per_token else 3
    exact = (np.asarray(a, np.int64) - np.asarray(shift)) @ np.asarray(b, np.int64)
    assert rel_l2(got, oracle.scaled_mm(np.zeros((m, k), np.int8), b, sa, sb, bias) + np.asarray(sa) * (np.asarray(sb) * exact)) < 1e-2


def test_blockwise_vmap_folds_padded_rows():
    """vmap over activations and their block scales, 5 rows each (padded to 8 inside every call)."""
    rng = np.random.default_rng(9)
    a, b = fp8(rng, (3, 5, 256)), fp8(rng, (256, 384))
    sa, sb = scales(rng, (3, 5, 2)), scales(rng, (2, 3))
    got = jax.vmap(lambda a, s: jaxq.cutlass_scaled_mm(a, b, s, sb, jnp.bfloat16))(a, sa)
    assert got.shape == (3, 5, 384)
    want = np.stack([np.asarray(jaxq.cutlass_scaled_mm(a[i], b, sa[i], sb, jnp.bfloat16)) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), want)
    assert rel_l2(got[1], oracle.scaled_mm(a[1], b, sa[1], sb, block=True)) < 2e-3


def _put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


# Specs of (a, b, scale_a, scale_b) with per-token and per-channel scales, by layout.
_OPERAND_SPECS = {"tokens": (P("d", None), P(), P("d", None), P()),
                  "column_parallel": (P(), P(None, "d"), P(), P(None, "d")),
                  "row_parallel": (P(None, "d"), P("d", None), P(), P())}


def _row_col_operands(rng, make, m=16, k=1024, n=256):
    """a [m, k], b [k, n] from ``make`` (int8 or fp8), per-token and per-channel scales."""
    return make(rng, (m, k)), make(rng, (k, n)), scales(rng, (m, 1)), scales(rng, (1, n))


def _assert_matches_unsharded(layout, got, want):
    if layout == "row_parallel":  # partial sums are rounded to bf16 before the all-reduce
        assert rel_l2(got, want) < 1e-2
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("layout", ["tokens", "column_parallel", "row_parallel"])
def test_sharded_equals_unsharded(layout):
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((8,), ("d",))
    a, b, sa, sb = _row_col_operands(rng, int8)
    m, n = a.shape[0], b.shape[1]
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    azp = jnp.asarray(rng.integers(-20, 20, m), jnp.int32)
    adj = jaxq.cutlass_azp_adj(b)
    # a, b, scale_a, scale_b, then bias, azp, azp_adj
    specs = _OPERAND_SPECS[layout] + {"tokens": (P(), P("d"), P()), "column_parallel": (P("d"), P(), P("d")),
                                      "row_parallel": (P(), P(), P())}[layout]
    args = [_put(mesh, x, s) for x, s in zip((a, b, sa, sb, bias, azp, adj), specs)]
    f = jax.jit(lambda a, b, sa, sb, bias, azp, adj: (
        jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16, bias=bias),
        jaxq.cutlass_scaled_mm_azp(a, b, sa, sb, jnp.bfloat16, adj, azp=azp, bias=bias)))
    got = f(*args)
    want = f(a, b, sa, sb, bias, azp, adj)
    for g, w in zip(got, want):
        _assert_matches_unsharded(layout, g, w)
    assert ("all-reduce" in f.lower(*args).compile().as_text()) == (layout == "row_parallel")


@pytest.mark.parametrize("layout", ["tokens", "column_parallel", "row_parallel"])
def test_fast_accum_sharded_and_vmapped_equal_unsharded(layout):
    rng = np.random.default_rng(12)
    mesh = jax.make_mesh((8,), ("d",))
    a, b, sa, sb = _row_col_operands(rng, fp8)
    (m, k), n = a.shape, b.shape[1]
    f = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x, jnp.bfloat16, use_fast_accum=True))
    got = f(*[_put(mesh, x, s) for x, s in zip((a, b, sa, sb), _OPERAND_SPECS[layout])])
    want = f(a, b, sa, sb)
    assert rel_l2(want, oracle.scaled_mm(a, b, sa, sb)) < 2e-3
    _assert_matches_unsharded(layout, got, want)
    batched = jax.vmap(lambda a, s: jaxq.cutlass_scaled_mm(a, b, s, sb, jnp.bfloat16, use_fast_accum=True))(
        a.reshape(2, 8, k), sa.reshape(2, 8, 1))
    np.testing.assert_array_equal(np.asarray(batched.reshape(m, n)), np.asarray(want))


@pytest.mark.parametrize("layout", ["tokens", "tokens_uneven", "column_parallel", "row_parallel"])
def test_blockwise_sharded_equals_unsharded(layout):
    rng = np.random.default_rng(4)
    # tokens_uneven: 8 rows over 8 devices would leave one row a shard, under the kernel's 4: not split.
    m = 8 if layout == "tokens_uneven" else 32
    k, n = 1024, 1024
    mesh = jax.make_mesh((8,), ("d",))
    a, b = fp8(rng, (m, k)), fp8(rng, (k, n))
    sa, sb = scales(rng, (m, k // 128)), scales(rng, (k // 128, n // 128))
    specs = {"tokens": (P("d", None), P(), P("d", None), P()), "tokens_uneven": (P("d", None), P(), P("d", None), P()),
             "column_parallel": (P(), P(None, "d"), P(), P(None, "d")),
             "row_parallel": (P(None, "d"), P("d", None), P(None, "d"), P("d", None))}[layout]
    f = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x, jnp.bfloat16))
    args = [_put(mesh, x, spec) for x, spec in zip((a, b, sa, sb), specs)]
    got, want = f(*args), f(a, b, sa, sb)
    if layout == "row_parallel":  # partial sums are rounded to bf16 before the all-reduce
        assert rel_l2(got, want) < 1e-2
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_errors_name_the_argument():
    rng = np.random.default_rng(5)
    a, b = int8(rng, (4, 64)), int8(rng, (64, 32))
    sa, sb = scales(rng, (4, 1)), scales(rng, (1, 32))
    with pytest.raises(TypeError, match="a .* and b .* must have one dtype"):
        jaxq.cutlass_scaled_mm(a, fp8(rng, (64, 32)), sa, sb, jnp.bfloat16)
    with pytest.raises(TypeError, match="a must be int8 or float8_e4m3fn"):
        jaxq.cutlass_scaled_mm(a.astype(jnp.int16), b, sa, sb, jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 16"):
        jaxq.cutlass_scaled_mm(int8(rng, (4, 40)), int8(rng, (40, 32)), sa, sb, jnp.bfloat16)
    with pytest.raises(ValueError, match="do not share K"):
        jaxq.cutlass_scaled_mm(a, int8(rng, (48, 32)), sa, sb, jnp.bfloat16)
    with pytest.raises(ValueError, match="scale_a must be per-tensor"):
        jaxq.cutlass_scaled_mm(a, b, scales(rng, (3, 1)), sb, jnp.bfloat16)
    with pytest.raises(TypeError, match="scale_b must be float32"):
        jaxq.cutlass_scaled_mm(a, b, sa, sb.astype(jnp.bfloat16), jnp.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.float32)
    with pytest.raises(ValueError, match="bias must be bfloat16"):
        jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16, bias=jnp.zeros((32,), jnp.float16))
    a2, b2 = int8(rng, (4, 256)), int8(rng, (256, 256))
    with pytest.raises(ValueError, match="block-wise scales need float8_e4m3fn"):
        jaxq.cutlass_scaled_mm(a2, b2, scales(rng, (4, 2)), scales(rng, (2, 2)), jnp.bfloat16)
    with pytest.raises(ValueError, match="use_fast_accum applies to float8_e4m3fn"):
        jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16, use_fast_accum=True)
    with pytest.raises(ValueError, match="use_fast_accum applies to float8_e4m3fn"):
        jaxq.cutlass_scaled_mm(fp8(rng, (4, 256)), fp8(rng, (256, 256)), scales(rng, (4, 2)), scales(rng, (2, 2)),
                               jnp.bfloat16, use_fast_accum=True)
    with pytest.raises(TypeError, match="use_fast_accum must be a bool"):
        jaxq.cutlass_scaled_mm(fp8(rng, (4, 64)), fp8(rng, (64, 32)), sa, sb, jnp.bfloat16, use_fast_accum=1)
    with pytest.raises(TypeError, match="int8"):
        jaxq.cutlass_scaled_mm_azp(fp8(rng, (4, 64)), fp8(rng, (64, 32)), sa, sb, jnp.bfloat16, jnp.zeros((32,), jnp.int32))
    with pytest.raises(ValueError, match="azp must be int32"):
        jaxq.cutlass_scaled_mm_azp(a, b, sa, sb, jnp.bfloat16, jnp.zeros((32,), jnp.int32), azp=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="azp_adj must be int32"):
        jaxq.cutlass_scaled_mm_azp(a, b, sa, sb, jnp.bfloat16, jnp.zeros((31,), jnp.int32))


def test_no_gradient_through_quantized_operands():
    rng = np.random.default_rng(6)
    a, b = fp8(rng, (4, 64)), fp8(rng, (64, 32))
    with pytest.raises(jaxq.NotDifferentiableError):
        jax.grad(lambda s: jnp.sum(jaxq.cutlass_scaled_mm(a, b, s, jnp.ones((1,), jnp.float32), jnp.float16).astype(jnp.float32)))(
            jnp.ones((4, 1), jnp.float32))


def test_vmap_over_activations_folds_and_over_weights_maps():
    rng = np.random.default_rng(8)
    a, b = int8(rng, (3, 5, 64)), int8(rng, (64, 32))
    sa, sb = scales(rng, (3, 5, 1)), scales(rng, (1, 32))
    azp = jnp.asarray(rng.integers(-5, 5, (3, 5)), jnp.int32)
    adj = jaxq.cutlass_azp_adj(b)
    got = jax.vmap(lambda a, s, z: jaxq.cutlass_scaled_mm_azp(a, b, s, sb, jnp.bfloat16, adj, azp=z))(a, sa, azp)
    want = np.stack([np.asarray(jaxq.cutlass_scaled_mm_azp(a[i], b, sa[i], sb, jnp.bfloat16, adj, azp=azp[i]))
                     for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), want)
    # A per-tensor scale per batch entry, and stacked weights.
    st = scales(rng, (3,))
    got = jax.vmap(lambda a, s: jaxq.cutlass_scaled_mm(a, b, s, sb, jnp.float16))(a, st)
    want = np.stack([np.asarray(jaxq.cutlass_scaled_mm(a[i], b, st[i], sb, jnp.float16)) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), want)
    bs = int8(rng, (3, 64, 32))
    got = jax.vmap(lambda w: jaxq.cutlass_scaled_mm(a[0], w, sa[0], sb, jnp.bfloat16))(bs)
    want = np.stack([np.asarray(jaxq.cutlass_scaled_mm(a[0], bs[i], sa[0], sb, jnp.bfloat16)) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), want)
