"""Runs every weight-only kernel variant once on small shapes, GPU only (no CPU reference), for
compute-sanitizer: AWQ GEMM and dequantization; GPTQ 2/3/4/8-bit GEMM (plain and exllama, M=1 and M=9,
split K) and dequantization (with and without act-order g_idx).

    compute-sanitizer --tool memcheck python tools/weight_only_kernels.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import formats

assert jaxq.cuda_available(), "needs the CUDA build"
rng = np.random.default_rng(0)
no_perm = jnp.zeros((0,), jnp.int32)
for dtype in (jnp.float16, jnp.bfloat16):
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
            qw, qz, sc, _ = formats.quantize_gptq(w, bits, 128, symmetric=False)
            for exllama in (False, True):
                weight = jaxq.gptq_shuffle(qw, no_perm, bits) if exllama else qw
                f = jax.jit(lambda x, *a: jaxq.gptq_gemm(x, *a, use_exllama=exllama, bits=bits))
                x = jnp.asarray(rng.standard_normal((m, 1024)), dtype)
                jax.block_until_ready(f(x, weight, qz, sc, no_perm))
                jax.block_until_ready(jax.jit(lambda *a: jaxq.gptq_dequantize(*a, bits=bits, use_exllama=exllama))(
                    weight, qz, sc, no_perm))
print("ran every weight-only kernel variant")
