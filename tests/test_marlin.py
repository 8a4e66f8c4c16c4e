"""marlin_gemm and its repack helpers: layouts vs a transcription of vLLM's repack loops, the reference vs a
NumPy oracle, jit/vmap/grad, sharding, errors (CPU); the kernel vs the reference (``-m gpu``)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
import oracle
from jaxq import formats
from jaxq.ops import marlin

DTYPES = [jnp.float16, jnp.bfloat16]
TYPES = ["uint4b8", "uint4", "uint8b128", "float8_e4m3fn"]
# The two FP4 formats (b_q_type "float4_e2m1f"), by the kernel's names, and their group sizes.
FP4_GROUPS = {"nvfp4": 16, "mxfp4": 32}
# Relative L2 error of a GEMM against the float64 oracle on the same rounded weight: float32 sums, one
# rounding of the output.
GEMM_TOLERANCE = {jnp.float16: 3e-3, jnp.bfloat16: 1e-2}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Weight:
    """A random checkpoint-level weight (codes, natural-order scales and zeros, act-order) and its Marlin
    tensors made by jaxq's helpers. ``q_type`` "nvfp4" / "mxfp4": an FP4 checkpoint (``group_size`` ignored)."""

    def __init__(self, rng, q_type, k, n, group_size, dtype, act_order=False):
        self.global_scale = None
        if q_type in FP4_GROUPS:
            self._fp4(rng, q_type, k, n, dtype)
            return
        bits = marlin.SCALAR_TYPES[q_type][0]
        groups = 1 if group_size == -1 else k // group_size
        self.q_type, self.k, self.n, self.dtype = q_type, k, n, dtype
        if q_type == "float8_e4m3fn":
            finite = np.array([c for c in range(256) if np.isfinite(oracle.E4M3_VALUES[c])])
            self.q = rng.choice(finite, (k, n))
        else:
            self.q = rng.integers(0, 1 << bits, (k, n))
        self.scales = np.asarray(jnp.asarray(rng.uniform(0.5, 2.0, (groups, n)) * 2.0 ** -6, dtype))
        self.zeros = rng.integers(0, 1 << bits, (groups, n)) if q_type == "uint4" else None
        self.g_idx = rng.integers(0, groups, k).astype(np.int32) if act_order else None
        self.perm = np.argsort(self.g_idx, kind="stable").astype(np.int32) if act_order else None
        group_size_arg = group_size if groups > 1 else -1

        perm = jnp.asarray(self.perm) if act_order else jnp.zeros((0,), jnp.int32)
        if q_type == "float8_e4m3fn":
            codes = jnp.asarray(self.q.astype(np.uint8)).view(jnp.float8_e4m3fn)
            self.b_q_weight = marlin.marlin_fp8_repack(codes)
            self.b_scales = marlin.marlin_fp8_scales(jnp.asarray(self.scales), size_k=k, group_size=group_size_arg)
        else:
            packed = formats.pack_gptq(self.q, bits, axis=0)
            self.b_q_weight = marlin.gptq_marlin_repack(packed, perm, size_k=k, size_n=n, num_bits=bits)
            self.b_scales = marlin.marlin_permute_scales(jnp.asarray(self.scales), size_k=k, size_n=n,
                                                         group_size=group_size_arg)
        self.b_zeros = (marlin.marlin_zero_points(jnp.asarray(self.zeros), size_k=groups, size_n=n, num_bits=bits)
                        if self.zeros is not None else None)

    def _fp4(self, rng, q_type, k, n, dtype):
        self.q_type, self.k, self.n, self.dtype = q_type, k, n, dtype
        groups = k // FP4_GROUPS[q_type]
        self.q = rng.integers(0, 16, (k, n))
        self.packed = (self.q.T[:, 0::2] | (self.q.T[:, 1::2] << 4)).astype(np.uint8)
        if q_type == "nvfp4":
            self.scale_bits = rng.integers(1, 127, (n, groups)).astype(np.uint8)  # positive finite e4m3
            self.scales = oracle.E4M3_VALUES[self.scale_bits].T
            gs = jnp.float32(rng.uniform(0.5, 2.0) * 2.0**-10)
            self.b_q_weight, self.b_scales, self.global_scale = marlin.marlin_fp4_weight(
                jnp.asarray(self.packed), jnp.asarray(self.scale_bits).view(jnp.float8_e4m3fn), gs, dtype=dtype)
            self.true_global_scale = float(np.float32(gs).astype(_np_dtype(dtype)))
        else:
            self.scale_bits = rng.integers(112, 130, (n, groups)).astype(np.uint8)
            self.scales = np.ldexp(1.0, self.scale_bits.astype(np.int64) - 127).T
            self.b_q_weight, self.b_scales, _ = marlin.marlin_fp4_weight(
                jnp.asarray(self.packed), jnp.asarray(self.scale_bits), None, dtype=dtype)
            self.true_global_scale = 1.0
        self.zeros = self.g_idx = self.perm = self.b_zeros = None

    def kwargs(self):
        if self.q_type in FP4_GROUPS:
            return dict(b_q_type="float4_e2m1f", global_scale=self.global_scale)
        kw = dict(b_q_type=self.q_type, b_zeros=self.b_zeros)
        if self.g_idx is not None:
            kw.update(g_idx=jnp.asarray(self.g_idx[self.perm]), perm=jnp.asarray(self.perm))
        return kw

    def oracle_w(self) -> np.ndarray:
        """W [K, N] in natural row order, rounded to the dtype (an NVFP4 weight without its global scale)."""
        if self.q_type in FP4_GROUPS:
            rows = np.arange(self.k) // FP4_GROUPS[self.q_type]
            return (oracle.e2m1_values(self.q) * self.scales[rows]).astype(np.float32).astype(_np_dtype(self.dtype))
        return oracle.marlin_weight(self.q, self.scales, self.zeros, self.g_idx, self.q_type, _np_dtype(self.dtype))

    def oracle_gemm(self, a, bias=None) -> np.ndarray:
        out = np.asarray(a, np.float64) @ self.oracle_w().astype(np.float64)
        if self.global_scale is not None:
            out = out * self.true_global_scale
        return out if bias is None else out + np.asarray(bias, np.float64)


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float16


FP4_CASES = [(t, g, False) for t, g in FP4_GROUPS.items()]


def with_dtypes(cases):
    """(case..., dtype) for every dtype a case's type takes (MXFP4: bfloat16 only)."""
    return [(*c, d) for c in cases for d in DTYPES if not (c[0] == "mxfp4" and d == jnp.float16)]


def random_a(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


# ------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_marlin_repack_matches_vllms_loops(bits, act_order):
    rng = np.random.default_rng(bits + act_order)
    k, n = 96, 192
    q = rng.integers(0, 1 << bits, (k, n))
    perm = rng.permutation(k).astype(np.int32) if act_order else np.zeros((0,), np.int32)
    got = marlin.gptq_marlin_repack(formats.pack_gptq(q, bits), jnp.asarray(perm), size_k=k, size_n=n, num_bits=bits)
    want = oracle.marlin_pack(q[perm] if act_order else q, bits)
    assert got.shape == (k // 16, n * 16 * bits // 32)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(marlin.marlin_unpack(got, bits)), q[perm] if act_order else q)


@pytest.mark.parametrize("bits", [4, 8])
def test_awq_marlin_repack_matches_the_gptq_path(bits):
    rng = np.random.default_rng(3)
    k, n = 32, 128
    q = rng.integers(0, 1 << bits, (k, n))
    order = (0, 2, 4, 6, 1, 3, 5, 7) if bits == 4 else (0, 2, 1, 3)
    per = 32 // bits
    words = q.reshape(k, n // per, per)[..., list(order)].astype(np.uint64)
    awq = sum(words[..., i] << np.uint64(bits * i) for i in range(per)).astype(np.uint32).view(np.int32)
    got = marlin.awq_marlin_repack(jnp.asarray(awq), size_k=k, size_n=n, num_bits=bits)
    np.testing.assert_array_equal(np.asarray(got), oracle.marlin_pack(q, bits))


@pytest.mark.parametrize("group_size,single", [(32, False), (-1, True), (64, True)])
def test_permute_scales_matches_the_position_formulas(group_size, single):
    rng = np.random.default_rng(4)
    k = 64
    s = rng.standard_normal((1 if single else k // group_size, 128)).astype(np.float32)
    got = marlin.marlin_permute_scales(jnp.asarray(s), size_k=k, size_n=128, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(got), oracle.marlin_scales(s, single))


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_points_match_the_oracle_and_round_trip(bits):
    rng = np.random.default_rng(5)
    z = rng.integers(0, 1 << bits, (3, 192))
    got = marlin.marlin_zero_points(jnp.asarray(z), size_k=3, size_n=192, num_bits=bits)
    np.testing.assert_array_equal(np.asarray(got), oracle.marlin_zero_points(z, bits))
    np.testing.assert_array_equal(np.asarray(marlin.marlin_unpack_zero_points(got, bits)), z)


def test_awq_zero_points_match_the_natural_order_path():
    rng = np.random.default_rng(6)
    z = rng.integers(0, 16, (4, 128))
    got = marlin.awq_to_marlin_zero_points(formats.pack_awq(z), size_k=4, size_n=128, num_bits=4)
    np.testing.assert_array_equal(np.asarray(got), oracle.marlin_zero_points(z, 4))


@pytest.mark.parametrize("q_type,group_size,act_order,dtype", with_dtypes(FP4_CASES))
def test_fp4_preparation_matches_vllms(q_type, group_size, act_order, dtype):
    """marlin_fp4_weight against vLLM's prepare_fp4_layer_for_marlin as described: the weight through the 4-bit
    repack (transcribed loops), the scales' bytes, NVFP4's global scale times 2**(bias - 7)."""
    rng = np.random.default_rng(5)
    w = Weight(rng, q_type, 512, 192, group_size, dtype)
    np.testing.assert_array_equal(np.asarray(w.b_q_weight), oracle.marlin_pack(oracle.fp4_codes(w.packed), 4))
    want = oracle.marlin_fp4_scale_bytes(w.scale_bits, q_type == "nvfp4", _np_dtype(dtype))
    np.testing.assert_array_equal(np.asarray(w.b_scales).view(np.uint8), want)
    if q_type == "nvfp4":
        bias = 126 if dtype == jnp.bfloat16 else 14
        assert float(w.global_scale[0]) == w.true_global_scale * 2.0 ** (bias - 7)


def test_fp8_scales_fold_vllms_exponent_bias():
    s = jnp.asarray(np.full((1, 64), 0.75), jnp.bfloat16)
    folded = marlin.marlin_fp8_scales(s, size_k=128, group_size=-1)
    np.testing.assert_array_equal(np.asarray(folded, np.float64), 0.75 * 2.0**120)
    folded16 = marlin.marlin_fp8_scales(s.astype(jnp.float16), size_k=128, group_size=-1)
    np.testing.assert_array_equal(np.asarray(folded16, np.float64), 0.75 * 2.0**8)


# ----------------------------------------------------------------------------------------- reference


CASES = [(t, g, False) for t in TYPES for g in (-1, 32, 128)] + [("uint4b8", 128, True), ("uint4", 64, True),
                                                                  ("uint8b128", 32, True)]


@pytest.mark.parametrize("q_type,group_size,act_order,dtype", with_dtypes(CASES + FP4_CASES))
def test_reference_matches_the_oracle(q_type, group_size, act_order, dtype):
    rng = np.random.default_rng(abs(hash((q_type, group_size, act_order, str(dtype)))) % 2**32)
    k, n = 256, 128
    w = Weight(rng, q_type, k, n, group_size, dtype, act_order)
    deq = marlin.marlin_dequantize(w.b_q_weight, w.b_scales, w.b_zeros,
                                   None if w.g_idx is None else jnp.asarray(w.g_idx[w.perm]),
                                   b_q_type=q_type, size_k=k, dtype=dtype)
    natural = w.oracle_w()
    want_w = natural[w.perm] if act_order else natural
    np.testing.assert_array_equal(np.asarray(deq).view(np.uint16), want_w.view(np.uint16))
    for m in (1, 5, 33):
        a = random_a(rng, (m, k), dtype)
        bias = random_a(rng, (n,), dtype)
        out = jax.jit(lambda a, b: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_bias=b, **w.kwargs()))(a, bias)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_l2(out, w.oracle_gemm(a, bias)) < GEMM_TOLERANCE[dtype]


@pytest.mark.parametrize("q_type,group_size", [("uint4", 32), *FP4_GROUPS.items()])
def test_leading_dims_vmap_and_jit_agree(q_type, group_size):
    rng = np.random.default_rng(7)
    w = Weight(rng, q_type, 128, 64, group_size, jnp.bfloat16)
    a = random_a(rng, (3, 2, 128), jnp.bfloat16)
    f = lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs())  # noqa: E731
    whole = jax.jit(f)(a)
    assert whole.shape == (3, 2, 64)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(a)), np.asarray(whole))
    assert rel_l2(whole, w.oracle_gemm(a.reshape(6, 128)).reshape(3, 2, 64)) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_float_zero_points_match_the_oracle(group_size, dtype):
    """is_zp_float (HQQ): W = q * s - round(z * s), rounded once, as vLLM's kernel's fused multiply-add; the
    oracle computes it in float64 from the checkpoint's natural-order tensors."""
    rng = np.random.default_rng()
    k, n = 256, 192
    groups = 1 if group_size == -1 else k // group_size
    q = rng.integers(0, 16, (k, n))
    np_dtype = _np_dtype(dtype)
    scales = (rng.uniform(0.5, 2.0, (groups, n)) * 2.0**-6).astype(np_dtype)
    zeros = rng.uniform(0.5, 15.0, (groups, n)).astype(np_dtype)
    size_group = group_size if groups > 1 else -1
    b_q_weight = marlin.gptq_marlin_repack(formats.pack_gptq(q, 4, axis=0), jnp.zeros((0,), jnp.int32), size_k=k,
                                           size_n=n, num_bits=4)
    b_scales = marlin.marlin_permute_scales(jnp.asarray(scales), size_k=k, size_n=n, group_size=size_group)
    b_zeros = marlin.marlin_permute_scales(jnp.asarray(zeros), size_k=k, size_n=n, group_size=size_group)
    rows = np.arange(k) // (k // groups)
    s64, z64 = scales.astype(np.float64)[rows], zeros.astype(np.float64)[rows]
    zero_scaled = (z64 * s64).astype(np_dtype).astype(np.float64)  # z * s is exact in float64, then rounded to T
    w_oracle = (q * s64 - zero_scaled).astype(np_dtype)  # one rounding, as the fused multiply-add
    w = marlin.marlin_dequantize(b_q_weight, b_scales, b_zeros, b_q_type="uint4", size_k=k)
    np.testing.assert_array_equal(np.asarray(w).view(np.uint16), w_oracle.view(np.uint16))
    a = random_a(rng, (5, k), dtype)
    bias = random_a(rng, (n,), dtype)
    out = jax.jit(lambda a: marlin.marlin_gemm(a, b_q_weight, b_scales, b_q_type="uint4", b_zeros=b_zeros,
                                               b_bias=bias, is_zp_float=True))(a)
    want = np.asarray(a, np.float64) @ w_oracle.astype(np.float64) + np.asarray(bias, np.float64)
    assert rel_l2(out, want) < GEMM_TOLERANCE[dtype]
    batched = jax.vmap(lambda a: marlin.marlin_gemm(a, b_q_weight, b_scales, b_q_type="uint4", b_zeros=b_zeros,
                                                    b_bias=bias, is_zp_float=True))(a.reshape(5, 1, k))
    assert rel_l2(batched.reshape(5, n), want) < GEMM_TOLERANCE[dtype]
    with pytest.raises(ValueError, match=r"must be \[groups, N\]"):
        marlin.marlin_gemm(a, b_q_weight, b_scales, b_q_type="uint4", b_zeros=b_zeros[:, :64], is_zp_float=True)


def test_gradient_with_respect_to_a_and_frozen_scales():
    rng = np.random.default_rng(8)
    w = Weight(rng, "uint4b8", 128, 64, 128, jnp.float16, act_order=True)
    a = random_a(rng, (4, 128), jnp.float16)
    dy = random_a(rng, (4, 64), jnp.float16)
    grad = jax.grad(lambda a: jnp.sum(marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs())
                                      .astype(jnp.float32) * dy.astype(jnp.float32)))(a)
    want = np.asarray(dy, np.float64) @ w.oracle_w().astype(np.float64).T
    assert rel_l2(grad, want) < 3e-3
    with pytest.raises(jaxq.NotDifferentiableError, match="b_scales"):
        jax.grad(lambda s: jnp.sum(marlin.marlin_gemm(a, w.b_q_weight, s, **w.kwargs()).astype(jnp.float32)))(
            w.b_scales)


def test_batch_invariant_mode_keeps_the_kernel_for_every_m():
    shapes = {(8192, 28672): 64, (28672, 8192): 64, (4096, 14336): 32, (4096, 4096): 16, (4096, 1024): 16}
    for (k, n), rows in shapes.items():
        assert marlin.kernel_max_rows(k, n) == rows
        assert marlin.use_kernel(rows, k, n) and not marlin.use_kernel(rows + 1, k, n)
        with jaxq.batch_invariant():
            assert marlin.use_kernel(rows + 1, k, n) and marlin.use_kernel(4096, k, n)
    assert not marlin.use_kernel(marlin.MARLIN_KERNEL_MAX_M + 1, 8192, 28672)


def test_hopper_dispatch(monkeypatch):
    """Which rows run the wgmma kernel, decided at trace time without a GPU: from hopper_first_rows up to
    HOPPER_MAX_ROWS, for the weights it takes, outside batch_invariant(); never on other GPUs."""
    assert marlin.hopper_kernel_takes("uint4b8", False, 1024, 384, 1) == marlin._hopper_gpu()
    for k, n in ((8192, 28672), (4096, 14336), (28672, 8192), (4096, 4096), (4096, 1024)):
        assert marlin.hopper_first_rows(k, n) == marlin.HOPPER_FIRST_ROWS == 17, (k, n)
        for form in ("uint4b8", "uint4", "uint8b128", "float8_e4m3fn", "nvfp4", "mxfp4"):
            # 4-bit integer weights under 2**26 elements from 9 rows, the other weights from 17.
            small = form in ("uint4b8", "uint4") and k * n < 1 << 26
            assert marlin.hopper_first_rows(k, n, form=form) == (9 if small else 17), (k, n, form)
    assert marlin.hopper_first_rows(4096, 4096, own_kernel_rows=64, form="uint4") == 65  # gptq_gemm's own kernel
    with marlin.hopper_limits(first_rows=1, max_rows=512):
        assert marlin.hopper_first_rows(4096, 4096) == 1 and marlin.hopper_max_rows() == 512
    assert marlin.hopper_max_rows() == marlin.HOPPER_MAX_ROWS
    for first_rows, max_rows in ((0, 4), (5, 4)):
        with pytest.raises(ValueError, match="first_rows"):
            with marlin.hopper_limits(first_rows, max_rows):
                pass
    monkeypatch.setattr(marlin, "_hopper_gpu", lambda: True)
    takes = marlin.hopper_kernel_takes
    assert takes("uint4b8", False, 1024, 384, 32) and takes("uint4", False, 1024, 384, 1)
    assert not takes("uint4b8", True, 1024, 384, 8)  # act-order
    assert takes("uint8b128", False, 1024, 384, 8) and takes("float8_e4m3fn", False, 1024, 384, 1)
    assert takes("nvfp4", False, 1024, 384, 64) and takes("mxfp4", False, 1024, 384, 32)
    assert not takes("uint4b8", False, 1024, 320, 8)  # N not a multiple of 128
    assert not takes("uint4b8", False, 1040, 384, 1)  # K not a multiple of 64
    seen = []
    gemm = marlin._marlin_gemm
    monkeypatch.setattr(marlin, "_marlin_gemm", lambda *a, **params: seen.append(params) or gemm(*a, **params))
    rng = np.random.default_rng(3)
    w = Weight(rng, "uint4b8", 1024, 384, 128, jnp.bfloat16)
    rows = marlin.kernel_max_rows(1024, 384)
    first = marlin.HOPPER_SMALL_WEIGHT_FIRST_ROWS  # a small 4-bit weight
    # The kernel gets the first Hopper row with every call within the kernels' rows (it dispatches by m); past
    # HOPPER_MAX_ROWS the call is dequantize + dot.
    for m, hopper_from in ((first - 1, first), (first, first), (rows + 1, first), (marlin.HOPPER_MAX_ROWS, first),
                           (marlin.HOPPER_MAX_ROWS + 1, None)):
        seen.clear()
        out = marlin.marlin_gemm(random_a(rng, (m, 1024), jnp.bfloat16), w.b_q_weight, w.b_scales, **w.kwargs())
        assert out.shape == (m, 384)
        assert [p["hopper_from_rows"] for p in seen] == ([] if hopper_from is None else [hopper_from]), m
    with marlin.hopper_limits(first_rows=1, max_rows=8):
        for m, hopper_from in ((1, 1), (8, 1), (9, 0)):  # 9: the decode kernel's rows, past the Hopper ones
            seen.clear()
            marlin.marlin_gemm(random_a(rng, (m, 1024), jnp.bfloat16), w.b_q_weight, w.b_scales, **w.kwargs())
            assert [p["hopper_from_rows"] for p in seen] == [hopper_from], m
    with jaxq.batch_invariant():
        seen.clear()
        marlin.marlin_gemm(random_a(rng, (rows + 1, 1024), jnp.bfloat16), w.b_q_weight, w.b_scales, **w.kwargs())
        assert [p["hopper_from_rows"] for p in seen] == [0]
    w = Weight(rng, "uint4b8", 1024, 320, 128, jnp.bfloat16)  # the kernel does not take it: dequantize + dot
    seen.clear()
    marlin.marlin_gemm(random_a(rng, (rows + 1, 1024), jnp.bfloat16), w.b_q_weight, w.b_scales, **w.kwargs())
    assert seen == []


def test_out_of_range_act_order_indices_are_clamped():
    rng = np.random.default_rng(9)
    w = Weight(rng, "uint4b8", 64, 64, 32, jnp.bfloat16, act_order=True)
    a = random_a(rng, (2, 64), jnp.bfloat16)
    kw = w.kwargs()
    bad = dict(kw, g_idx=kw["g_idx"].at[0].set(99).at[1].set(-5), perm=kw["perm"].at[2].set(1000).at[3].set(-1))
    clamped = dict(kw, g_idx=jnp.clip(bad["g_idx"], 0, 1), perm=jnp.clip(bad["perm"], 0, 63))
    f = jax.jit(lambda a, kw: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_q_type="uint4b8", **kw))
    got = f(a, {k: v for k, v in bad.items() if k in ("g_idx", "perm")})
    want = f(a, {k: v for k, v in clamped.items() if k in ("g_idx", "perm")})
    assert np.isfinite(np.asarray(got, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("path", ["kernel", "dequantize"])
@pytest.mark.parametrize("layout", ["column", "row", "tokens"])
@pytest.mark.parametrize("q_type,group_size,act_order", [("uint4", 32, False), ("uint4b8", -1, False),
                                                         ("uint8b128", 64, True), ("nvfp4", 16, False)])
def test_sharded_equals_unsharded(layout, q_type, group_size, act_order, path, monkeypatch):
    """``path="dequantize"``: the rows past the kernel's range (the dequantize op's own sharding rule)."""
    if path == "dequantize":
        monkeypatch.setattr(marlin, "MARLIN_KERNEL_MAX_M", 0)
    rng = np.random.default_rng(10)
    k, n, m = 512, 512, 16
    w = Weight(rng, q_type, k, n, group_size, jnp.bfloat16, act_order)
    a = random_a(rng, (m, k), jnp.bfloat16)
    bias = random_a(rng, (n,), jnp.bfloat16)
    kw = w.kwargs()
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    spec_a = {"column": P(), "row": P(None, "x"), "tokens": P("x", None)}[layout]
    spec_q = {"column": P(None, "x"), "row": P("x", None), "tokens": P()}[layout]
    spec_n = {"column": P("x"), "row": P(), "tokens": P()}[layout]

    def f(a, q, s, z, g, bias):
        return marlin.marlin_gemm(a, q, s, b_q_type=kw["b_q_type"], b_zeros=z, g_idx=g, perm=kw.get("perm"),
                                  b_bias=bias, global_scale=kw.get("global_scale"))

    args = (a, w.b_q_weight, w.b_scales, w.b_zeros, kw.get("g_idx"), bias)
    whole = jax.jit(f)(*args)
    put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sharded_args = (put(a, spec_a), put(w.b_q_weight, spec_q), put(w.b_scales, P(None, *spec_n)),
                    put(w.b_zeros, P(None, *spec_n)), kw.get("g_idx"), put(bias, spec_n))
    sharded = jax.jit(f)(*sharded_args)
    tol = 0 if layout != "row" else 1e-2
    assert rel_l2(sharded, whole) <= tol
    assert rel_l2(whole, w.oracle_gemm(a, bias)) < 1e-2


@pytest.mark.parametrize("layout", ["column", "row", "tokens"])
def test_float_zero_points_sharded_equal_unsharded(layout):
    """is_zp_float on 8 virtual devices: N sharded (scales and float zeros with it), K sharded, rows sharded."""
    rng = np.random.default_rng(12)
    k, n, m = 512, 512, 16
    q = rng.integers(0, 16, (k, n))
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (k // 64, n)) * 2.0**-6, jnp.bfloat16)
    zeros = jnp.asarray(rng.uniform(0.5, 15.0, (k // 64, n)), jnp.bfloat16)
    b_q_weight = marlin.gptq_marlin_repack(formats.pack_gptq(q, 4, axis=0), jnp.zeros((0,), jnp.int32), size_k=k,
                                           size_n=n, num_bits=4)
    b_scales = marlin.marlin_permute_scales(scales, size_k=k, size_n=n, group_size=64)
    b_zeros = marlin.marlin_permute_scales(zeros, size_k=k, size_n=n, group_size=64)
    a = random_a(rng, (m, k), jnp.bfloat16)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    spec_a = {"column": P(), "row": P(None, "x"), "tokens": P("x", None)}[layout]
    spec_q = {"column": P(None, "x"), "row": P("x", None), "tokens": P()}[layout]
    spec_s = {"column": P(None, "x"), "row": P("x", None), "tokens": P()}[layout]

    def f(a, q, s, z):
        return marlin.marlin_gemm(a, q, s, b_q_type="uint4", b_zeros=z, is_zp_float=True)

    whole = jax.jit(f)(a, b_q_weight, b_scales, b_zeros)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sharded = jax.jit(f)(put(a, spec_a), put(b_q_weight, spec_q), put(b_scales, spec_s), put(b_zeros, spec_s))
    assert rel_l2(sharded, whole) <= (1e-2 if layout == "row" else 0)
    w = marlin.marlin_dequantize(b_q_weight, b_scales, b_zeros, b_q_type="uint4", size_k=k)
    assert rel_l2(whole, np.asarray(a, np.float64) @ np.asarray(w, np.float64)) < GEMM_TOLERANCE[jnp.bfloat16]


# ---------------------------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    rng = np.random.default_rng(11)
    w = Weight(rng, "uint4", 128, 64, 32, jnp.bfloat16)
    a = random_a(rng, (2, 128), jnp.bfloat16)
    call = lambda **kw: marlin.marlin_gemm(**{**dict(a=a, b_q_weight=w.b_q_weight, b_scales=w.b_scales,  # noqa: E731
                                                     b_q_type="uint4", b_zeros=w.b_zeros), **kw})
    with pytest.raises(ValueError, match="b_q_type"):
        call(b_q_type="uint3")
    with pytest.raises(TypeError, match="b_scales must be float8_e4m3fn or float8_e8m0fnu"):
        call(b_q_type="float4_e2m1f")
    with pytest.raises(ValueError, match="global_scale"):
        call(global_scale=jnp.ones(()))
    with pytest.raises(ValueError, match="is_zp_float .*'uint4'"):
        call(b_q_type="uint4b8", b_zeros=None, is_zp_float=True)
    with pytest.raises(TypeError, match="b_zeros must be bfloat16; got int32"):
        call(is_zp_float=True)  # integer zero points
    with pytest.raises(ValueError, match="needs b_zeros"):
        call(b_zeros=None)
    with pytest.raises(ValueError, match="takes no b_zeros"):
        call(b_q_type="uint4b8")
    with pytest.raises(ValueError, match="must end in K=128"):
        call(a=a[:, :64])
    with pytest.raises(TypeError, match="a must be"):
        call(a=a.astype(jnp.float32))
    with pytest.raises(TypeError, match="b_scales must be bfloat16"):
        call(b_scales=w.b_scales.astype(jnp.float16))
    with pytest.raises(ValueError, match="b_scales must be"):
        call(b_scales=w.b_scales[:, :32])
    with pytest.raises(ValueError, match="group size"):
        call(b_scales=jnp.ones((8, 64), jnp.bfloat16), b_zeros=jnp.zeros((8, 8), jnp.int32))
    with pytest.raises(ValueError, match="b_zeros must have shape"):
        call(b_zeros=w.b_zeros[:2])
    with pytest.raises(ValueError, match="both g_idx and perm"):
        call(g_idx=jnp.zeros((128,), jnp.int32))
    with pytest.raises(ValueError, match="g_idx and perm must have K=128"):
        call(g_idx=jnp.zeros((64,), jnp.int32), perm=jnp.zeros((64,), jnp.int32))
    with pytest.raises(ValueError, match="b_bias must have N=64"):
        call(b_bias=jnp.ones((32,), jnp.bfloat16))
    with pytest.raises(ValueError, match="multiple of 64"):
        marlin.gptq_marlin_repack(jnp.zeros((16, 96), jnp.int32), jnp.zeros((0,), jnp.int32), size_k=128, size_n=96,
                                  num_bits=4)
    with pytest.raises(ValueError, match="num_bits"):
        marlin.gptq_marlin_repack(jnp.zeros((16, 64), jnp.int32), jnp.zeros((0,), jnp.int32), size_k=128, size_n=64,
                                  num_bits=3)
    with pytest.raises(ValueError, match="b_q_weight must have shape"):
        marlin.awq_marlin_repack(jnp.zeros((128, 16), jnp.int32), size_k=128, size_n=64, num_bits=4)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        marlin.marlin_fp8_repack(jnp.zeros((128, 64), jnp.bfloat16))


def test_fp4_errors_name_the_argument():
    rng = np.random.default_rng(13)
    nv = Weight(rng, "nvfp4", 128, 64, 16, jnp.bfloat16)
    mx = Weight(rng, "mxfp4", 128, 64, 32, jnp.bfloat16)
    a = random_a(rng, (2, 128), jnp.bfloat16)
    call = lambda w, **kw: marlin.marlin_gemm(**{**dict(a=a, b_q_weight=w.b_q_weight, b_scales=w.b_scales,  # noqa: E731
                                                        **w.kwargs()), **kw})
    with pytest.raises(ValueError, match="NVFP4 weights need global_scale"):
        call(nv, global_scale=None)
    with pytest.raises(TypeError, match="global_scale must be bfloat16 or float32"):
        call(nv, global_scale=nv.global_scale.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"global_scale must have shape \(\) or \(1,\)"):
        call(nv, global_scale=jnp.ones((2,), jnp.bfloat16))
    with pytest.raises(ValueError, match="one scale per 16 rows"):
        call(nv, b_scales=nv.b_scales[:4])
    with pytest.raises(ValueError, match="no act-order"):
        call(nv, g_idx=jnp.zeros((128,), jnp.int32), perm=jnp.arange(128, dtype=jnp.int32))
    with pytest.raises(ValueError, match="takes no b_zeros"):
        call(nv, b_zeros=jnp.zeros((8, 8), jnp.int32))
    with pytest.raises(ValueError, match="at least 32"):
        marlin.marlin_gemm(a[:, :16], nv.b_q_weight[:1], nv.b_scales[:1], b_q_type="float4_e2m1f",
                           global_scale=nv.global_scale)
    with pytest.raises(TypeError, match="MXFP4 weights take bfloat16"):
        call(mx, a=a.astype(jnp.float16))
    with pytest.raises(ValueError, match="goes with NVFP4"):
        call(mx, global_scale=nv.global_scale)
    with pytest.raises(ValueError, match="one scale per 32 rows"):
        call(mx, b_scales=mx.b_scales[:2])
    scale = jnp.asarray(nv.scale_bits).view(jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match="uint8 array"):
        marlin.marlin_fp4_repack(jnp.zeros((64, 64), jnp.int32))
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        marlin.marlin_fp4_weight(jnp.asarray(nv.packed), scale[:, :4], jnp.float32(1.0))
    with pytest.raises(TypeError, match="weight_scale_2"):
        marlin.marlin_fp4_weight(jnp.asarray(nv.packed), scale, None)
    with pytest.raises(TypeError, match="MXFP4 weights take bfloat16"):
        marlin.marlin_fp4_weight(jnp.asarray(mx.packed), jnp.asarray(mx.scale_bits), None, dtype=jnp.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        marlin.nvfp4_marlin_process_scales(jnp.ones((4, 64), jnp.float32))


def test_nvfp4_float32_global_scale_is_the_scale_itself():
    rng = np.random.default_rng(15)
    w = Weight(rng, "nvfp4", 256, 128, 16, jnp.bfloat16)
    a = random_a(rng, (3, 256), jnp.bfloat16)
    f = jax.jit(lambda a, g: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_q_type="float4_e2m1f", global_scale=g))
    np.testing.assert_array_equal(np.asarray(f(a, jnp.float32(w.true_global_scale))).view(np.uint16),
                                  np.asarray(f(a, w.global_scale)).view(np.uint16))


def test_fp4_gradient_carries_the_global_scale():
    rng = np.random.default_rng(14)
    w = Weight(rng, "nvfp4", 128, 64, 16, jnp.float16)
    a = random_a(rng, (4, 128), jnp.float16)
    dy = random_a(rng, (4, 64), jnp.float16)
    grad = jax.grad(lambda a: jnp.sum(marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs())
                                      .astype(jnp.float32) * dy.astype(jnp.float32)))(a)
    want = np.asarray(dy, np.float64) @ w.oracle_w().astype(np.float64).T * w.true_global_scale
    assert rel_l2(grad, want) < 3e-3


# ------------------------------------------------------------------------------------------------ GPU


GPU_CASES = CASES + [("uint4", 128, False), ("float8_e4m3fn", 128, False)] + FP4_CASES
# hopper_limits that keep the decode kernel on weights the Hopper kernel would take at these rows.
DECODE_KERNEL_ONLY = dict(first_rows=1 << 30, max_rows=1 << 30)


@pytest.mark.gpu
@pytest.mark.parametrize("q_type,group_size,act_order,dtype", with_dtypes(GPU_CASES))
def test_kernel_matches_reference_on_gpu(q_type, group_size, act_order, dtype):
    rng = np.random.default_rng()
    # Small and tall weights (K split over a cluster) and wide ones: on 132 SMs (the H200) PlanMarlin gives them
    # 1 or 2 column tiles per block and 2-, 3-, 7- and 8-way K splits (the 4-tile blocks run in the bench's
    # shapes; JAXQ_MARLIN_PLAN forces any plan). Rows in every bucket (1-8 with the group scales folded in float32,
    # and as batch_invariant() runs them; 9-16, 17-32 with at most 2 tiles per block, 33-48, then 64-row blocks)
    # and tail.
    shapes = (((256, 192), (1, 33, 130)), ((4096, 128), (7, 64)), ((1024, 4096), (16, 65)), ((512, 8704), (1, 20)),
              ((512, 4352), (16, 40)), ((1024, 512), (9, 8)))
    for (k, n), rows in shapes:
        w = Weight(rng, q_type, k, n, group_size, dtype, act_order)
        for m in rows:
            a = random_a(rng, (m, k), dtype)
            bias = random_a(rng, (n,), dtype) if m % 2 else None
            want = marlin._reference(*_operands(w, a, bias), **_params(w, bias))[0]
            oracle = w.oracle_gemm(np.asarray(a, np.float64), bias)
            for invariant in (False, True) if m <= 8 else (True,):
                with jaxq.batch_invariant(invariant), marlin.hopper_limits(**DECODE_KERNEL_ONLY):
                    got = jax.jit(lambda a, b: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_bias=b,
                                                                  **w.kwargs()))(a, bias)
                err = rel_l2(got, want)
                assert np.isfinite(np.asarray(got, np.float32)).all(), (k, n, m, invariant)
                assert err < GEMM_TOLERANCE[dtype], (k, n, m, invariant, err)
                assert rel_l2(got, oracle) < GEMM_TOLERANCE[dtype], (k, n, m, invariant)


@pytest.mark.gpu
@pytest.mark.parametrize("q_type,group_size,act_order,dtype", with_dtypes(GPU_CASES))
def test_dequantize_kernel_is_the_reference_bit_for_bit_on_gpu(q_type, group_size, act_order, dtype):
    """The weight the path above the kernel's rows multiplies by; then that path against the reference."""
    rng = np.random.default_rng()
    w = Weight(rng, q_type, 512, 192, group_size, dtype, act_order)
    weight = _operands(w, jnp.zeros((1, 512), dtype), None, global_scale=False)[1:]
    params = {key: value for key, value in _params(w, None).items()
              if key not in ("has_bias", "batch_invariant", "hopper_from_rows")}
    params["dtype"] = jnp.dtype(dtype).name
    got = jax.jit(lambda *o: marlin._marlin_dequantize(*o, **params)[0])(*weight)
    cpu = jax.devices("cpu")[0]
    want = jax.jit(lambda *o: marlin._dequantize_reference(*o, **params)[0])(*[jax.device_put(x, cpu) for x in weight])
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    a = random_a(rng, (marlin.MARLIN_KERNEL_MAX_M + 3, 512), dtype)
    out = jax.jit(lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs()))(a)
    assert rel_l2(out, w.oracle_gemm(np.asarray(a, np.float64))) < GEMM_TOLERANCE[dtype]


def _operands(w, a, bias, global_scale=True):
    kw = w.kwargs()
    rows = a if "perm" not in kw else jnp.take(a, kw["perm"], axis=1)
    ops = [rows, w.b_q_weight, w.b_scales] + ([w.b_zeros] if w.b_zeros is not None else [])
    ops += [kw["g_idx"]] if "g_idx" in kw else []
    if global_scale and w.global_scale is not None:
        ops.append(jnp.asarray([w.true_global_scale], jnp.float32))
    return ops + ([bias] if bias is not None else [])


def _params(w, bias):
    return dict(b_q_type=w.q_type, has_zeros=w.b_zeros is not None, has_g_idx=w.g_idx is not None,
                has_bias=bias is not None, per_channel=w.b_scales.shape[0] == 1, batch_invariant=False,
                hopper_from_rows=0)


@pytest.mark.gpu
@pytest.mark.parametrize("q_type", ["uint4b8", "float8_e4m3fn", "nvfp4"])
def test_kernel_rows_are_batch_invariant_on_gpu(q_type):
    rng = np.random.default_rng()
    w = Weight(rng, q_type, 4096, 1024, 128, jnp.bfloat16)
    a = random_a(rng, (200, 4096), jnp.bfloat16)
    # The mode is read at trace time: each mode its own jitted function (jit's cache does not know the mode).
    f = jax.jit(lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs()))
    with jaxq.batch_invariant():
        full = np.asarray(f(a)).view(np.uint16)
        for m in (1, 3, 16, 64, 65, 128):
            np.testing.assert_array_equal(np.asarray(f(a[:m])).view(np.uint16), full[:m])
        np.testing.assert_array_equal(np.asarray(f(a[5:6])).view(np.uint16), full[5:6])
    # Outside that mode the decode kernel's rows 1-8 share one form (scales folded in float32) and 9-16 another
    # (this weight's kernel_max_rows); on an sm_90 GPU the Hopper kernel takes them unless told not to.
    assert marlin.kernel_max_rows(4096, 1024) == 16
    with marlin.hopper_limits(**DECODE_KERNEL_ONLY):  # read when f traces each shape
        f = jax.jit(lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs()))
        small = np.asarray(f(a[:8])).view(np.uint16)
        if q_type == "nvfp4":  # FP4 has one decode-kernel form for all its rows
            np.testing.assert_array_equal(small, full[:8])
        for m in (1, 3):
            np.testing.assert_array_equal(np.asarray(f(a[:m])).view(np.uint16), small[:m])
        np.testing.assert_array_equal(np.asarray(f(a[5:6])).view(np.uint16), small[5:6])
        for m in (9, 12, 16):
            np.testing.assert_array_equal(np.asarray(f(a[:m])).view(np.uint16), full[:m])


@pytest.mark.gpu
@pytest.mark.parametrize("q_type,group_size,act_order,dtype", with_dtypes(GPU_CASES))
def test_prefill_rows_match_reference_on_gpu(q_type, group_size, act_order, dtype):
    """Prefill-sized calls (1024 and 4096 rows: dequantize + XLA's dot by default) against the reference and the
    oracle, for every type, group size and act-order."""
    rng = np.random.default_rng()
    w = Weight(rng, q_type, 1024, 384, group_size, dtype, act_order)
    f = jax.jit(lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs()))
    for m in (1024, 4096):
        a = random_a(rng, (m, 1024), dtype)
        got = f(a)
        want = marlin._reference(*_operands(w, a, None), **_params(w, None))[0]
        assert np.isfinite(np.asarray(got, np.float32)).all(), m
        assert rel_l2(got, want) < GEMM_TOLERANCE[dtype], (m, rel_l2(got, want))
        assert rel_l2(got, w.oracle_gemm(np.asarray(a, np.float64))) < GEMM_TOLERANCE[dtype], m


HOPPER_CASES = ([(q_type, group_size) for q_type in ("uint4b8", "uint4") for group_size in (32, 64, 128, -1)]
                + [("uint8b128", group_size) for group_size in (32, 128, -1)]
                + [("float8_e4m3fn", group_size) for group_size in (128, -1)]
                + [(fp4, FP4_GROUPS[fp4]) for fp4 in FP4_GROUPS])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("q_type,group_size", HOPPER_CASES)
def test_hopper_kernel_matches_reference_on_gpu(q_type, group_size, dtype):
    """The wgmma kernel forced at every row count up to HOPPER_MAX_ROWS (each of its 16-, 32-, 64- and 128-row
    blocks, tails included) against the reference and the oracle, with and without bias, on weights it runs
    whole and with K split over clusters of 2 and 8 blocks; the lowering says which kernel ran."""
    if not marlin._hopper_gpu():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    if q_type == "mxfp4" and dtype == jnp.float16:
        pytest.skip("MXFP4 takes bfloat16 activations")
    rng = np.random.default_rng()
    for k, n in ((256, 4096), (1024, 384), (4096, 1024)):
        w = Weight(rng, q_type, k, n, group_size, dtype)

        def f(a, b, w=w):
            with marlin.hopper_limits(first_rows=1, max_rows=marlin.HOPPER_MAX_ROWS):
                return jax.jit(lambda a, b: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_bias=b,
                                                               **w.kwargs())).lower(a, b)

        # Every row block and tail for the 4-bit integer types; one row count per block for the others, whose
        # codes and scales are what differs (the blocks' rows are the same code for every type).
        rows = (1, 16, 17, 33, 64, 65, 127, 128, 200, marlin.HOPPER_MAX_ROWS) if q_type in ("uint4b8", "uint4") else (
            1, 17, 33, 65, 200)
        for m in rows:
            a = random_a(rng, (m, k), dtype)
            bias = random_a(rng, (n,), dtype) if m % 2 else None
            lowered = f(a, bias)
            assert "hopper_from_rows = 1 " in lowered.as_text(), (k, n, m)
            got = lowered.compile()(a, bias)
            want = marlin._reference(*_operands(w, a, bias), **_params(w, bias))[0]
            assert np.isfinite(np.asarray(got, np.float32)).all(), (k, n, m)
            assert rel_l2(got, want) < GEMM_TOLERANCE[dtype], (k, n, m, rel_l2(got, want))
            assert rel_l2(got, w.oracle_gemm(np.asarray(a, np.float64), bias)) < GEMM_TOLERANCE[dtype], (k, n, m)


@pytest.mark.gpu
@pytest.mark.parametrize("q_type", ["uint4b8", "uint4", "uint8b128", "float8_e4m3fn", "nvfp4"])
def test_hopper_kernel_rows_are_batch_invariant_on_gpu(q_type):
    """A row's output is bit-identical whatever the batch, across the kernel's row blocks (16 to 128 rows), with
    and without a K split."""
    if not marlin._hopper_gpu():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    rng = np.random.default_rng()
    for k, n in ((256, 4096), (4096, 1024)):
        w = Weight(rng, q_type, k, n, 128, jnp.bfloat16)
        a = random_a(rng, (marlin.HOPPER_MAX_ROWS, k), jnp.bfloat16)

        def f(a, w=w):  # traced in the context: every row count here runs the kernel
            with marlin.hopper_limits(first_rows=1, max_rows=marlin.HOPPER_MAX_ROWS):
                return jax.jit(lambda a: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, **w.kwargs())).lower(
                    a).compile()(a)

        full = np.asarray(f(a)).view(np.uint16)
        for m in (1, 5, 16, 17, 32, 33, 64, 100, 128, 129, 200):
            np.testing.assert_array_equal(np.asarray(f(a[:m])).view(np.uint16), full[:m], err_msg=f"{k} {n} {m}")
        for lo, hi in ((60, 160), (7, 8), (40, 60)):
            np.testing.assert_array_equal(np.asarray(f(a[lo:hi])).view(np.uint16), full[lo:hi])


@pytest.mark.gpu
def test_kernel_clamps_corrupt_act_order_indices_on_gpu():
    rng = np.random.default_rng()
    w = Weight(rng, "uint4b8", 1024, 256, 128, jnp.float16, act_order=True)
    kw = w.kwargs()
    g_idx = kw["g_idx"].at[::7].set(1 << 20).at[3::11].set(-(1 << 20))
    a = random_a(rng, (16, 1024), jnp.float16)
    got = jax.jit(lambda a, g: marlin.marlin_gemm(a, w.b_q_weight, w.b_scales, b_q_type="uint4b8", g_idx=g,
                                                   perm=kw["perm"]))(a, g_idx)
    clamped = jnp.clip(g_idx, 0, w.b_scales.shape[0] - 1)
    want = marlin._reference(jnp.take(a, kw["perm"], axis=1), w.b_q_weight, w.b_scales, clamped, b_q_type="uint4b8",
                             has_zeros=False, has_g_idx=True, has_bias=False, per_channel=False,
                             batch_invariant=False, hopper_from_rows=0)[0]
    assert rel_l2(got, want) < GEMM_TOLERANCE[jnp.float16]


@pytest.mark.parametrize("q_type", ["uint4b8", "uint4"])
def test_row_parallel_shard_holding_one_group(q_type):
    """A row-parallel shard with one group of scales keeps the grouped scale order (not per-channel's)."""
    rng = np.random.default_rng(12)
    k, n, m = 1024, 256, 4
    w = Weight(rng, q_type, k, n, 128, jnp.bfloat16)
    a = random_a(rng, (m, k), jnp.bfloat16)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def f(a, q, s, z):
        return marlin.marlin_gemm(a, q, s, b_q_type=q_type, b_zeros=z)

    put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sharded = jax.jit(f)(put(a, P(None, "x")), put(w.b_q_weight, P("x", None)), put(w.b_scales, P("x", None)),
                         put(w.b_zeros, P("x", None)))
    assert rel_l2(sharded, w.oracle_gemm(a)) < 1e-2
