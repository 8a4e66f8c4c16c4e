"""Where a benchmark program's time goes: runs the program `jaxq.bench` times (CALLS calls of one op, each on
its own input) under the JAX profiler and prints, per GPU stream, every kernel with its duration and the idle
gap before it, then the totals against the program's wall time.

    python tools/trace_calls.py per_token_group_fp8_quant 16384 7168 [CALLS]
    python tools/trace_calls.py gptq_gemm|awq_gemm M K N [CALLS]
    python tools/trace_calls.py copy BYTES [CALLS]
    python tools/trace_calls.py decoder_layer SCHEME M [CALLS]   (SCHEME: bf16 or a jaxq.nn scheme)

XLA_FLAGS set around it (e.g. --xla_gpu_enable_command_buffer=) show what a flag changes.
"""
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from jaxq import bench


def workload(argv):
    op = argv[0]
    if op == "copy":
        n = int(argv[1]) // 4
        return (lambda x: x * 2.0), (lambda i: (jnp.full((n,), float(i), jnp.float32),)), argv[2:]
    if op == "decoder_layer":
        fn, make_input, _ = bench.decoder_layer_workload(argv[1])
        return fn, make_input(int(argv[2])), argv[3:]
    if op in bench.WEIGHT_ONLY_OPS:
        m, k, n = map(int, argv[1:4])
        case = bench.WeightCase(op.removesuffix("_gemm"), 4, k, n)

        def make_input(i):
            return (jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16), *case.make_weight(i))

        return case.ours, make_input, argv[4:]
    m, k = map(int, argv[1:3])
    case = next(c for c in bench.cases([m], k) if c.op == op)

    def make_input(i):
        x = jax.random.normal(jax.random.key(i), case.shape, jnp.float32).astype(case.dtype)
        return (x, jnp.float32(672.0)) if case.needs_global_scale else (x,)

    return case.ours, make_input, argv[3:]


def main(argv):
    fn, make_input, rest = workload(argv)
    calls = int(rest[0]) if rest else 16
    inputs = [make_input(i) for i in range(calls)]
    program = jax.jit(lambda inputs: [fn(*args) for args in inputs])
    jax.block_until_ready(program(inputs))
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(program(inputs))
        walls.append(time.perf_counter() - start)
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        jax.block_until_ready(program(inputs))
        traced_wall = time.perf_counter() - start
    print(f"{calls} calls; program wall time untraced min {min(walls) * 1e6:.0f} us, traced {traced_wall * 1e6:.0f} us")
    for plane_name, line in bench.gpu_stream_lines(trace_dir):
        events = sorted(line.events, key=lambda e: e.start_ns)
        if not events:
            continue
        print(f"--- {plane_name} / {line.name}: {len(events)} events")
        busy, previous_end = 0.0, None
        for e in events:
            gap = "" if previous_end is None else f"{(e.start_ns - previous_end) / 1e3:8.1f}"
            print(f"  {gap:>8} us gap  {e.duration_ns / 1e3:8.1f} us  {e.name[:100]}")
            busy += e.duration_ns
            previous_end = max(previous_end or 0, e.start_ns + e.duration_ns)
        span = previous_end - events[0].start_ns
        print(f"  span {span / 1e3:.1f} us, kernels {busy / 1e3:.1f} us, idle {(span - busy) / 1e3:.1f} us; "
              f"per call: {span / calls / 1e3:.1f} us span, {busy / calls / 1e3:.1f} us kernels")


if __name__ == "__main__":
    main(sys.argv[1:])
