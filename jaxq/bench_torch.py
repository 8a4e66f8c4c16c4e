"""torch's W8A8 GEMMs timed on the shapes given, for jaxq.bench's comparison column. torch is a peer here,
never a dependency: only this module imports it, and jaxq.bench runs it in a child process when torch is
installed. Prints one JSON object: {"fp8 M K N": seconds, "int8 M K N": seconds}.

    python -m jaxq.bench_torch fp8:16:8192:28672 fp8-fast:4096:8192:28672 int8:4096:4096:14336 ...

fp8: torch._scaled_mm with row-wise scales (per-token x per-channel), bf16 out, use_fast_accum=False (its
default); fp8-fast: the same with use_fast_accum=True. int8: torch._int_mm then the scales in fp32, bf16 out.
Time per call is the slope between n and 2n calls on rotated inputs, timed with CUDA events (GPU time).
"""
import json
import sys

import torch

ROTATE_BYTES = 256 << 20


def slope_seconds(fn, inputs):
    def run(items):
        fn(*items[0])
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for args in items:
                fn(*args)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    n = len(inputs) // 2
    return (run(inputs) - run(inputs[:n])) / n


def case(kind, m, k, n):
    calls = max(8, min(128, -(-ROTATE_BYTES // (k * n))))
    dev = "cuda"
    inputs = []
    for i in range(2 * calls):
        g = torch.Generator(device=dev).manual_seed(i)
        if kind.startswith("fp8"):
            a = (torch.randn(m, k, device=dev, generator=g) * 4).to(torch.float8_e4m3fn)
            w = (torch.randn(n, k, device=dev, generator=g) * 4).to(torch.float8_e4m3fn)
        else:
            a = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
            w = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
        sa = torch.rand(m, 1, device=dev, generator=g) * 1e-2 + 1e-3
        sb = torch.rand(1, n, device=dev, generator=g) * 1e-2 + 1e-3
        inputs.append((a, w, sa, sb))
    if kind.startswith("fp8"):
        fast = kind == "fp8-fast"
        f = lambda a, w, sa, sb: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                  use_fast_accum=fast)
        return slope_seconds(f, inputs)
    f = lambda a, w, sa, sb: (torch._int_mm(a, w.t()).float() * sa * sb).to(torch.bfloat16)
    return slope_seconds(f, inputs)


results = {}
for spec in sys.argv[1:]:
    kind, m, k, n = spec.split(":")
    try:
        results[f"{kind} {m} {k} {n}"] = case(kind, int(m), int(k), int(n))
    except Exception as e:  # e.g. torch._int_mm's limits on M: the column stays empty
        print(f"torch {spec}: {type(e).__name__}: {e}", file=sys.stderr)
    torch.cuda.empty_cache()
print(json.dumps(results))
