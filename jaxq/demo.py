"""jaxq's main job for now: quantize activations and run weight-only quantized GEMMs inside jitted functions,
and say what ran where.

    python -m jaxq.demo

Builds a small batch of activations, runs each activation-quantization op under ``jax.jit`` (and the
fp8 one under ``vmap`` and a sharded ``jit`` when several devices exist), dequantizes the results and
prints, per op, whether the CUDA kernel or the jnp reference ran, the reconstruction error and the time; then
the same for ``awq_gemm`` and ``gptq_gemm`` on a small quantized linear layer.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxq


def _lowered_to_kernel(fn, *args) -> bool:
    return "custom_call @jaxq_" in jax.jit(fn).lower(*args).as_text()


def _timed(fn, *args, repeats=20):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - start) / repeats


def _rel_err(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def main():
    tokens, hidden = 512, 2048
    x = jax.random.normal(jax.random.key(0), (tokens, hidden), jnp.float32)
    x = (x * jnp.exp2(jax.random.randint(jax.random.key(1), (tokens, 1), -4, 4))).astype(jnp.bfloat16)
    xf = np.asarray(x, np.float32)
    global_scale = jnp.float32(448.0 * 6.0 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))

    def fp8(x):
        q, s = jaxq.per_token_group_fp8_quant(x, 128)
        return (q.astype(jnp.float32).reshape(tokens, -1, 128) * s[..., None]).reshape(x.shape)

    def int8(x):
        q, s = jaxq.per_token_group_fp8_quant(x, 128, out_dtype=jnp.int8)
        return (q.astype(jnp.float32).reshape(tokens, -1, 128) * s[..., None]).reshape(x.shape)

    def fp8_packed(x):
        q, packed = jaxq.per_token_group_fp8_quant_packed(x, 128)
        exponents = jax.lax.bitcast_convert_type(packed.T, jnp.uint8).reshape(tokens, -1)  # [M, groups]
        scales = jax.lax.bitcast_convert_type(exponents.astype(jnp.uint32) << 23, jnp.float32)
        return (q.astype(jnp.float32).reshape(tokens, -1, 128) * scales[..., None]).reshape(x.shape)

    def nvfp4(x):
        q, s = jaxq.scaled_fp4_quant(x, global_scale)
        return jaxq.nvfp4_dequantize(q, s, global_scale)

    print(f"jaxq demo on {jax.devices()[0].device_kind} ({len(jax.devices())} device(s)); "
          f"CUDA kernels {'available' if jaxq.cuda_available() else 'not available: jnp reference lowerings'}")
    print(f"activations: {tokens} x {hidden} bfloat16\n")
    print(f"| op | ran as | rel. error after dequantize | ms per call (jit) |\n|---|---|---|---|")
    for name, fn in [("per_token_group_fp8_quant (fp8, G=128)", fp8), ("per_token_group_fp8_quant (int8, G=128)", int8),
                     ("per_token_group_fp8_quant_packed (UE8M0)", fp8_packed), ("scaled_fp4_quant (NVFP4)", nvfp4)]:
        out, seconds = _timed(fn, x)
        where = "CUDA kernel" if _lowered_to_kernel(fn, x) else "jnp reference"
        print(f"| {name} | {where} | {_rel_err(out, xf):.4f} | {seconds * 1e3:.3f} |")

    # Weight-only quantized linear layers at decode size: 4 tokens through a 2048 x 2048 weight.
    w = jax.random.normal(jax.random.key(2), (hidden, hidden), jnp.float32) / np.sqrt(hidden)
    tokens_in = x[:4]
    exact = xf[:4] @ np.asarray(w, np.float32)
    qweight, scales, qzeros = jaxq.formats.quantize_awq(w.astype(jnp.bfloat16), 128)
    g_qweight, g_qzeros, g_scales, _ = jaxq.formats.quantize_gptq(w.astype(jnp.bfloat16), 4, 128)
    no_perm = jnp.zeros((0,), jnp.int32)
    exllama_qweight = jaxq.gptq_shuffle(g_qweight, no_perm, 4)
    print(f"\nweight-only GEMMs, x[4, {hidden}] @ W[{hidden}, {hidden}] (error vs the float weight):\n")
    print("| op | ran as | rel. error | ms per call (jit) |\n|---|---|---|---|")
    for name, fn in [
        ("awq_gemm (4-bit, G=128)", lambda x: jaxq.awq_gemm(x, qweight, scales, qzeros)),
        ("gptq_gemm (4-bit exllama, G=128)",
         lambda x: jaxq.gptq_gemm(x, exllama_qweight, g_qzeros, g_scales, no_perm, use_exllama=True, bits=4)),
    ]:
        out, seconds = _timed(fn, tokens_in)
        where = "CUDA kernel" if _lowered_to_kernel(fn, tokens_in) else "jnp reference"
        print(f"| {name} | {where} | {_rel_err(out, exact):.4f} | {seconds * 1e3:.3f} |")

    stacked = jnp.stack([x, 2 * x])
    batched = jax.jit(jax.vmap(fp8))(stacked)
    print(f"\nvmap over 2 batches: relative error {_rel_err(batched, np.stack([xf, 2 * xf])):.4f}")
    if len(jax.devices()) > 1:
        mesh = jax.make_mesh((len(jax.devices()),), ("tokens",))
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tokens")))
        q, s = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 128))(sharded)
        print(f"token-sharded over {len(jax.devices())} devices: scales sharded as {s.sharding.spec}")


if __name__ == "__main__":
    main()
