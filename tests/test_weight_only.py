"""AWQ and GPTQ: formats, references vs the NumPy oracle, dispatch, jit/vmap/grad, sharding, errors (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
import oracle
from jaxq import formats
from jaxq.ops import awq as awq_ops, gptq as gptq_ops

DTYPES = [jnp.float16, jnp.bfloat16]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def awq_weight(rng, k, n, group_size, dtype):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return formats.quantize_awq(jnp.asarray(w, dtype), group_size)


def gptq_weight(rng, k, n, bits, group_size, dtype, *, act_order=False, v2=False, symmetric=True):
    w = rng.standard_normal((k, n)).astype(np.float32)
    order = rng.permutation(k) if act_order else None
    return formats.quantize_gptq(jnp.asarray(w, dtype), bits, group_size, act_order=order, v2_format=v2,
                                 symmetric=symmetric)


def random_x(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


# ---------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
@pytest.mark.parametrize("axis", [0, 1])
def test_gptq_pack_round_trip_and_oracle(bits, axis):
    rng = np.random.default_rng(bits + 10 * axis)
    shape = (64, 96) if axis == 0 else (6, 64)
    values = rng.integers(0, 1 << bits, shape)
    packed = formats.pack_gptq(values, bits, axis=axis)
    assert packed.dtype == jnp.int32 and packed.shape[axis] == shape[axis] * bits // 32
    np.testing.assert_array_equal(formats.unpack_gptq(packed, bits, axis=axis), values)
    np.testing.assert_array_equal(oracle.bitstream_unpack(np.asarray(packed), bits, axis), values)


def test_awq_pack_round_trip_and_oracle():
    values = np.random.default_rng(1).integers(0, 16, (40, 64))
    packed = formats.pack_awq(values)
    np.testing.assert_array_equal(formats.unpack_awq(packed), values)
    np.testing.assert_array_equal(oracle.awq_unpack(np.asarray(packed)), values)


@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
@pytest.mark.parametrize("with_perm", [False, True])
def test_gptq_shuffle_matches_vllm_layout(bits, with_perm):
    rng = np.random.default_rng(bits)
    k, n = 128, 16
    values = rng.integers(0, 1 << bits, (k, n))
    perm = rng.permutation(k).astype(np.int32) if with_perm else np.zeros((0,), np.int32)
    shuffled = jaxq.gptq_shuffle(formats.pack_gptq(values, bits), jnp.asarray(perm), bits)
    expected = oracle.exllama_shuffle_word_columns(values[perm] if with_perm else values, bits)
    np.testing.assert_array_equal(np.asarray(shuffled), expected)
    if not with_perm:
        np.testing.assert_array_equal(formats.unpack_gptq(formats.exllama_unshuffle(shuffled, bits), bits), values)


def test_awq_to_gptq_is_the_same_weight():
    qweight, scales, qzeros = awq_weight(np.random.default_rng(2), 128, 64, 32, jnp.float16)
    g_qweight, g_qzeros, g_scales, g_idx = formats.awq_to_gptq(qweight, scales, qzeros, v2_format=True)
    a = jaxq.awq_dequantize(qweight, scales, qzeros)
    b = jaxq.gptq_dequantize(g_qweight, g_qzeros, g_scales, jnp.zeros((0,), jnp.int32), bits=4, use_v2_format=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rtn_quantizers_reconstruct_the_weight():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    qweight, scales, qzeros = formats.quantize_awq(jnp.asarray(w, jnp.float16), 64)
    assert rel_l2(jaxq.awq_dequantize(qweight, scales, qzeros), w) < 0.1
    for bits, tol in ((8, 0.01), (4, 0.15), (3, 0.3), (2, 0.7)):
        qw, qz, sc, gi = formats.quantize_gptq(jnp.asarray(w, jnp.float16), bits, 64)
        assert rel_l2(jaxq.gptq_dequantize(qw, qz, sc, gi, bits=bits), w) < tol, bits


# --------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_awq_dequantize_matches_oracle(dtype, group_size):
    rng = np.random.default_rng(group_size % 97)
    qweight, scales, qzeros = awq_weight(rng, 256, 96, group_size, dtype)
    got = jaxq.awq_dequantize(qweight, scales, qzeros)
    assert got.dtype == dtype and got.shape == (256, 96)
    want = oracle.awq_dequantize(np.asarray(qweight), np.asarray(scales.astype(jnp.float32)), np.asarray(qzeros))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, dtype)))


@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("exllama", [False, True])
def test_gptq_dequantize_matches_oracle(bits, v2, act_order, exllama):
    rng = np.random.default_rng(bits * 8 + v2 * 4 + act_order * 2 + exllama)
    dtype = jnp.bfloat16 if bits % 2 else jnp.float16
    qweight, qzeros, scales, g_idx = gptq_weight(rng, 128, 64, bits, 32, dtype, act_order=act_order, v2=v2,
                                                 symmetric=False)
    want = oracle.gptq_dequantize(np.asarray(qweight), np.asarray(qzeros), np.asarray(scales.astype(jnp.float32)),
                                  np.asarray(g_idx), bits, v2)
    if exllama:  # vLLM's convention: shuffle by argsort(g_idx), pass the permutation (or nothing)
        perm = jnp.argsort(g_idx).astype(jnp.int32) if act_order else jnp.zeros((0,), jnp.int32)
        qweight, g_idx = jaxq.gptq_shuffle(qweight, perm, bits), perm
    elif not act_order:
        g_idx = jnp.zeros((0,), jnp.int32)
    got = jaxq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits=bits, use_v2_format=v2, use_exllama=exllama)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, dtype)))


def test_gptq_dequantize_clamps_corrupt_g_idx():
    """Entries past the last group or negative (-1 included, which numpy indexing would wrap) take the nearest
    group, as the GPU kernels clamp them."""
    rng = np.random.default_rng(5)
    qweight, qzeros, scales, g_idx = gptq_weight(rng, 128, 64, 4, 32, jnp.float16, act_order=True, symmetric=False)
    corrupt = g_idx.at[0].set(-1).at[1].set(-(1 << 20)).at[2].set(4).at[3].set(1 << 20)
    clamped = g_idx.at[0].set(0).at[1].set(0).at[2].set(3).at[3].set(3)
    got = jaxq.gptq_dequantize(qweight, qzeros, scales, corrupt, bits=4)
    want = oracle.gptq_dequantize(np.asarray(qweight), np.asarray(qzeros), np.asarray(scales.astype(jnp.float32)),
                                  np.asarray(clamped), 4, False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.float16)))


# -------------------------------------------------------------------------------------------- GEMM


def gemm_cases():
    for m in (1, 3, 17, 70):  # 70 > the kernel thresholds: dequantize + dot
        for dtype in DTYPES:
            yield m, dtype


@pytest.mark.parametrize("m,dtype", list(gemm_cases()))
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_gemm_matches_oracle(m, dtype, group_size):
    rng = np.random.default_rng(m)
    k, n = 256, 96
    qweight, scales, qzeros = awq_weight(rng, k, n, group_size, dtype)
    x = random_x(rng, (m, k), dtype)
    w = np.asarray(jnp.asarray(oracle.awq_dequantize(np.asarray(qweight), np.asarray(scales.astype(jnp.float32)),
                                                     np.asarray(qzeros)), dtype).astype(jnp.float32))
    got = jax.jit(jaxq.awq_gemm)(x, qweight, scales, qzeros)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_l2(got, np.asarray(x, np.float64) @ w) < (1e-2 if dtype == jnp.bfloat16 else 3e-3)


@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
@pytest.mark.parametrize("exllama", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 17, 70])
def test_gptq_gemm_matches_oracle(bits, exllama, act_order, m):
    rng = np.random.default_rng(bits + m)
    dtype = jnp.float16 if m % 2 else jnp.bfloat16
    k, n = 128, 64
    qweight, qzeros, scales, g_idx = gptq_weight(rng, k, n, bits, 32, dtype, act_order=act_order)
    w = oracle.gptq_dequantize(np.asarray(qweight), np.asarray(qzeros), np.asarray(scales.astype(jnp.float32)),
                               np.asarray(g_idx), bits, False)
    w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))
    if exllama:
        perm = jnp.argsort(g_idx).astype(jnp.int32) if act_order else jnp.zeros((0,), jnp.int32)
        qweight, g_idx = jaxq.gptq_shuffle(qweight, perm, bits), perm
    elif not act_order:
        g_idx = jnp.zeros((0,), jnp.int32)
    x = random_x(rng, (m, k), dtype)
    got = jax.jit(lambda *a: jaxq.gptq_gemm(*a, use_exllama=exllama, bits=bits))(x, qweight, qzeros, scales, g_idx)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_l2(got, np.asarray(x, np.float64) @ w) < (1e-2 if dtype == jnp.bfloat16 else 3e-3)


def _primitives(f, *args):
    return {str(e.primitive) for e in jax.make_jaxpr(f)(*args).eqns}


def test_dispatch_threshold_both_sides():
    rng = np.random.default_rng(5)
    qweight, scales, qzeros = awq_weight(rng, 128, 64, 32, jnp.float16)
    limit = awq_ops.AWQ_GEMM_KERNEL_MAX_M
    small = _primitives(jaxq.awq_gemm, random_x(rng, (limit, 128), jnp.float16), qweight, scales, qzeros)
    large = _primitives(jaxq.awq_gemm, random_x(rng, (limit + 1, 128), jnp.float16), qweight, scales, qzeros)
    assert "jaxq_awq_dequantize_sharded" not in small and "dot_general" not in small  # the GEMM kernel
    assert "jaxq_awq_dequantize_sharded" in large and "dot_general" in large

    qw, qz, sc, _ = gptq_weight(rng, 128, 64, 4, 32, jnp.float16)
    empty = jnp.zeros((0,), jnp.int32)
    limit = gptq_ops.GPTQ_GEMM_KERNEL_MAX_M
    f = lambda x: jaxq.gptq_gemm(x, qw, qz, sc, empty, use_exllama=False)
    assert "jaxq_gptq_dequantize_sharded" not in _primitives(f, random_x(rng, (limit, 128), jnp.float16))
    assert "jaxq_gptq_dequantize_sharded" in _primitives(f, random_x(rng, (limit + 1, 128), jnp.float16))


def test_gptq_gemm_hopper_dispatch(monkeypatch):
    """Which gptq_gemm calls run marlin_gemm's Hopper kernel, decided at trace time without a GPU: 4-bit weights
    in exllama's layout (act-order through perm too), from the row past gptq_gemm's own kernel up to
    hopper_max_rows (the handler dispatches by rows, so every kernel call in that range carries the first row);
    never for the checkpoint layout or other bit widths. The results stay the reference's."""
    from jaxq.ops import marlin

    monkeypatch.setattr(marlin, "_hopper_gpu", lambda: True)
    seen = []
    gemm = gptq_ops._gptq_gemm
    monkeypatch.setattr(gptq_ops, "_gptq_gemm", lambda *a, **params: seen.append(params) or gemm(*a, **params))
    rng = np.random.default_rng(8)
    k, n = 256, 128
    first = gptq_ops.GPTQ_GEMM_KERNEL_MAX_M + 1
    x = random_x(rng, (marlin.HOPPER_MAX_ROWS + 1, k), jnp.bfloat16)
    for act_order in (False, True):
        qweight, qzeros, scales, g_idx = gptq_weight(rng, k, n, 4, 64, jnp.bfloat16, act_order=act_order,
                                                     symmetric=False)
        perm = jnp.argsort(g_idx).astype(jnp.int32) if act_order else jnp.zeros((0,), jnp.int32)
        shuffled = jaxq.gptq_shuffle(qweight, perm, 4)
        w = oracle.gptq_dequantize(np.asarray(qweight), np.asarray(qzeros), np.asarray(scales, np.float32),
                                   np.asarray(g_idx), 4, False)
        for m, hopper_from in ((1, first), (first - 1, first), (first, first), (marlin.HOPPER_MAX_ROWS, first),
                               (marlin.HOPPER_MAX_ROWS + 1, None)):
            seen.clear()
            got = jaxq.gptq_gemm(x[:m], shuffled, qzeros, scales, perm, use_exllama=True)
            assert [p["hopper_from_rows"] for p in seen] == ([] if hopper_from is None else [hopper_from]), m
            assert rel_l2(got, np.asarray(x[:m], np.float64) @ w) < 1e-2, m
    with marlin.hopper_limits(first_rows=1, max_rows=8):
        for m, hopper_from in ((1, 1), (8, 1), (9, 0)):  # 9: gptq_gemm's own kernel, past the Hopper rows
            seen.clear()
            jaxq.gptq_gemm(x[:m], shuffled, qzeros, scales, perm, use_exllama=True)
            assert [p["hopper_from_rows"] for p in seen] == [hopper_from], m
    empty = jnp.zeros((0,), jnp.int32)
    for bits, exllama in ((4, False), (8, True)):
        qweight, qzeros, scales, _ = gptq_weight(rng, k, n, bits, 64, jnp.bfloat16)
        qweight = jaxq.gptq_shuffle(qweight, empty, bits) if exllama else qweight
        seen.clear()
        jaxq.gptq_gemm(x[:first], qweight, qzeros, scales, empty, use_exllama=exllama, bits=bits)
        assert seen == []  # dequantize + dot
        jaxq.gptq_gemm(x[:1], qweight, qzeros, scales, empty, use_exllama=exllama, bits=bits)
        assert [p["hopper_from_rows"] for p in seen] == [0]


def test_awq_gemm_hopper_dispatch(monkeypatch):
    """awq_gemm's calls from the row past its own kernel up to hopper_max_rows carry the Hopper kernel's first
    row (decided at trace time, without a GPU); the results stay the reference's."""
    from jaxq.ops import marlin

    monkeypatch.setattr(marlin, "_hopper_gpu", lambda: True)
    seen = []
    gemm = awq_ops._awq_gemm
    monkeypatch.setattr(awq_ops, "_awq_gemm", lambda *a, **params: seen.append(params) or gemm(*a, **params))
    rng = np.random.default_rng(9)
    first = awq_ops.AWQ_GEMM_KERNEL_MAX_M + 1
    for n, hopper in ((256, True), (96, False)):  # N not a multiple of 128: not the Hopper kernel's
        qweight, scales, qzeros = awq_weight(rng, 256, n, 64, jnp.float16)
        w = oracle.awq_dequantize(np.asarray(qweight), np.asarray(scales, np.float32), np.asarray(qzeros))
        x = random_x(rng, (marlin.HOPPER_MAX_ROWS + 1, 256), jnp.float16)
        for m, hopper_from in ((1, first), (first, first), (marlin.HOPPER_MAX_ROWS, first),
                               (marlin.HOPPER_MAX_ROWS + 1, None)):
            hopper_from = hopper_from if hopper else (0 if m < first else None)
            seen.clear()
            got = jaxq.awq_gemm(x[:m], qweight, scales, qzeros)
            assert [p["hopper_from_rows"] for p in seen] == ([] if hopper_from is None else [hopper_from]), (n, m)
            assert rel_l2(got, np.asarray(x[:m], np.float64) @ w) < 3e-3, (n, m)


def test_split_k_choice_and_workspace():
    """The K split sizes the kernel's workspace (the kernel reads it back from there); on the CPU the
    reference ignores it, so the GPU tests check that results do not depend on it."""
    from jaxq.ops import _weight_only as wo

    assert wo.split_k(1, 28672, 8192, 32, sm_count=132) == 1  # 224 column tiles: 1.7 per SM
    assert wo.split_k(16, 14336, 4096, 32, sm_count=132) == 1  # 112 tiles: 0.85 per SM
    assert wo.split_k(1, 8192, 28672, 32, sm_count=132) == 4  # 64 tiles: 4 splits give 1.9 blocks per SM
    assert wo.split_k(1, 8192, 28672, 32, sm_count=200) == 5
    assert wo.split_k(1, 28672, 8192, 32, hint=8) == 8
    # every warp keeps at least 4 steps: K=512 has 16 steps of 32 rows, 4 per warp of one block
    assert wo.split_k(1, 128, 512, 32, sm_count=132) == 1
    assert wo.split_k(1, 256, 128, 32, hint=8) == 1  # never more splits than a block's warps have steps
    assert wo.gemm_workspace_words(5, 256, 1) == 2  # no partial sums, one counter per column tile
    assert wo.gemm_workspace_words(20, 256, 3) == 3 * 20 * 256 + 2 * 2


# ------------------------------------------------------------------------------ grad / vmap / jit


def test_grad_wrt_x_and_errors_for_weights():
    rng = np.random.default_rng(7)
    qweight, scales, qzeros = awq_weight(rng, 128, 64, 32, jnp.bfloat16)
    x = random_x(rng, (3, 128), jnp.bfloat16)
    dy = random_x(rng, (3, 64), jnp.bfloat16)
    w = jaxq.awq_dequantize(qweight, scales, qzeros).astype(jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(jaxq.awq_gemm(x, qweight, scales, qzeros).astype(jnp.float32) * dy))(x)
    assert dx.dtype == jnp.bfloat16
    assert rel_l2(dx, np.asarray(dy, np.float64) @ np.asarray(w).T) < 1e-2
    with pytest.raises(jaxq.NotDifferentiableError, match="scales"):
        jax.grad(lambda s: jnp.sum(jaxq.awq_gemm(x, qweight, s, qzeros).astype(jnp.float32)))(scales)
    # Integer inputs get float0 cotangents.
    _, vjp = jax.vjp(lambda x, q: jaxq.awq_gemm(x, q, scales, qzeros), x, qweight)
    _, dq = vjp(dy)
    assert dq.dtype == jax.dtypes.float0

    qw, qz, sc, _ = gptq_weight(rng, 128, 64, 3, 32, jnp.float16)
    empty = jnp.zeros((0,), jnp.int32)
    xh = x.astype(jnp.float16)
    dx = jax.grad(lambda x: jnp.sum(jaxq.gptq_gemm(x, qw, qz, sc, empty, use_exllama=False, bits=3)))(xh)
    w = jaxq.gptq_dequantize(qw, qz, sc, empty, bits=3).astype(jnp.float32)
    assert rel_l2(dx, np.ones((3, 64)) @ np.asarray(w).T) < 3e-3


def test_vmap_over_x_and_over_stacked_weights():
    rng = np.random.default_rng(8)
    qweight, scales, qzeros = awq_weight(rng, 128, 64, 32, jnp.float16)
    xs = random_x(rng, (4, 2, 128), jnp.float16)
    got = jax.vmap(lambda x: jaxq.awq_gemm(x, qweight, scales, qzeros))(xs)
    want = jnp.stack([jaxq.awq_gemm(x, qweight, scales, qzeros) for x in xs])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    stacked = [awq_weight(rng, 128, 64, 32, jnp.float16) for _ in range(3)]
    qw, sc, qz = (jnp.stack(t) for t in zip(*stacked))
    x = xs[0]
    got = jax.vmap(lambda q, s, z: jaxq.awq_gemm(x, q, s, z))(qw, sc, qz)
    want = jnp.stack([jaxq.awq_gemm(x, *t) for t in stacked])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_leading_dims_fold_into_rows():
    rng = np.random.default_rng(9)
    qweight, scales, qzeros = awq_weight(rng, 128, 64, 32, jnp.bfloat16)
    x = random_x(rng, (2, 3, 128), jnp.bfloat16)
    got = jaxq.awq_gemm(x, qweight, scales, qzeros)
    assert got.shape == (2, 3, 64)
    np.testing.assert_array_equal(np.asarray(got).reshape(6, 64),
                                  np.asarray(jaxq.awq_gemm(x.reshape(6, 128), qweight, scales, qzeros)))


# --------------------------------------------------------------------------------------- sharding

LAYOUTS = {  # name: (x spec, weight dim sharded: None, "k" or "n"), all-reduce expected
    "tokens": (P("d", None), None, False),
    "column_parallel": (P(None, None), "n", False),
    "row_parallel": (P(None, "d"), "k", True),
}


def _put(mesh, a, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_awq_gemm_sharded_equals_unsharded(layout):
    rng = np.random.default_rng(10)
    k, n = 512, 512  # 8 shards: 64 rows (groups of 64) or 64 columns (two kernel tiles of 32) each
    qweight, scales, qzeros = awq_weight(rng, k, n, 64, jnp.bfloat16)
    x = random_x(rng, (16, k), jnp.bfloat16)
    mesh = jax.make_mesh((8,), ("d",))
    x_spec, dim, reduces = LAYOUTS[layout]
    w_spec = P("d", None) if dim == "k" else P(None, "d") if dim == "n" else P()
    args = (_put(mesh, x, x_spec), _put(mesh, qweight, w_spec), _put(mesh, scales, w_spec), _put(mesh, qzeros, w_spec))
    f = jax.jit(jaxq.awq_gemm)
    got = f(*args)
    want = jaxq.awq_gemm(x, qweight, scales, qzeros)
    assert rel_l2(got, want) < 1e-2
    if dim is None:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ("all-reduce" in f.lower(*args).compile().as_text()) == reduces


def test_awq_gemm_row_parallel_on_a_mesh_axis_that_does_not_divide_the_groups():
    """K sharded over a 2-way axis of a (4, 2) mesh with 2 groups: the 4-way axis divides no group count, so
    the group factor must stay whole for it; it used to be both a reduction and a replicated factor, which
    Shardy refuses."""
    rng = np.random.default_rng(12)
    qweight, scales, qzeros = awq_weight(rng, 256, 128, 128, jnp.bfloat16)
    x = random_x(rng, (8, 256), jnp.bfloat16)
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    args = (_put(mesh, x, P("a", "b")), _put(mesh, qweight, P("b", None)), _put(mesh, scales, P("b", None)),
            _put(mesh, qzeros, P("b", None)))
    got = jax.jit(jaxq.awq_gemm)(*args)
    assert rel_l2(got, jaxq.awq_gemm(x, qweight, scales, qzeros)) < 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_gemm_sharded_equals_unsharded(layout, bits):
    rng = np.random.default_rng(11)
    k, n = 512, 512
    qweight, qzeros, scales, _ = gptq_weight(rng, k, n, bits, 64, jnp.float16)
    empty = jnp.zeros((0,), jnp.int32)
    x = random_x(rng, (16, k), jnp.float16)
    mesh = jax.make_mesh((8,), ("d",))
    x_spec, dim, reduces = LAYOUTS[layout]
    w_spec = P("d", None) if dim == "k" else P(None, "d") if dim == "n" else P()
    args = (_put(mesh, x, x_spec), _put(mesh, qweight, w_spec), _put(mesh, qzeros, w_spec), _put(mesh, scales, w_spec))
    f = jax.jit(lambda x, q, z, s: jaxq.gptq_gemm(x, q, z, s, empty, use_exllama=False, bits=bits))
    got = f(*args)
    want = jaxq.gptq_gemm(x, qweight, qzeros, scales, empty, use_exllama=False, bits=bits)
    assert rel_l2(got, want) < 3e-3
    assert ("all-reduce" in f.lower(*args).compile().as_text()) == reduces


def test_act_order_dequantize_keeps_k_whole_when_sharded():
    rng = np.random.default_rng(12)
    qweight, qzeros, scales, g_idx = gptq_weight(rng, 256, 64, 4, 32, jnp.float16, act_order=True)
    mesh = jax.make_mesh((8,), ("d",))
    f = jax.jit(lambda *a: jaxq.gptq_dequantize(*a, bits=4))
    got = f(_put(mesh, qweight, P("d", None)), qzeros, scales, _put(mesh, g_idx, P("d")))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jaxq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits=4)))


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    rng = np.random.default_rng(13)
    qweight, scales, qzeros = awq_weight(rng, 128, 64, 32, jnp.float16)
    x = random_x(rng, (2, 128), jnp.float16)
    with pytest.raises(TypeError, match="x must be float16 or bfloat16"):
        jaxq.awq_gemm(x.astype(jnp.float32), qweight, scales, qzeros)
    with pytest.raises(TypeError, match="scales .* must have x's dtype"):
        jaxq.awq_gemm(x.astype(jnp.bfloat16), qweight, scales, qzeros)
    with pytest.raises(ValueError, match="must end in K=128"):
        jaxq.awq_gemm(x[:, :64], qweight, scales, qzeros)
    with pytest.raises(TypeError, match="qweight must be an int32"):
        jaxq.awq_gemm(x, qweight.astype(jnp.uint32), scales, qzeros)
    with pytest.raises(ValueError, match="qzeros"):
        jaxq.awq_gemm(x, qweight, scales, qzeros[:, :4])
    with pytest.raises(ValueError, match="scales must have shape"):
        jaxq.awq_gemm(x, qweight, scales[:, :32], qzeros)
    with pytest.raises(ValueError, match="multiple of 32"):
        q16, s16, z16 = awq_weight(rng, 128, 64, 16, jnp.float16)
        jaxq.awq_gemm(x, q16, s16, z16)
    with pytest.raises(ValueError, match="split_k_iters"):
        jaxq.awq_gemm(x, qweight, scales, qzeros, split_k_iters=0)

    qw, qz, sc, g_idx = gptq_weight(rng, 128, 64, 4, 32, jnp.float16)
    with pytest.raises(ValueError, match="bits must be one of"):
        jaxq.gptq_gemm(x, qw, qz, sc, g_idx, use_exllama=False, bits=5)
    with pytest.raises(ValueError, match="g_idx must have K=128"):
        jaxq.gptq_gemm(x, qw, qz, sc, g_idx[:5], use_exllama=False)
    with pytest.raises(ValueError, match="qzeros"):
        jaxq.gptq_gemm(x, qw, qz[:, :3], sc, g_idx, use_exllama=False)
    with pytest.raises(ValueError, match="perm must have K=128"):
        jaxq.gptq_shuffle(qw, g_idx[:3], 4)
    with pytest.raises(TypeError, match="g_idx must be an int32"):
        jaxq.gptq_gemm(x, qw, qz, sc, g_idx.astype(jnp.float32), use_exllama=False)


def test_vmap_over_stacked_weights_dequantizes_each():
    rng = np.random.default_rng(14)
    stacked = [awq_weight(rng, 128, 64, 32, jnp.float16) for _ in range(3)]
    qw, sc, qz = (jnp.stack(t) for t in zip(*stacked))
    got = jax.vmap(jaxq.awq_dequantize)(qw, sc, qz)
    np.testing.assert_array_equal(np.asarray(got), np.stack([np.asarray(jaxq.awq_dequantize(*t)) for t in stacked]))

    weights = [gptq_weight(rng, 128, 64, 3, 32, jnp.bfloat16, act_order=True) for _ in range(2)]
    qw, qz, sc, gi = (jnp.stack(t) for t in zip(*weights))
    got = jax.vmap(lambda *a: jaxq.gptq_dequantize(*a, bits=3))(qw, qz, sc, gi)
    want = np.stack([np.asarray(jaxq.gptq_dequantize(*t, bits=3)) for t in weights])
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("dim", ["k", "n"])
def test_awq_dequantize_sharded_equals_unsharded(dim):
    rng = np.random.default_rng(15)
    qweight, scales, qzeros = awq_weight(rng, 512, 512, 64, jnp.bfloat16)
    mesh = jax.make_mesh((8,), ("d",))
    spec = P("d", None) if dim == "k" else P(None, "d")
    f = jax.jit(jaxq.awq_dequantize)
    args = [_put(mesh, t, spec) for t in (qweight, scales, qzeros)]
    got = f(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jaxq.awq_dequantize(qweight, scales, qzeros)))
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)  # no gather: the shards stay put
