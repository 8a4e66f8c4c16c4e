"""torch's W8A8 GEMMs timed on the shapes given, for jaxq.bench's comparison column. torch is a peer here,
never a dependency: only this module imports it, and jaxq.bench runs it in a child process when torch is
installed. Prints one JSON object: {"fp8 M K N": seconds, "int8 M K N": seconds}.

    python -m jaxq.bench_torch fp8:16:8192:28672 fp8-fast:4096:8192:28672 int8:4096:4096:14336 ...

fp8: torch._scaled_mm with row-wise scales (per-token x per-channel), bf16 out, use_fast_accum=False (its
default); fp8-fast: the same with use_fast_accum=True. int8: torch._int_mm then the scales in fp32, bf16 out.
marlin-ist: the original Marlin kernel (IST-DASLab/marlin: 4-bit symmetric weights, float16 activations, group
128), built here as a torch extension from its sources in $JAXQ_MARLIN_PEER_SRC (marlin_cuda.cpp and
marlin_cuda_kernel.cu; not part of jaxq, see tools/marlin_peer.md). Its L2 eviction hint (createpolicy) is an
illegal instruction on Hopper with CUDA 13, so the build drops the hint and keeps the plain cp.async.
Time per call is the slope between n and 2n calls on rotated inputs, timed with CUDA events (GPU time).

    python -m jaxq.bench_torch --build-marlin   # compiles the peer only (run beside jaxq's own build)
"""
import json
import os
import pathlib
import sys
import tempfile

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


def marlin_peer():
    """The IST-DASLab Marlin extension, compiled once (torch caches it under TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension

    src = pathlib.Path(os.environ.get("JAXQ_MARLIN_PEER_SRC", ".peers/ist-marlin")).resolve()
    build = pathlib.Path(tempfile.gettempdir()) / "jaxq-marlin-peer"
    build.mkdir(exist_ok=True)
    kernel = (src / "marlin_cuda_kernel.cu").read_text()
    hinted = kernel.count("createpolicy")
    kernel = kernel.replace('"   createpolicy.fractional.L2::evict_first.b64 p, 1.0;"', "").replace(
        "cp.async.cg.shared.global.L2::cache_hint [%0], [%1], %2, p;", "cp.async.cg.shared.global [%0], [%1], %2;")
    if hinted != 1 or "createpolicy" in kernel:
        raise RuntimeError(f"{src}: not the Marlin source this patch expects")
    for name, text in (("marlin_cuda.cpp", (src / "marlin_cuda.cpp").read_text()), ("marlin_cuda_kernel.cu", kernel)):
        if not (build / name).exists() or (build / name).read_text() != text:
            (build / name).write_text(text)
    return cpp_extension.load(
        name="jaxq_marlin_peer", sources=[str(build / "marlin_cuda.cpp"), str(build / "marlin_cuda_kernel.cu")],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)


def case(kind, m, k, n):
    calls = max(8, min(128, -(-ROTATE_BYTES // (k * n))))
    dev = "cuda"
    if kind == "marlin-ist":
        peer = marlin_peer()
        inputs = []
        for i in range(2 * calls):
            g = torch.Generator(device=dev).manual_seed(i)
            a = torch.randn(m, k, device=dev, dtype=torch.half, generator=g)
            b = torch.randint(-2**31, 2**31, (k // 16, n * 16 // 8), device=dev, dtype=torch.int32, generator=g)
            s = (torch.rand(k // 128, n, device=dev, generator=g) * 1e-2 + 1e-3).half()
            out = torch.empty(m, n, device=dev, dtype=torch.half)
            inputs.append((a, b, out, s, torch.zeros(n // 128 * 16, device=dev, dtype=torch.int32)))
        return slope_seconds(lambda a, b, out, s, lock: peer.mul(a, b, out, s, lock, -1, -1, -1, 16), inputs)
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


if sys.argv[1:] == ["--build-marlin"]:
    marlin_peer()
    sys.exit(0)
results = {}
for spec in sys.argv[1:]:
    kind, m, k, n = spec.split(":")
    try:
        results[f"{kind} {m} {k} {n}"] = case(kind, int(m), int(k), int(n))
    except Exception as e:  # e.g. torch._int_mm's limits on M: the column stays empty
        print(f"torch {spec}: {type(e).__name__}: {e}", file=sys.stderr)
    torch.cuda.empty_cache()
print(json.dumps(results))
