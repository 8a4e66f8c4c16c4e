"""Tensor parallelism of jaxq.nn models on real devices: a stack of Llama decoder layers per scheme, sharded over a
"model" mesh axis of 1, 2, 4 and 8 devices with the layers' metadata (q/k/v/gate/up column-parallel, o/down
row-parallel), optionally also over a "data" axis.

    python tools/tp_check.py [--config llama3-8b|small] [--layers 4] [--schemes bf16,awq,...] [--devices 1,2,4,8]
                             [--rows 1,16,128] [--prefill 2048] [--data 1]

Per scheme and device count: a decode step (M = batch rows, one token each, KV cache of 64 positions) and a
prefill (one sequence of --prefill tokens): the output's relative L2 against the one-device run (row-parallel
partial sums add in another order, and the W8A8 schemes requantize what differs), the time per step (device
time on GPUs, wall clock on CPUs: there it checks the program, not the speed), the scaling efficiency
(one-device time / (n x n-device time)), and the collectives XLA put in the compiled program, with any
all-gather of a quantized weight called out. On a CPU-only machine, run with
XLA_FLAGS=--xla_force_host_platform_device_count=8 for 8 virtual devices.
"""

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxq.nn as qnn
from jaxq.nn.llama import LLAMA3_8B, MODEL_AXIS, DecoderLayer, LayerCache, LlamaConfig

CONFIGS = {"llama3-8b": LLAMA3_8B,
           # Small enough for CPUs, and every group-128 weight still splits 8 ways.
           "small": LlamaConfig(hidden_size=1024, intermediate_size=2048, num_heads=8, num_kv_heads=8)}
# scheme -> (jaxq.nn.quantize scheme, options); "bf16" stays nnx.Linear
SCHEMES = {"bf16": None, "awq": ("awq", {}), "gptq": ("gptq", {}), "marlin": ("gptq", {"backend": "marlin"}),
           "fp8": ("fp8", {}), "fp8-block": ("fp8-block", {}), "int8": ("int8", {})}
CACHE = 64


class Stack(nnx.Module):
    def __init__(self, config, layers, rngs):
        self.layers = nnx.List([DecoderLayer(config, tensor_parallel=True, rngs=rngs) for _ in range(layers)])

    def __call__(self, x, cache, start):
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, layer_cache, start)
            new_cache.append(layer_cache)
        return x, new_cache


def build(config, layers, scheme):
    # Sharding metadata without a mesh yet: placed by shard_model below.
    eager = getattr(nnx, "use_eager_sharding", None)
    if eager is not None:
        with eager(False):
            stack = Stack(config, layers, nnx.Rngs(0))
    else:
        stack = Stack(config, layers, nnx.Rngs(0))
    if SCHEMES[scheme] is not None:
        name, options = SCHEMES[scheme]
        qnn.quantize(stack, name, **options)
    return stack


def collectives(hlo: str) -> list[str]:
    """The compiled program's collective ops, with their result shapes."""
    found = re.findall(r"= ([a-z0-9\[\],{}: ]+?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                       r"(?:-start)?\(", hlo)
    return [f"{kind} {shape.strip()}" for shape, kind in found]


def weight_gathers(ops: list[str], stack) -> list[str]:
    """All-gathers whose result has the full shape of a quantized weight (a weight gathered before its GEMM)."""
    shapes = {tuple(x.shape) for path, x in nnx.to_flat_state(nnx.state(stack, qnn.QuantizedWeight))
              for x in [x[...] if hasattr(x, "__getitem__") else x] if getattr(x, "ndim", 0) >= 1}
    out = []
    for op in ops:
        if not op.startswith("all-gather"):
            continue
        dims = tuple(int(d) for d in re.findall(r"\[([0-9,]*)\]", op)[0].split(",") if d) if "[" in op else ()
        if dims in shapes:
            out.append(op)
    return out


def seconds(program, args, runs=3):
    jax.block_until_ready(program(*args))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        best = min(best, time.perf_counter() - start)
    return best


def run(config, layers, scheme, devices, rows, prefill, data):
    stack = build(config, layers, scheme)
    graphdef, state = nnx.split(stack)
    step = jax.jit(lambda state, x, cache, start: nnx.merge(graphdef, state)(x, cache, start))
    results, reference = [], {}
    for n in devices:
        if n * data > len(jax.devices()):
            print(f"  {scheme}: {n} x {data} devices wanted, {len(jax.devices())} present: skipped", flush=True)
            continue
        mesh = jax.make_mesh((data, n), ("data", MODEL_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        try:
            placed = qnn.shard_model(nnx.merge(graphdef, state), mesh)
        except ValueError as error:  # a weight whose sharded dimension does not split n ways
            print(f"  {scheme}: not shardable over {n} devices: {error}", flush=True)
            continue
        placed_state = nnx.state(placed)
        batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        for label, batch, tokens in [(f"decode M{m}", m, 1) for m in rows] + [(f"prefill M{prefill}", 1, prefill)]:
            batch = max(batch, data) // data * data
            x = jax.random.normal(jax.random.key(1), (batch, tokens, config.hidden_size), jnp.float32)
            x = jax.device_put(x.astype(jnp.bfloat16), batch_spec)
            length = max(CACHE, tokens)
            cache = [LayerCache.empty(config, batch, length, jnp.bfloat16) for _ in range(layers)]
            cache = jax.device_put(cache, batch_spec)
            start = jnp.int32(0 if tokens > 1 else length // 2)
            with jax.set_mesh(mesh):
                out, _ = step(placed_state, x, cache, start)
                compiled = step.lower(placed_state, x, cache, start).compile().as_text()
                t = seconds(step, (placed_state, x, cache, start))
            out = np.asarray(out, np.float32)
            key = label
            if n == 1 and data == 1:
                reference[key] = (out, t)
            ref_out, ref_t = reference.get(key, (None, None))
            error = (float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)) if ref_out is not None else None)
            ops = collectives(compiled)
            row = dict(scheme=scheme, devices=f"{data}x{n}", case=label, ms=t * 1e3,
                       efficiency=(ref_t / (n * t)) if ref_t else None, error=error,
                       collectives=sorted(set(ops)), weight_gathers=weight_gathers(ops, stack))
            results.append(row)
            error_text = "" if error is None else f"{error:.2e}"
            efficiency_text = "" if row["efficiency"] is None else f"{row['efficiency']:.2f}"
            kinds = ", ".join(sorted({o.split()[0] for o in ops})) or "none"
            gathers = "  WEIGHT ALL-GATHER: " + "; ".join(row["weight_gathers"]) if row["weight_gathers"] else ""
            print(f"  {scheme:10s} {data}x{n} {label:14s} {t * 1e3:9.2f} ms  vs 1 device: {error_text:8s}  "
                  f"efficiency: {efficiency_text:5s}  collectives: {len(ops)} ({kinds}){gathers}", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama3-8b" if jax.default_backend() == "gpu"
                        else "small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--rows", default="1,16,128")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--data", type=int, default=1, help="size of the data-parallel mesh axis")
    args = parser.parse_args()
    config = CONFIGS[args.config]
    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}; {args.layers} {args.config} decoder layers; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}", flush=True)
    failures = []
    for scheme in args.schemes.split(","):
        rows = run(config, args.layers, scheme, [int(d) for d in args.devices.split(",")],
                   [int(m) for m in args.rows.split(",")], args.prefill, args.data)
        failures += [r for r in rows if r["weight_gathers"]]
    if failures:
        print(f"{len(failures)} program(s) all-gather a quantized weight")
        sys.exit(1)


if __name__ == "__main__":
    main()
