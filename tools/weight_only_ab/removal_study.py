"""Builds timing-only variants of csrc/kernels/marlin_hopper.cu that each leave one part of the main loop out, so
that where the wgmma kernel's time goes can be read from differences of times (no profiler counters needed). Their
outputs are wrong by design: they are for the Marlin harness's timing cases only.

  python3 tools/weight_only_ab/removal_study.py             # here: bin/marlin_<variant> for every variant
  cd tools/weight_only_ab/bin && for b in marlin_new marlin_no_*; do MARLIN_AB_CASE="hopper u4b8 M128" ./$b ${b#marlin_}; done

Variants: no_dequant (the codes' words go to the tensor cores unconverted), no_a_copy (a's cp.async left out),
no_sync (the per-stage block barrier left out), no_wgmma (no tensor-core work). A part whose results nothing reads
any more takes its producers with it: without the wgmmas the dequantization and the shared-memory reads of the
codes are dead code too, so no_wgmma times the copy pipeline alone (a mma.sync build timed 2026-12-08 showed the
wgmmas themselves cost little at 16 rows).
"""

import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = REPO / "tools" / "weight_only_ab" / "bin"

VARIANTS = {
    "no_dequant": (
        "      Dequantize<T, kType>(&codes, 0, h, neg[half][h], neg[half][h], scale[row][h], scale[row][h], b[h][0], "
        "b[h][1]);",
        "      b[h][0] = codes.x + h;\n      b[h][1] = codes.x ^ h;"),
    "no_a_copy": (
        "      for (int i = 0; i < (kRows * 8 + kThreads - 1) / kThreads; ++i) {  // a: kRows x 8 pieces of 8 k",
        "      for (int i = 0; i < 0; ++i) {"),
    "no_sync": ("    __syncthreads();\n    issue(s + kStages - 2);", "    issue(s + kStages - 2);"),
    "no_wgmma": (
        "      Wgmma<T, kRows>(acc, frag[step], Descriptor(tile, step), s > 0 || step > 0);",
        "      if (s < 0) Wgmma<T, kRows>(acc, frag[step], Descriptor(tile, step), s > 0 || step > 0);"),
}


def build(name: str) -> None:
    old, new = VARIANTS[name]
    source = (REPO / "csrc" / "kernels" / "marlin_hopper.cu").read_text()
    if source.count(old) != 1:
        raise SystemExit(f"{name}: the line it replaces is not in marlin_hopper.cu once (the kernel changed)")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = pathlib.Path(tmp) / "kernels" / "marlin_hopper.cu"
        kernel.parent.mkdir()
        kernel.write_text(source.replace(old, new))
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-gencode", "arch=compute_90a,code=sm_90a",
                        "--expt-relaxed-constexpr", f"-I{tmp}", f"-I{REPO / 'csrc'}",
                        str(REPO / "tools" / "weight_only_ab" / "marlin_ab.cu"),
                        str(REPO / "csrc" / "kernels" / "sm_count.cu"), str(kernel), "-o", str(BIN / f"marlin_{name}")],
                       check=True)


if __name__ == "__main__":
    BIN.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or VARIANTS:
        build(name)
        print("built", BIN / f"marlin_{name}")
