"""CUDA kernels vs their jnp reference (run on the CPU), bit for bit, outputs poisoned first.

Needs a GPU and a CUDA build: ``pytest -m gpu``; skipped otherwise (conftest)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from helpers import assert_bits_equal, random_activations

pytestmark = pytest.mark.gpu

M_VALUES = [1, 7, 128, 4097]
K_VALUES = [128, 7168]


def _on(device_kind, f, *args):
    device = jax.devices(device_kind)[0]
    return jax.jit(f)(*[jax.device_put(a, device) for a in args])


def _compare(f, *args):
    got = _on("cuda", f, *args)
    want = _on("cpu", f, *args)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_bits_equal(np.asarray(g), np.asarray(w), f"output {i}")


def test_poisoning_is_on_and_kernels_are_used():
    assert os.environ.get("JAXQ_POISON_OUTPUTS") == "1"
    x = jnp.ones((4, 128), jnp.bfloat16)
    text = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 128)).lower(jax.device_put(x, jax.devices("cuda")[0])).as_text()
    assert "jaxq_per_token_group_quant" in text


GROUP_VARIANTS = {
    "fp8_row": dict(),
    "fp8_row_ue8m0": dict(scale_ue8m0=True),
    "fp8_col": dict(column_major_scales=True),
    "fp8_col_tma_ue8m0": dict(column_major_scales=True, tma_aligned_scales=True, scale_ue8m0=True),
    "int8_row": dict(out_dtype=jnp.int8),
}


@pytest.mark.parametrize("variant", list(GROUP_VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_group_quant_kernel(m, k, dtype, variant):
    x = random_activations(np.random.default_rng(m * k), (m, k), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, 128, **GROUP_VARIANTS[variant]), x)


def _every_value_below(rng, dtype, maxima):
    """Rows of 128: each starts with its group's maximum, then every finite value of ``dtype`` from maximum / 2^12
    up to it, of both signs, for each of ``maxima`` random maxima (the last row filled with zeros)."""
    every = np.arange(0x7C00 if dtype == jnp.float16 else 0x7F80, dtype=np.uint16).view(jnp.dtype(dtype))
    every = every.astype(np.float32)
    rows = []
    for amax in rng.choice(every[(every > 2.0 ** -24) & (every < 2.0 ** 14)], maxima):
        values = every[(every >= amax / 4096) & (every <= amax)]
        values = np.concatenate([values, -values])
        values = np.pad(values, (0, -len(values) % 127))
        rows.append(np.concatenate([np.full((len(values) // 127, 1), amax, np.float32), values.reshape(-1, 127)], 1))
    return jnp.asarray(np.concatenate(rows), dtype)


@pytest.mark.parametrize("out_dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_group_quant_kernel_every_value_below_the_group_max(dtype, out_dtype):
    """Every 16-bit value a group with one of 40 random maxima can hold (down to 2^-12 of it): each quotient x /
    scale the kernel computes, so every fp8 and int8 tie its division could get wrong, against the reference's
    IEEE division."""
    x = _every_value_below(np.random.default_rng(), dtype, 40)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, 128, out_dtype=out_dtype), x)


@pytest.mark.parametrize("group_size", [16, 32, 96, 1024, 3072])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_group_quant_kernel_group_sizes(group_size, dtype):
    if group_size * jnp.dtype(dtype).itemsize % 16:
        pytest.skip("group size too small for this dtype")
    x = random_activations(np.random.default_rng(group_size), (2, 3, 33, 3072), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, group_size, column_major_scales=True, tma_aligned_scales=True), x)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, group_size, out_dtype=jnp.int8), x)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_packed_kernel(m, k, dtype, group_size):
    x = random_activations(np.random.default_rng(m + k), (m, k), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant_packed(x, group_size), x)


def test_packed_kernel_batched():
    x = random_activations(np.random.default_rng(11), (3, 5, 640), jnp.bfloat16)  # 5 groups: padding bytes
    _compare(jax.vmap(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128)), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", K_VALUES + [80])
@pytest.mark.parametrize("m", M_VALUES)
def test_nvfp4_kernel(m, k, dtype):
    x = random_activations(np.random.default_rng(m * 3 + k), (m, k), dtype)
    gs = jnp.float32(448.0 * 6.0 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    _compare(jaxq.scaled_fp4_quant, x, gs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_nvfp4_kernel_rounding_ties(dtype):
    # Blocks with maximum 6 * 2^e and global scale 1 have block scale 2^e, so values reach the rounding
    # as they are: every e2m1 midpoint, and one step of the input type either side of it, both signs.
    midpoints = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    mantissa_bits = 7 if dtype == jnp.bfloat16 else 10
    step = np.exp2(np.floor(np.log2(midpoints)) - mantissa_bits).astype(np.float32)
    blocks = []
    for near in (midpoints, midpoints + step, midpoints - step):
        blocks.append(np.concatenate([[6.0], near, -near, [0.0]]))
    rows = [np.concatenate(blocks) * np.float32(2.0**e) for e in range(-6, 7)]
    x = jnp.asarray(np.stack(rows), dtype)
    _compare(jaxq.scaled_fp4_quant, x, jnp.float32(1.0))  # three blocks per row: one per thread
    _compare(jaxq.scaled_fp4_quant, jnp.concatenate([x, -x], axis=1), jnp.float32(1.0))  # six: two per thread


def test_nvfp4_kernel_batched_global_scales():
    x = random_activations(np.random.default_rng(12), (3, 130, 256), jnp.bfloat16)
    _compare(jax.vmap(jaxq.scaled_fp4_quant), x, jnp.asarray([0.5, 3.0, 2000.0], jnp.float32))


def test_disable_switch_lowers_to_reference(monkeypatch):
    monkeypatch.setenv("JAXQ_DISABLE_KERNELS", "scaled_fp4_quant")
    x = jax.device_put(jnp.ones((4, 32), jnp.bfloat16), jax.devices("cuda")[0])
    text = jax.jit(lambda x: jaxq.scaled_fp4_quant(x, jnp.float32(1.0))).lower(x).as_text()
    assert "jaxq_scaled_fp4_quant" not in text


# ------------------------------------------------------------------------------- AWQ / GPTQ kernels

from jaxq import formats  # noqa: E402


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare_close(f, *args, tol):
    got = _on("cuda", f, *args)
    want = _on("cpu", f, *args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert _rel_l2(got, want) <= tol, _rel_l2(got, want)


def _gemm_tol(dtype):
    return 1e-2 if dtype == jnp.bfloat16 else 3e-3


def test_weight_only_kernels_are_used():
    rng = np.random.default_rng(0)
    qw, sc, qz = formats.quantize_awq(jnp.asarray(rng.standard_normal((128, 64)), jnp.float16), 32)
    x = jax.device_put(jnp.ones((4, 128), jnp.float16), jax.devices("cuda")[0])
    text = jax.jit(jaxq.awq_gemm).lower(x, qw, sc, qz).as_text()
    assert "jaxq_weight_only_gemm" in text


AWQ_SHAPES = [(1, 256, 128), (7, 512, 96), (16, 1024, 256), (17, 384, 32), (32, 4096, 1024), (48, 512, 160), (64, 512, 128)]


@pytest.mark.parametrize("m,k,n", AWQ_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_gemm_kernel(m, k, n, dtype, group_size):
    if group_size > 0 and k % group_size:
        pytest.skip("K not a multiple of the group")
    rng = np.random.default_rng(m * k + n)
    qw, sc, qz = formats.quantize_awq(jnp.asarray(rng.standard_normal((k, n)), dtype), group_size)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    _compare_close(jaxq.awq_gemm, x, qw, sc, qz, tol=_gemm_tol(dtype))
    _compare(lambda *a: (jaxq.awq_dequantize(*a),), qw, sc, qz)


GPTQ_SHAPES = [(1, 256, 128), (9, 384, 96), (16, 1024, 256), (32, 2048, 512), (64, 512, 64)]


@pytest.mark.parametrize("m,k,n", GPTQ_SHAPES)
@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
@pytest.mark.parametrize("variant", ["plain", "exllama", "exllama_act_order", "act_order_v2"])
def test_gptq_gemm_kernel(m, k, n, bits, variant):
    dtype = jnp.bfloat16 if (m + bits) % 2 else jnp.float16
    rng = np.random.default_rng(m + k + bits)
    act_order = "act_order" in variant
    v2 = variant.endswith("v2")
    order = rng.permutation(k) if act_order else None
    qw, qz, sc, g_idx = formats.quantize_gptq(jnp.asarray(rng.standard_normal((k, n)), dtype), bits, 64 if k % 128 else 128,
                                              act_order=order, v2_format=v2, symmetric=False)
    exllama = variant.startswith("exllama")
    if exllama:
        perm = jnp.argsort(g_idx).astype(jnp.int32) if act_order else jnp.zeros((0,), jnp.int32)
        qw, g_idx = jaxq.gptq_shuffle(qw, perm, bits), perm
    elif not act_order:
        g_idx = jnp.zeros((0,), jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    f = lambda *a: jaxq.gptq_gemm(*a, use_exllama=exllama, use_v2_format=v2, bits=bits)
    _compare_close(f, x, qw, qz, sc, g_idx, tol=_gemm_tol(dtype))
    _compare(lambda *a: (jaxq.gptq_dequantize(*a, bits=bits, use_v2_format=v2, use_exllama=exllama),), qw, qz, sc, g_idx)


@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
def test_gptq_kernels_clamp_corrupt_g_idx(bits):
    """A corrupt checkpoint's g_idx (past the last group, negative): the kernels clamp as the reference does,
    and never read past the scales (tools/gemm_kernels.py runs the same under compute-sanitizer memcheck)."""
    rng = np.random.default_rng(bits)
    k, n = 1024, 96
    qw, qz, sc, g_idx = formats.quantize_gptq(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), bits, 128,
                                              act_order=rng.permutation(k), symmetric=False)
    g_idx = g_idx.at[::7].set(1 << 20).at[3::11].set(-1)
    x = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
    got = _on("cuda", lambda *a: jaxq.gptq_gemm(*a, use_exllama=False, bits=bits), x, qw, qz, sc, g_idx)
    want = _on("cpu", lambda *a: jaxq.gptq_gemm(*a, use_exllama=False, bits=bits), x, qw, qz, sc,
               jnp.clip(g_idx, 0, sc.shape[0] - 1))
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert _rel_l2(got, want) < _gemm_tol(jnp.bfloat16)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("split", [None, 1, 3, 7])
def test_awq_gemm_kernel_large_and_split(m, split):
    """Long K split unevenly: warps start and end inside groups."""
    rng = np.random.default_rng(1)
    k, n = 8192, 2048
    qw, sc, qz = formats.quantize_awq(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), 128)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    _compare_close(lambda *a: jaxq.awq_gemm(*a, split_k_iters=split), x, qw, sc, qz, tol=1e-2)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits", formats.GPTQ_BITS)
def test_gptq_gemm_kernel_long_k(m, bits):
    """The default K split at a long K, for every bit width (steps of 16 to 128 rows, 1 to 8 per group)."""
    rng = np.random.default_rng(bits)
    k, n = 8192, 1024
    qw, qz, sc, _ = formats.quantize_gptq(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), bits, 128, symmetric=False)
    qw = jaxq.gptq_shuffle(qw, jnp.zeros((0,), jnp.int32), bits)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    f = lambda *a: jaxq.gptq_gemm(*a, jnp.zeros((0,), jnp.int32), use_exllama=True, bits=bits)
    _compare_close(f, x, qw, qz, sc, tol=1e-2)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_gemm_kernel_narrow_column_blocks(m, bits):
    """More column tiles than SMs, by less than a 96-column block per SM: the kernel gives the first block of
    each SM a whole tile and the rest 96 columns (csrc/kernels/weight_only.cu, ColumnBlocksFor); the last one
    here holds 32 columns."""
    sms = jax.devices("cuda")[0].core_count
    k, n = 256, sms * 128 + 3 * 96 + 32
    rng = np.random.default_rng(m * bits)
    dtype = jnp.float16 if m == 5 else jnp.bfloat16
    qw, qz, sc, _ = formats.quantize_gptq(jnp.asarray(rng.standard_normal((k, n)), dtype), bits, 128, symmetric=False)
    exllama = bits != 8
    if exllama:
        qw = jaxq.gptq_shuffle(qw, jnp.zeros((0,), jnp.int32), bits)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    f = lambda *a: jaxq.gptq_gemm(*a, jnp.zeros((0,), jnp.int32), use_exllama=exllama, bits=bits)
    _compare_close(f, x, qw, qz, sc, tol=_gemm_tol(dtype))


def _gptq4_weight(rng, k, n, group_size, dtype, v2, act_order):
    """Random 4-bit GPTQ tensors with every stored zero (v1's 15 is a zero of 16), act-order as GPTQ numbers its
    groups: (qweight in exllama's layout, qzeros, scales, perm or empty, the oracle's W [K, N] in input order)."""
    import oracle

    groups = k // group_size
    q = rng.integers(0, 16, (k, n))
    stored = rng.integers(0, 16, (groups, n))
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (groups, n)) * 2.0**-6, dtype)
    g_idx = (np.argsort(rng.permutation(k)) // group_size if act_order else np.arange(k) // group_size).astype(np.int32)
    qweight, qzeros = oracle.bitstream_pack(q, 4, 0), oracle.bitstream_pack(stored, 4, 1)
    w = oracle.gptq_dequantize(qweight, qzeros, np.asarray(scales, np.float32), g_idx, 4, v2)
    perm = jnp.asarray(np.argsort(g_idx, kind="stable"), jnp.int32) if act_order else jnp.zeros((0,), jnp.int32)
    return jaxq.gptq_shuffle(jnp.asarray(qweight), perm, 4), jnp.asarray(qzeros), scales, perm, w


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("group_size,v2,act_order", [(128, False, False), (32, True, False), (64, False, True),
                                                     (-1, False, False)])
def test_gptq_gemm_hopper_kernel(group_size, v2, act_order, dtype):
    """4-bit GPTQ in exllama's layout on marlin_gemm's Hopper kernel, forced from one row (each row block of 16 to
    128 rows and tails, K whole and split over clusters of 2 and 8 blocks): against the jnp reference and the NumPy
    oracle, asymmetric zeros in v1 and v2, act-order through perm; the lowering says which kernel ran."""
    from jaxq.ops import gptq as gptq_ops, marlin

    if not marlin._hopper_gpu():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    rng = np.random.default_rng()
    for k, n in ((256, 4096), (1024, 384), (4096, 1024)):
        qw, qz, sc, perm, w = _gptq4_weight(rng, k, n, k if group_size == -1 else group_size, dtype, v2, act_order)
        f = lambda x, *weight: jaxq.gptq_gemm(x, *weight, use_exllama=True, use_v2_format=v2, bits=4)
        reference = gptq_ops.gptq_dequantize_reference(qw, qz, sc, bits=4, exllama=True, v2=v2)  # rows in perm order
        for m in (1, 17, 33, 65, 128, 200, 256):  # each row block (16 to 128 rows), tails, several blocks
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            with marlin.hopper_limits(first_rows=1, max_rows=marlin.HOPPER_MAX_ROWS):
                lowered = jax.jit(f).lower(x, qw, qz, sc, perm)
            assert "hopper_from_rows = 1 " in lowered.as_text(), (k, n, m)
            got = lowered.compile()(x, qw, qz, sc, perm)
            want = jnp.dot(jnp.take(x, perm, axis=1) if act_order else x, reference,
                           preferred_element_type=jnp.float32).astype(dtype)
            assert np.isfinite(np.asarray(got, np.float32)).all(), (k, n, m)
            assert _rel_l2(got, want) <= _gemm_tol(dtype), (k, n, m, _rel_l2(got, want))
            assert _rel_l2(got, np.asarray(x, np.float64) @ w) <= _gemm_tol(dtype), (k, n, m)


def test_gptq_gemm_hopper_rows_are_batch_invariant():
    """gptq_gemm's rows on the Hopper kernel (65 to hopper_max_rows by default) are bit-identical in any batch of
    that range, with K whole and split over clusters."""
    from jaxq.ops import gptq as gptq_ops, marlin

    if not marlin._hopper_gpu():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    rng = np.random.default_rng()
    first = gptq_ops.GPTQ_GEMM_KERNEL_MAX_M + 1
    for k, n in ((256, 4096), (4096, 1024)):
        qw, qz, sc, perm, _ = _gptq4_weight(rng, k, n, 128, jnp.bfloat16, False, False)
        f = jax.jit(lambda x, *weight: jaxq.gptq_gemm(x, *weight, use_exllama=True, bits=4))
        x = jnp.asarray(rng.standard_normal((marlin.HOPPER_MAX_ROWS, k)), jnp.bfloat16)
        full = np.asarray(f(x, qw, qz, sc, perm)).view(np.uint16)
        for lo, hi in ((0, first), (0, 128), (0, 200), (first, 2 * first + 7), (100, 228)):
            np.testing.assert_array_equal(np.asarray(f(x[lo:hi], qw, qz, sc, perm)).view(np.uint16), full[lo:hi],
                                          err_msg=f"{k} {n} {lo}:{hi}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_gemm_hopper_kernel(group_size, dtype):
    """AutoAWQ weights on marlin_gemm's Hopper kernel, forced from one row (each row block and tails, K whole and
    split over clusters): against the jnp reference and the NumPy oracle, every zero point; then a row's result
    is bit-identical in any batch of the default Hopper rows."""
    import oracle
    from jaxq.ops import awq as awq_ops, marlin

    if not marlin._hopper_gpu():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    rng = np.random.default_rng()
    f = jax.jit(lambda x, *weight: jaxq.awq_gemm(x, *weight))
    for k, n in ((256, 4096), (1024, 384), (4096, 1024)):
        groups = 1 if group_size == -1 else k // group_size
        q, zeros = rng.integers(0, 16, (k, n)), rng.integers(0, 16, (groups, n))
        scales = jnp.asarray(rng.uniform(0.5, 2.0, (groups, n)) * 2.0**-6, dtype)
        qw, qz = formats.pack_awq(jnp.asarray(q)), formats.pack_awq(jnp.asarray(zeros))
        w = oracle.awq_dequantize(np.asarray(qw), np.asarray(scales, np.float32), np.asarray(qz))
        reference = awq_ops.awq_dequantize_reference(qw, qz, scales)
        for m in (1, 17, 33, 65, 128, 200, 256):  # each row block (16 to 128 rows), tails, several blocks
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            with marlin.hopper_limits(first_rows=1, max_rows=marlin.HOPPER_MAX_ROWS):
                lowered = jax.jit(lambda x, *weight: jaxq.awq_gemm(x, *weight)).lower(x, qw, scales, qz)
            assert "hopper_from_rows = 1 " in lowered.as_text(), (k, n, m)
            got = lowered.compile()(x, qw, scales, qz)
            want = jnp.dot(x, reference, preferred_element_type=jnp.float32).astype(dtype)
            assert np.isfinite(np.asarray(got, np.float32)).all(), (k, n, m)
            assert _rel_l2(got, want) <= _gemm_tol(dtype), (k, n, m, _rel_l2(got, want))
            assert _rel_l2(got, np.asarray(x, np.float64) @ w) <= _gemm_tol(dtype), (k, n, m)
        x = jnp.asarray(rng.standard_normal((marlin.HOPPER_MAX_ROWS, k)), dtype)
        full = np.asarray(f(x, qw, scales, qz)).view(np.uint16)
        first = awq_ops.AWQ_GEMM_KERNEL_MAX_M + 1
        for lo, hi in ((0, first), (0, 200), (first, 2 * first + 7), (100, 228)):
            np.testing.assert_array_equal(np.asarray(f(x[lo:hi], qw, scales, qz)).view(np.uint16), full[lo:hi],
                                          err_msg=f"{k} {n} {lo}:{hi}")


def test_weight_only_gemm_gradient_on_gpu():
    rng = np.random.default_rng(2)
    qw, sc, qz = formats.quantize_awq(jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16), 64)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    f = lambda x, qw, sc, qz: jax.grad(lambda x: jnp.sum(jaxq.awq_gemm(x, qw, sc, qz).astype(jnp.float32)))(x)
    _compare_close(f, x, qw, sc, qz, tol=1e-2)


# ------------------------------------------------------------------------------- W8A8 scaled GEMMs

from helpers import assert_within_one_ulp  # noqa: E402

SCALED_MM_SCALES = {"tensor": lambda m, n: ((), (1,)), "token_channel": lambda m, n: ((m, 1), (1, n)),
                    "token": lambda m, n: ((m, 1), ()), "channel": lambda m, n: ((1,), (1, n))}
# M across every tile bucket and its edges (1-16 / 17-64 / 65-128 / larger), N and K off the tile sizes.
SCALED_MM_SHAPES = [(1, 256, 128), (5, 272, 208), (16, 512, 64), (17, 1024, 336), (64, 128, 128), (65, 384, 256),
                    (128, 256, 144), (129, 512, 512), (4097, 1024, 272)]


def _scaled_mm_inputs(rng, m, k, n, dtype, form):
    if dtype == jnp.int8:
        a = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        b = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    else:
        a = jnp.asarray(rng.standard_normal((m, k)) * 4, dtype)
        b = jnp.asarray(rng.standard_normal((k, n)) * 4, dtype)
    sa_shape, sb_shape = SCALED_MM_SCALES[form](m, n)
    sa = jnp.asarray(rng.uniform(0.5, 2.0, sa_shape) * 1e-2, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 2.0, sb_shape) * 1e-2, jnp.float32)
    return a, b, sa, sb


def _scaled_mm_bias(rng, n, out_dtype):
    return jnp.asarray(rng.standard_normal(n), out_dtype)


def _data_movement(hlo: str) -> list[str]:
    """The transposes, copies and fusions of an optimized HLO module: none means operands reach the custom
    call as they are."""
    ops = [re.findall(r" ([a-z][\w-]*)\(", line.split(" = ", 1)[1])[:1] for line in hlo.splitlines() if " = " in line]
    return [op[0] for op in ops if op and op[0] in ("transpose", "copy", "copy-start", "fusion")]


def test_scaled_mm_kernel_is_used_and_reads_w_t_without_a_copy():
    """A [N, K] weight passed as w.T reaches the kernel as a column-major operand: no transpose, no copy."""
    rng = np.random.default_rng(0)
    a, b, sa, sb = _scaled_mm_inputs(rng, 64, 512, 256, jnp.float8_e4m3fn, "token_channel")
    w = jnp.asarray(b.T)  # stored [N, K], as checkpoints keep it
    f = jax.jit(lambda a, w, sa, sb: jaxq.cutlass_scaled_mm(a, w.T, sa, sb, jnp.bfloat16))
    cuda = jax.devices("cuda")[0]
    args = [jax.device_put(x, cuda) for x in (a, w, sa, sb)]
    hlo = f.lower(*args).compile().as_text()
    assert "jaxq_scaled_mm" in hlo
    assert not _data_movement(hlo), hlo
    _compare_close(lambda a, w, sa, sb: jaxq.cutlass_scaled_mm(a, w.T, sa, sb, jnp.bfloat16), *args, tol=2e-3)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("form", list(SCALED_MM_SCALES))
@pytest.mark.parametrize("m,k,n", SCALED_MM_SHAPES)
def test_scaled_mm_int8_kernel(m, k, n, form, out_dtype, with_bias):
    """int32 accumulation is exact: the kernel equals the reference up to the rounding of the scaled value."""
    rng = np.random.default_rng(m + k + n)
    a, b, sa, sb = _scaled_mm_inputs(rng, m, k, n, jnp.int8, form)
    bias = _scaled_mm_bias(rng, n, out_dtype) if with_bias else None
    f = lambda a, b, sa, sb: jaxq.cutlass_scaled_mm(a, b, sa, sb, out_dtype, bias=bias)
    got, want = _on("cuda", f, a, b, sa, sb), _on("cpu", f, a, b, sa, sb)
    assert got.dtype == want.dtype == out_dtype and got.shape == (m, n)
    assert_within_one_ulp(got, want, out_dtype)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("form", ["tensor", "token_channel"])
@pytest.mark.parametrize("m,k,n", SCALED_MM_SHAPES + [(33, 8192, 1024)])
def test_scaled_mm_fp8_kernel(m, k, n, form, out_dtype, with_bias):
    rng = np.random.default_rng(m * 3 + k + n)
    a, b, sa, sb = _scaled_mm_inputs(rng, m, k, n, jnp.float8_e4m3fn, form)
    bias = _scaled_mm_bias(rng, n, out_dtype) if with_bias else None
    _compare_close(lambda a, b, sa, sb: jaxq.cutlass_scaled_mm(a, b, sa, sb, out_dtype, bias=bias), a, b, sa, sb,
                   tol=2e-3)


# The tensor core's fp8 accumulator is narrower than float32 (CUTLASS's FP8FastAccum keeps all of K in it):
# a bf16-class error, so bf16's bound from METHOD.md. Measured in benchmarks/RESULTS.md.
FAST_ACCUM_TOL = 1e-2


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (64, 512, 128), (65, 384, 256), (128, 256, 144), (129, 512, 512),
                                   (4097, 1024, 272), (256, 8192, 1024)])
def test_scaled_mm_fp8_fast_accum_kernel(m, k, n, out_dtype):
    rng = np.random.default_rng(m * 5 + k + n)
    a, b, sa, sb = _scaled_mm_inputs(rng, m, k, n, jnp.float8_e4m3fn, "token_channel")
    bias = _scaled_mm_bias(rng, n, out_dtype)
    f = lambda a, b, sa, sb: jaxq.cutlass_scaled_mm(a, b, sa, sb, out_dtype, bias=bias, use_fast_accum=True)
    _compare_close(f, a, b, sa, sb, tol=FAST_ACCUM_TOL if m > 64 else 2e-3)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (17, 512, 208), (100, 256, 64), (300, 512, 256)])
def test_scaled_mm_azp_kernel(m, k, n, with_bias, per_token):
    rng = np.random.default_rng(m + n)
    a, b, sa, sb = _scaled_mm_inputs(rng, m, k, n, jnp.int8, "token_channel")
    if per_token:
        azp = jnp.asarray(rng.integers(-20, 20, m), jnp.int32)
        adj = jaxq.cutlass_azp_adj(b)
    else:
        azp, adj = None, jaxq.cutlass_azp_adj(b, 7)
    bias = _scaled_mm_bias(rng, n, jnp.bfloat16) if with_bias else None
    f = lambda a, b, sa, sb, adj: jaxq.cutlass_scaled_mm_azp(a, b, sa, sb, jnp.bfloat16, adj, azp=azp, bias=bias)
    got, want = _on("cuda", f, a, b, sa, sb, adj), _on("cpu", f, a, b, sa, sb, adj)
    assert_within_one_ulp(got, want, jnp.bfloat16)


def test_scaled_mm_batched_on_gpu():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.integers(-128, 128, (3, 7, 256)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, (256, 96)), jnp.int8)
    sa = jnp.asarray(rng.uniform(0.5, 2, (3, 7, 1)) * 1e-2, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 2, (1, 96)) * 1e-2, jnp.float32)
    f = jax.vmap(lambda a, sa: jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16))
    assert_within_one_ulp(_on("cuda", f, a, sa), _on("cpu", f, a, sa), jnp.bfloat16)


# M over both block-wise tiles (<= 64, larger), M % 4 != 0 (padded), N off the 128-column scale blocks.
BLOCK_SCALED_SHAPES = [(1, 128, 256), (5, 512, 208), (64, 256, 384), (65, 384, 128), (130, 1024, 272), (4097, 512, 1024),
                       (33, 8192, 256)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m,k,n", BLOCK_SCALED_SHAPES)
def test_scaled_mm_block_wise_kernel(m, k, n, out_dtype, with_bias):
    rng = np.random.default_rng(m + 7 * k + n)
    a, b, _, _ = _scaled_mm_inputs(rng, m, k, n, jnp.float8_e4m3fn, "tensor")
    sa = jnp.asarray(rng.uniform(0.5, 2.0, (m, k // 128)) * 1e-2, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, -(-n // 128))) * 1e-2, jnp.float32)
    bias = _scaled_mm_bias(rng, n, out_dtype) if with_bias else None
    f = lambda a, b, sa, sb: jaxq.cutlass_scaled_mm(a, b, sa, sb, out_dtype, bias=bias)
    cuda = jax.devices("cuda")[0]
    assert "jaxq_scaled_mm" in jax.jit(f).lower(*[jax.device_put(x, cuda) for x in (a, b, sa, sb)]).as_text()
    _compare_close(f, a, b, sa, sb, tol=2e-3)


def test_scaled_mm_block_wise_batched_on_gpu():
    rng = np.random.default_rng(6)
    a = jnp.asarray(rng.standard_normal((3, 7, 256)) * 4, jnp.float8_e4m3fn)
    b = jnp.asarray(rng.standard_normal((256, 384)) * 4, jnp.float8_e4m3fn)
    sa = jnp.asarray(rng.uniform(0.5, 2, (3, 7, 2)) * 1e-2, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 2, (2, 3)) * 1e-2, jnp.float32)
    _compare_close(jax.vmap(lambda a, sa: jaxq.cutlass_scaled_mm(a, b, sa, sb, jnp.bfloat16)), a, sa, tol=2e-3)


def test_scaled_mm_block_wise_reads_column_major_scales_without_a_copy():
    """Scales a DeepGEMM-style quantizer wrote column-major ([K/128, M] in memory), passed as its .T, and a
    [N, K] weight passed as w.T, reach the kernel with no transpose or copy."""
    rng = np.random.default_rng(5)
    m, k, n = 64, 512, 256
    a, b, _, _ = _scaled_mm_inputs(rng, m, k, n, jnp.float8_e4m3fn, "tensor")
    sa_t = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, m)) * 1e-2, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, n // 128)) * 1e-2, jnp.float32)
    w = jnp.asarray(b.T)
    f = lambda a, w, sa_t, sb: jaxq.cutlass_scaled_mm(a, w.T, sa_t.T, sb, jnp.bfloat16)
    cuda = jax.devices("cuda")[0]
    args = [jax.device_put(x, cuda) for x in (a, w, sa_t, sb)]
    hlo = jax.jit(f).lower(*args).compile().as_text()
    assert not _data_movement(hlo), hlo
    _compare_close(f, *args, tol=2e-3)
