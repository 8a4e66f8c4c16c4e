"""Runs one weight-only GEMM a few times (for ncu / compute-sanitizer):
    python tools/one_gemm.py awq|gptq BITS M K N"""
import sys

import jax
import jax.numpy as jnp

from jaxq import bench

family, bits, m, k, n = sys.argv[1], *map(int, sys.argv[2:6])
case = bench.WeightCase(family, bits, k, n)
x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(case.dtype)
f = jax.jit(case.ours)
weight = case.make_weight(0)
for _ in range(3):
    jax.block_until_ready(f(x, *weight))
