"""Runs every GEMM kernel variant of one family once on small shapes, GPU only (no CPU reference), for
compute-sanitizer.

* ``weight_only``: AWQ GEMM and dequantization; GPTQ 2/3/4/8-bit GEMM (plain and exllama, M=1 and M=9,
  split K, and 4-bit with more column tiles than SMs, which deals out narrower blocks) and dequantization
  (with and without act-order g_idx).
* ``marlin``: marlin_gemm for every weight type (FP4: NVFP4 and MXFP4), dtype, row bucket (M 1 in both kernel forms, 12, 20, 40,
  64, 130), grouped and per-channel scales, act-order (with corrupt g_idx entries, which the kernel must
  clamp), bias, K split over a cluster (N = 64) and not (N = 4096); then the Hopper kernel's rows (17, 130,
  256) and past them.
* ``marlin_hopper``: the Hopper kernel's variants alone (the ``marlin`` set runs them too), and gptq_gemm's 4-bit
  weights in exllama's layout and awq_gemm's on it.
* ``scaled_mm``: int8 and fp8 W8A8 GEMMs in every M-bucket tile configuration, both output dtypes, scalar
  and vector scales, bias, both zero-point forms, fp8 fast accumulation; fp8 with block-wise scales in both
  of its tiles.

    compute-sanitizer --tool memcheck python tools/gemm_kernels.py weight_only [bfloat16]

A dtype name after the family restricts the weight-only set to it (racecheck is slow; the kernels' shared
memory use does not depend on the dtype).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import formats

assert jaxq.cuda_available(), "needs the CUDA build"


def weight_only():
    rng = np.random.default_rng(0)
    no_perm = jnp.zeros((0,), jnp.int32)
    for dtype in [jnp.dtype(d) for d in sys.argv[2:]] or (jnp.float16, jnp.bfloat16):
        for m in (1, 9):
            w = jnp.asarray(rng.standard_normal((512, 160)), dtype)
            qweight, scales, qzeros = formats.quantize_awq(w, 64)
            x = jnp.asarray(rng.standard_normal((m, 512)), dtype)
            jax.block_until_ready(jax.jit(jaxq.awq_gemm)(x, qweight, scales, qzeros))
            jax.block_until_ready(jax.jit(lambda *a: jaxq.awq_gemm(*a, split_k_iters=3))(x, qweight, scales, qzeros))
            jax.block_until_ready(jax.jit(jaxq.awq_dequantize)(qweight, scales, qzeros))
            for bits in formats.GPTQ_BITS:
                w = jnp.asarray(rng.standard_normal((1024, 96)), dtype)
                qw, qz, sc, g_idx = formats.quantize_gptq(w, bits, 128, act_order=rng.permutation(1024), symmetric=False)
                jax.block_until_ready(jax.jit(lambda *a: jaxq.gptq_dequantize(*a, bits=bits))(qw, qz, sc, g_idx))
                corrupt = g_idx.at[::7].set(1 << 20).at[3::11].set(-1)  # clamped by the kernel, never read
                jax.block_until_ready(jax.jit(lambda *a: jaxq.gptq_dequantize(*a, bits=bits))(qw, qz, sc, corrupt))
                qw, qz, sc, _ = formats.quantize_gptq(w, bits, 128, symmetric=False)
                for exllama in (False, True):
                    weight = jaxq.gptq_shuffle(qw, no_perm, bits) if exllama else qw
                    f = jax.jit(lambda x, *a: jaxq.gptq_gemm(x, *a, use_exllama=exllama, bits=bits))
                    x = jnp.asarray(rng.standard_normal((m, 1024)), dtype)
                    jax.block_until_ready(f(x, weight, qz, sc, no_perm))
                    jax.block_until_ready(jax.jit(lambda *a: jaxq.gptq_dequantize(*a, bits=bits, use_exllama=exllama))(
                        weight, qz, sc, no_perm))
            n = jax.devices("cuda")[0].core_count * 128 + 3 * 96 + 32
            qw, qz, sc, _ = formats.quantize_gptq(jnp.asarray(rng.standard_normal((256, n)), dtype), 4, 128)
            x = jnp.asarray(rng.standard_normal((m, 256)), dtype)
            jax.block_until_ready(jax.jit(lambda *a: jaxq.gptq_gemm(*a, no_perm, use_exllama=False, bits=4))(x, qw, qz, sc))
    print("ran every weight-only kernel variant")


def _marlin_weights(rng, k, n, groups, dtype):
    """(b_q_weight, b_scales, marlin_gemm keywords, act-order allowed) of each weight type on K x N: the
    integer and fp8 types with `groups` groups of K's rows, and FP4's two formats (NVFP4 in both dtypes, MXFP4 in
    bfloat16) with theirs."""
    from jaxq.ops import marlin as ops

    for q_type, (bits, _, zeros) in ops.SCALAR_TYPES.items():
        if q_type == "float4_e2m1f":
            continue
        q = jnp.asarray(rng.integers(0, 2**31, (k // 16, n * bits // 2)), jnp.int32)
        s = jnp.asarray(rng.uniform(0.5, 1.5, (groups, n)) * 1e-2, dtype)
        z = jnp.asarray(rng.integers(0, 2**31, (groups, n // 8)), jnp.int32) if zeros else None
        yield q, s, dict(b_q_type=q_type, b_zeros=z), q_type != "float8_e4m3fn" and groups > 1
    packed = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, (n, k // 16)), jnp.float32).astype(jnp.float8_e4m3fn)
    q, s, g = ops.marlin_fp4_weight(packed, scale, jnp.float32(1e-3), dtype=dtype)
    yield q, s, dict(b_q_type="float4_e2m1f", global_scale=g), False
    if dtype == jnp.bfloat16:
        exponents = jnp.asarray(rng.integers(115, 126, (n, k // 32)), jnp.uint8)
        q, s, _ = ops.marlin_fp4_weight(packed, exponents, None, dtype=dtype)
        yield q, s, dict(b_q_type="float4_e2m1f"), False


def marlin():
    from jaxq.ops import marlin as ops

    rng = np.random.default_rng(0)
    for dtype in [jnp.dtype(d) for d in sys.argv[2:]] or (jnp.float16, jnp.bfloat16):
        # The shapes' plans: 1 tile per block with a 2-way K split, 1 tile without, 4 tiles in a 3-way split.
        for k, n, groups in ((1024, 64, 8), (256, 4096, 1), (512, 8704, 4)):
            for q, s, weight_kw, act_order in _marlin_weights(rng, k, n, groups, dtype):
                for order in [None, "act"] if act_order else [None]:
                    kw = dict(weight_kw)
                    if order:
                        g_idx = np.sort(rng.integers(0, s.shape[0], k)).astype(np.int32)
                        g_idx[::97] = 1 << 20  # corrupt entries: clamped, never read past the scales
                        kw.update(g_idx=jnp.asarray(g_idx), perm=jnp.asarray(rng.permutation(k), jnp.int32))
                    for m, invariant in ((1, False), (1, True), (12, True), (20, True), (40, True), (64, True),
                                         (130, True)):
                        a = jnp.asarray(rng.standard_normal((m, k)), dtype)
                        bias = jnp.asarray(rng.standard_normal((n,)), dtype) if m % 2 == 0 else None
                        with ops.batch_invariant(invariant):
                            jax.block_until_ready(jax.jit(lambda a, q, s, bias: jaxq.marlin_gemm(
                                a, q, s, b_bias=bias, **kw))(a, q, s, bias))
                    # The Hopper kernel where it takes the weight, then (past its rows) the dequantize kernel
                    # and XLA's dot.
                    _hopper_rows(rng, q, s, kw, dtype, (1, 17, 130, ops.HOPPER_MAX_ROWS, ops.HOPPER_MAX_ROWS + 1))
    print("ran every marlin kernel variant")


def _hopper_rows(rng, q, s, kw, dtype, rows):
    """marlin_gemm with the Hopper kernel forced from one row (its row blocks, tails, its last row count); bias on
    even row counts."""
    from jaxq.ops import marlin as ops

    k, n = q.shape[0] * 16, s.shape[1]
    for m in rows:
        a = jnp.asarray(rng.standard_normal((m, k)), dtype)
        bias = jnp.asarray(rng.standard_normal((n,)), dtype) if m % 2 == 0 else None
        with ops.hopper_limits(first_rows=1, max_rows=ops.HOPPER_MAX_ROWS):
            jax.block_until_ready(jax.jit(lambda a, q, s, bias: jaxq.marlin_gemm(
                a, q, s, b_bias=bias, **kw))(a, q, s, bias))


def scaled_mm():
    rng = np.random.default_rng(0)
    k, n = 272, 208
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        b = jnp.asarray(rng.integers(-8, 8, (k, n)), dtype)
        for m in (1, 17, 65, 129):  # one per tile configuration
            a = jnp.asarray(rng.integers(-8, 8, (m, k)), dtype)
            sa, sb = jnp.ones((m, 1), jnp.float32), jnp.full((1,), 0.5, jnp.float32)  # vector, scalar
            sa1, sbn = jnp.ones((1,), jnp.float32), jnp.full((1, n), 0.5, jnp.float32)  # scalar, vector
            for out in (jnp.bfloat16, jnp.float16):
                bias = jnp.ones((n,), out)
                jax.block_until_ready(jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x, out))(a, b, sa, sb))
                jax.block_until_ready(jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x[:4], out, bias=x[4]))(a, b, sa1, sbn, bias))
                if dtype == jnp.float8_e4m3fn:
                    f = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x, out, use_fast_accum=True))
                    jax.block_until_ready(f(a, b, sa, sb))
            if dtype == jnp.int8:
                adj = jaxq.cutlass_azp_adj(b)
                azp = jnp.arange(m, dtype=jnp.int32)
                jax.block_until_ready(jax.jit(lambda *x: jaxq.cutlass_scaled_mm_azp(*x[:4], jnp.bfloat16, x[4], azp=x[5]))(
                    a, b, sa, sb, adj, azp))
                jax.block_until_ready(jax.jit(lambda *x: jaxq.cutlass_scaled_mm_azp(*x[:4], jnp.float16, x[4], bias=x[5]))(
                    a, b, sa, sb, adj * 3, jnp.ones((n,), jnp.float16)))
    k = 384
    b = jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.float8_e4m3fn)
    sb = jnp.full((k // 128, -(-n // 128)), 0.5, jnp.float32)
    for m in (5, 65):  # one per block-wise tile; 5 rows are padded to 8
        a = jnp.asarray(rng.integers(-8, 8, (m, k)), jnp.float8_e4m3fn)
        sa = jnp.ones((m, k // 128), jnp.float32)
        for out in (jnp.bfloat16, jnp.float16):
            f = jax.jit(lambda *x: jaxq.cutlass_scaled_mm(*x[:4], out, bias=x[4]))
            jax.block_until_ready(f(a, b, sa, sb, jnp.ones((n,), out)))
    print("ran every scaled_mm kernel variant")


def marlin_hopper():
    """The Hopper (wgmma) kernel alone: every weight type, both dtypes, grouped (32 and 128 rows; FP4's own) and
    per-channel scales, each row block (16 to 128 rows) with tails, K split over clusters of 2 and 8 blocks and
    not, bias."""
    from jaxq.ops import marlin as ops

    rng = np.random.default_rng(0)
    for dtype in [jnp.dtype(d) for d in sys.argv[2:]] or (jnp.float16, jnp.bfloat16):
        for k, n, groups in ((512, 8704, 4), (256, 384, 8), (256, 4096, 1), (1024, 384, 8), (4096, 128, 32)):
            rows = (1, 16, 20, 33, 64, 130, ops.HOPPER_MAX_ROWS)
            for q, s, weight_kw, _ in _marlin_weights(rng, k, n, groups, dtype):
                _hopper_rows(rng, q, s, weight_kw, dtype, rows)
            qw, qz, sc, _ = formats.quantize_gptq(jnp.asarray(rng.standard_normal((k, n)), dtype), 4, k // groups,
                                                  symmetric=False)
            qw, no_perm = jaxq.gptq_shuffle(qw, jnp.zeros((0,), jnp.int32), 4), jnp.zeros((0,), jnp.int32)
            awq = formats.quantize_awq(jnp.asarray(rng.standard_normal((k, n)), dtype), k // groups)
            for m in rows:
                x = jnp.asarray(rng.standard_normal((m, k)), dtype)
                with ops.hopper_limits(first_rows=1, max_rows=ops.HOPPER_MAX_ROWS):
                    jax.block_until_ready(jax.jit(lambda x, *a: jaxq.gptq_gemm(x, *a, use_exllama=True, bits=4))(
                        x, qw, qz, sc, no_perm))
                    jax.block_until_ready(jax.jit(jaxq.awq_gemm)(x, *awq))
    print("ran every marlin Hopper kernel variant")


{"weight_only": weight_only, "scaled_mm": scaled_mm, "marlin": marlin, "marlin_hopper": marlin_hopper}[sys.argv[1]]()
