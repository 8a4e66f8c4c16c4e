"""per_token_group_fp8_quant / _packed on the CPU: reference vs the NumPy oracle, transformations,
errors, and sharding on 8 virtual devices."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
import oracle
from helpers import assert_bits_equal, random_activations
from jaxq.ops.group_quant import per_token_fp8_quant_xla

FLOATS = [jnp.float16, jnp.bfloat16, jnp.float32]


def _oracle_outputs(x, group_size, *, eps=1e-10, ue8m0=False, int8=False, layout="row", tma=False):
    q, scales = oracle.group_quant(np.asarray(x.astype(jnp.float32)), group_size, eps, ue8m0, int8)
    if layout == "column":
        m = x.shape[-2]
        scales = oracle.column_major(scales, -(-m // 4) * 4 if tma else m)
    return q, scales


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("layout", ["row", "column", "column_tma"])
@pytest.mark.parametrize("shape,group_size", [((1, 128), 128), ((7, 384), 128), ((2, 5, 256), 64), ((9, 96), 32)])
def test_reference_matches_oracle(dtype, out_dtype, ue8m0, layout, shape, group_size):
    if group_size * jnp.dtype(dtype).itemsize % 16:
        pytest.skip("group size too small for this dtype")
    rng = np.random.default_rng(hash((str(dtype), str(out_dtype), ue8m0, layout, shape)) % 2**32)
    x = random_activations(rng, shape, dtype)
    x = x.at[..., 0, :group_size].set(0)  # an all-zero group
    q, s = jax.jit(
        lambda x: jaxq.per_token_group_fp8_quant(
            x, group_size, column_major_scales=layout != "row", tma_aligned_scales=layout == "column_tma",
            scale_ue8m0=ue8m0, out_dtype=out_dtype,
        )
    )(x)
    q_ref, s_ref = _oracle_outputs(
        x, group_size, ue8m0=ue8m0, int8=out_dtype == jnp.int8,
        layout="row" if layout == "row" else "column", tma=layout == "column_tma",
    )
    assert q.dtype == out_dtype and q.shape == x.shape
    assert_bits_equal(q, q_ref, "q")
    assert_bits_equal(s, s_ref, "scales")


def _tie_rows(dtype):
    """Rows whose group maximum is 448 (scale exactly 1), filled with e4m3 rounding midpoints, signed
    zeros and values just either side of a midpoint."""
    mids = [1.0625, 1.1875, 2.125, 2.375, 0.0029296875, 0.0048828125, 416.0, 240.0, 104.0]
    near = [np.nextafter(np.float32(1.0625), np.float32(2)), np.nextafter(np.float32(1.0625), np.float32(0))]
    vals = np.array(mids + near + [0.0, -0.0], np.float32)
    row = np.resize(np.concatenate([vals, -vals]), 128)
    row[-1] = 448.0
    return jnp.asarray(np.stack([row, -row]), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_rounding_ties_and_signed_zeros(dtype, ue8m0):
    x = _tie_rows(dtype)
    q, s = jaxq.per_token_group_fp8_quant(x, 128, scale_ue8m0=ue8m0)
    q_ref, s_ref = _oracle_outputs(x, 128, ue8m0=ue8m0)
    assert_bits_equal(q, q_ref, "q")
    assert_bits_equal(s, s_ref, "scales")
    assert float(s[0, 0]) == 1.0
    # Midpoints go to the even mantissa: 1.0625 -> 1.0, 1.1875 -> 1.25, and negated likewise.
    assert np.asarray(q[:, :2].astype(jnp.float32)).tolist() == [[1.0, 1.25], [-1.0, -1.25]]
    assert np.asarray(q).view(np.uint8)[0, list(np.asarray(x[0], np.float32)).index(0.0) + 1] == 0x80  # -0 stays -0


def test_int8_truncates_toward_zero():
    x = jnp.asarray([[127.0, 2.5, -2.5, 2.99, -2.99, 0.4, -0.4] + [0.0] * 121], jnp.float32)
    q, s = jaxq.per_token_group_fp8_quant(x, 128, out_dtype=jnp.int8)
    assert float(s[0, 0]) == 1.0
    assert np.asarray(q)[0, :7].tolist() == [127, 2, -2, 2, -2, 0, 0]


def test_eps_floors_all_zero_groups():
    x = jnp.zeros((2, 256), jnp.bfloat16)
    q, s = jaxq.per_token_group_fp8_quant(x, 128, eps=1e-4)
    np.testing.assert_array_equal(np.asarray(s), np.float32(1e-4) / np.float32(448))
    assert not np.asarray(q.astype(jnp.float32)).any()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape,group_size", [((1, 128), 128), ((7, 512), 128), ((5, 3, 96), 32), ((4, 640), 64), ((13, 128), 32)])
def test_packed_matches_oracle(dtype, shape, group_size):
    rng = np.random.default_rng(len(shape) * 1000 + shape[-1] + group_size)
    x = random_activations(rng, shape, dtype)
    q, packed = jax.jit(lambda x: jaxq.per_token_group_fp8_quant_packed(x, group_size))(x)
    rows = np.asarray(x.astype(jnp.float32)).reshape(-1, shape[-1])
    q_ref, s_ref = oracle.group_quant(rows, group_size, 1e-10, ue8m0=True, int8=False)
    assert q.shape == x.shape
    assert_bits_equal(q, q_ref.reshape(shape), "q")
    assert packed.dtype == jnp.int32
    assert_bits_equal(packed, oracle.pack_ue8m0(s_ref), "packed scales")


def test_packed_q_equals_ue8m0_column_major():
    x = random_activations(np.random.default_rng(3), (6, 512), jnp.bfloat16)
    q1, _ = jaxq.per_token_group_fp8_quant_packed(x, 128)
    q2, s2 = jaxq.per_token_group_fp8_quant(x, 128, scale_ue8m0=True, column_major_scales=True, tma_aligned_scales=True)
    assert_bits_equal(q1, q2, "q")
    assert s2.shape == (4, 8)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(column_major_scales=True), dict(column_major_scales=True, tma_aligned_scales=True, scale_ue8m0=True)],
)
def test_vmap_equals_per_slice_calls(kwargs):
    x = random_activations(np.random.default_rng(4), (3, 5, 256), jnp.bfloat16)
    f = lambda x: jaxq.per_token_group_fp8_quant(x, 128, **kwargs)  # noqa: E731
    batched = jax.jit(jax.vmap(f))(x)
    for i in range(3):
        for got, want in zip(batched, f(x[i])):
            assert_bits_equal(got[i], want)
    # vmap over a non-leading axis moves it to the front
    xt = jnp.swapaxes(x, 0, 1)  # [5, 3, 256], mapped over axis 1
    q, s = jax.vmap(f, in_axes=1, out_axes=1)(xt)
    for i in range(3):
        want_q, want_s = f(xt[:, i])
        assert_bits_equal(q[:, i], want_q)
        assert_bits_equal(s[:, i], want_s)


def test_packed_vmap_keeps_per_batch_layout():
    x = random_activations(np.random.default_rng(5), (2, 6, 384), jnp.float16)
    q, packed = jax.vmap(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128))(x)
    assert packed.shape == (2, 1, 8)
    for i in range(2):
        assert_bits_equal(packed[i], jaxq.per_token_group_fp8_quant_packed(x[i], 128)[1])
        assert_bits_equal(q[i], jaxq.per_token_group_fp8_quant_packed(x[i], 128)[0])


def test_grad_raises():
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(jaxq.NotDifferentiableError, match="per_token_group_fp8_quant"):
        jax.grad(lambda x: jaxq.per_token_group_fp8_quant(x, 128)[1].sum())(x)
    with pytest.raises(jaxq.NotDifferentiableError, match="per_token_group_fp8_quant"):
        jax.grad(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128)[0].astype(jnp.float32).sum())(
            x.astype(jnp.bfloat16)
        )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 100)), 128), ValueError, "multiple of group_size"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 0), ValueError, "group_size must be a positive"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), -128), ValueError, "group_size"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 128.0), ValueError, "group_size"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), True), ValueError, "group_size"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 12), jnp.bfloat16), 6), ValueError, "16 bytes"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128), jnp.int32), 128), TypeError, "x must have dtype"),
        (lambda: jaxq.per_token_group_fp8_quant(np.ones((2, 128), np.float64), 128), TypeError, "x must have dtype"),
        (lambda: jaxq.per_token_group_fp8_quant([1.0] * 128, 128), TypeError, "x must be an array"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 128, eps=0.0), ValueError, "eps"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 128, eps=float("nan")), ValueError, "eps"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 128, out_dtype=jnp.float8_e5m2), TypeError, "out_dtype"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((2, 128)), 128, tma_aligned_scales=True), ValueError, "tma_aligned_scales"),
        (lambda: jaxq.per_token_group_fp8_quant(jnp.ones((128,)), 128, column_major_scales=True), ValueError, "column_major_scales"),
        (lambda: jaxq.per_token_group_fp8_quant_packed(jnp.ones((2, 128)), 128), TypeError, "x must have dtype"),
        (lambda: jaxq.per_token_group_fp8_quant_packed(jnp.ones((2, 96), jnp.bfloat16), 64), ValueError, "multiple of group_size"),
        (lambda: jaxq.per_token_group_fp8_quant_packed(jnp.ones((2, 128), jnp.bfloat16), 128, eps=-1.0), ValueError, "eps"),
    ],
)
def test_bad_inputs_raise_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _no_collectives(compiled_text):
    return not any(op in compiled_text for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"))


MESH_SHAPE = (4, 2)


def _mesh():
    return jax.make_mesh(MESH_SHAPE, ("a", "b"))


@pytest.mark.parametrize(
    "kwargs,spec,expect_scale_spec",
    [
        (dict(), P("a", "b"), P("a", "b")),  # tokens and hidden (whole groups) sharded
        (dict(), P(("a", "b"), None), P(("a", "b"), None)),
        (dict(column_major_scales=True), P("a", "b"), P("b", "a")),
        (dict(column_major_scales=True, tma_aligned_scales=True, scale_ue8m0=True), P("a", "b"), P("b", "a")),
        (dict(out_dtype=jnp.int8), P("b", "a"), P("b", "a")),
    ],
)
def test_sharded_equals_unsharded_without_communication(kwargs, spec, expect_scale_spec):
    x = random_activations(np.random.default_rng(6), (64, 1024), jnp.bfloat16)
    f = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 128, **kwargs))
    xs = jax.device_put(x, NamedSharding(_mesh(), spec))
    q, s = f(xs)
    q0, s0 = f(x)
    assert_bits_equal(q, q0, "q")
    assert_bits_equal(s, s0, "scales")
    mesh = _mesh()
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, spec), q.ndim)
    assert s.sharding.is_equivalent_to(NamedSharding(mesh, expect_scale_spec), s.ndim)
    assert _no_collectives(f.lower(xs).compile().as_text())


def test_packed_sharded_tokens_and_words():
    x = random_activations(np.random.default_rng(7), (64, 2048), jnp.bfloat16)  # 16 groups = 4 words
    f = jax.jit(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128))
    xs = jax.device_put(x, NamedSharding(_mesh(), P("a", "b")))
    q, s = f(xs)
    q0, s0 = f(x)
    assert_bits_equal(q, q0)
    assert_bits_equal(s, s0)
    assert s.sharding.is_equivalent_to(NamedSharding(_mesh(), P("b", "a")), 2)
    assert _no_collectives(f.lower(xs).compile().as_text())


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((30, 1024), dict(column_major_scales=True, tma_aligned_scales=True)),  # padded rows: tokens gathered
        ((64, 640), dict()),  # 5 groups do not split in 2: hidden gathered
        ((3, 64, 256), dict(column_major_scales=True)),  # leading batch dim
    ],
)
def test_sharded_awkward_shapes_stay_correct(shape, kwargs):
    x = random_activations(np.random.default_rng(8), shape, jnp.float32)
    f = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 128, **kwargs))
    spec = P(*([None] * (len(shape) - 2)), "b", "a")
    q, s = f(jax.device_put(x, NamedSharding(_mesh(), spec)))
    q0, s0 = f(x)
    assert_bits_equal(q, q0)
    assert_bits_equal(s, s0)


@pytest.mark.parametrize("spec", [P("a", "b"), P(None, ("a", "b"))])
def test_sharded_one_group_per_row(spec):
    """One group spanning the whole row (per-token scales): the group factor has size 1, which Shardy
    rejects inside a compound dimension; the row stays whole and the result is the unsharded one."""
    x = random_activations(np.random.default_rng(10), (64, 512), jnp.bfloat16)
    f = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 512))
    q, s = f(jax.device_put(x, NamedSharding(_mesh(), spec)))
    q0, s0 = f(x)
    assert s.shape == (64, 1)
    assert_bits_equal(q, q0)
    assert_bits_equal(s, s0)


def test_packed_sharded_unaligned_rows_and_groups():
    x = random_activations(np.random.default_rng(9), (36, 768), jnp.float16)  # 6 groups: not whole words
    f = jax.jit(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128))
    q, s = f(jax.device_put(x, NamedSharding(_mesh(), P("a", "b"))))
    q0, s0 = f(x)
    assert_bits_equal(q, q0)
    assert_bits_equal(s, s0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_per_token_fp8_quant_xla_is_the_op_with_one_group_per_row(dtype):
    """Fp8Linear quantizes row-parallel inputs with it: the same bits as the op (its kernel on a GPU)."""
    x = (jax.random.normal(jax.random.key(4), (5, 384), jnp.float32) * 3).astype(dtype)
    q, s = per_token_fp8_quant_xla(x)
    want_q, want_s = jaxq.per_token_group_fp8_quant(x, 384)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(want_q).view(np.uint8))
    np.testing.assert_array_equal(s, want_s)


def test_per_token_fp8_quant_xla_errors():
    with pytest.raises(TypeError, match="per_token_fp8_quant_xla"):
        per_token_fp8_quant_xla(jnp.zeros((2, 128), jnp.int32))
    with pytest.raises(ValueError, match="eps"):
        per_token_fp8_quant_xla(jnp.zeros((2, 128), jnp.bfloat16), eps=0.0)
