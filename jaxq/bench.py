"""Benchmark of jaxq's ops against the same op written in plain jnp and compiled by XLA.

    python -m jaxq.bench [--ops per_token_group_fp8_quant,...] [--quick]

For each op and shape it prints the time per call, the achieved bandwidth (bytes read + written), that
bandwidth as a share of the device-to-device copy bandwidth measured in the same run, and the speed-up
over the jnp version. Each jitted program makes many calls, on inputs rotated so that L2 never holds
them, and keeps every output alive so nothing is skipped. Times are device time from a profiler trace
(see ``_time_per_call``), the same for every op and peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import math
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

import jaxq
from jaxq.ops import _weight_only, awq as awq_ops, gptq as gptq_ops

_ROTATE_BYTES = 256 << 20  # 5x the H100's 50 MB L2
_MIN_CALLS, _MAX_CALLS = 8, 256
_RUNS = 5


def gpu_stream_lines(trace_dir: str):
    """(plane name, line) of every GPU stream line (its events are kernels, copies and memsets) in the
    profiler traces under ``trace_dir``."""
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:GPU"):
                yield from ((plane.name, line) for line in plane.lines if line.name.startswith("Stream"))


def _device_span_seconds(trace_dir: str) -> float | None:
    """First kernel start to last kernel end on the GPU streams of a profiler trace; None without GPU
    activity (a CPU run)."""
    events = [e for _, line in gpu_stream_lines(trace_dir) for e in line.events]
    if not events:
        return None
    return (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) * 1e-9


def _program_seconds(fn: Callable, inputs: list[tuple]) -> float:
    """Seconds of one run of a jitted program calling ``fn`` on each input, the best of a few runs
    (interference only ever adds time): device time on a GPU, else wall-clock time."""
    @jax.jit
    def program(inputs):
        return [fn(*args) for args in inputs]

    jax.block_until_ready(program(inputs))
    samples = []
    for _ in range(_RUNS):
        if jax.default_backend() == "gpu":
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir):
                    jax.block_until_ready(program(inputs))
                samples.append(_device_span_seconds(trace_dir))
        else:
            start = time.perf_counter()
            jax.block_until_ready(program(inputs))
            samples.append(time.perf_counter() - start)
    if None in samples:
        raise RuntimeError("the profiler trace holds no GPU kernels")
    return min(samples)


def _time_per_call(fn: Callable, make_input: Callable[[int], tuple], bytes_per_call: int) -> float:
    """Seconds per call of ``fn`` in a jitted program of many calls, each on its own input (XLA would merge
    identical calls), enough of them that the inputs are several times the L2.

    On a GPU this is device time: the program's span from its first kernel's start to its last kernel's
    end in a profiler trace, over the calls. Wall-clock time would add the host's per-argument and
    per-result work of the benchmark program itself (about 17 µs per call on the H100 machine, measured
    with tools/trace_calls.py), which a model's jitted step does not pay for its inner ops. Elsewhere it
    is the wall-clock slope between programs of n and 2n calls."""
    calls = max(_MIN_CALLS, min(_MAX_CALLS, math.ceil(_ROTATE_BYTES / max(bytes_per_call, 1))))
    inputs = [make_input(i) for i in range(2 * calls)]
    if jax.default_backend() == "gpu":
        return _program_seconds(fn, inputs) / (2 * calls)
    return (_program_seconds(fn, inputs) - _program_seconds(fn, inputs[:calls])) / calls


def copy_bandwidth(total_bytes: int = 1 << 30) -> float:
    """Bytes per second of a large device-to-device elementwise copy (read + write counted)."""
    n = total_bytes // 4
    seconds = _time_per_call(lambda x: x * 2.0, lambda i: (jnp.full((n,), float(i), jnp.float32),), 4 * n)
    return 2 * 4 * n / seconds


# The jnp versions a user would write (plain divisions, no bit-exactness care).
def _jnp_group_quant(x, group_size, ue8m0=False):
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, group_size)
    s = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1), 1e-10) / 448.0
    if ue8m0:
        s = jnp.exp2(jnp.ceil(jnp.log2(s)))
    q = jnp.clip(xg / s[..., None], -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q.reshape(x.shape), s


def _jnp_group_quant_packed(x, group_size):
    q, s = _jnp_group_quant(x, group_size, ue8m0=True)
    e = (jax.lax.bitcast_convert_type(s, jnp.uint32) >> 23).reshape(s.shape[0], -1, 4)
    packed = e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)
    return q, jax.lax.bitcast_convert_type(packed, jnp.int32).T


def _jnp_fp4(x, gs):
    m, k = x.shape
    xb = x.astype(jnp.float32).reshape(m, k // 16, 16)
    sf = jnp.clip(gs * jnp.max(jnp.abs(xb), axis=-1) / 6.0, 0, 448.0).astype(jnp.float8_e4m3fn)
    out_scale = jnp.where(sf != 0, gs / sf.astype(jnp.float32), 0.0)
    v = xb * out_scale[..., None]
    a = jnp.abs(v)
    code = sum((a > t).astype(jnp.uint8) for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0))
    code = (code | (jnp.signbit(v).astype(jnp.uint8) << 3)).reshape(m, k // 2, 2)
    q = code[..., 0] | (code[..., 1] << 4)
    return q, jaxq.swizzle_block_scales(sf)


@dataclasses.dataclass
class Case:
    op: str
    label: str
    shape: tuple[int, int]
    dtype: jnp.dtype
    ours: Callable
    xla: Callable
    needs_global_scale: bool = False

    def bytes_moved(self, outputs) -> int:
        m, k = self.shape
        read = m * k * jnp.dtype(self.dtype).itemsize
        return read + sum(o.size * o.dtype.itemsize for o in outputs)


def cases(token_counts: list[int], hidden: int) -> list[Case]:
    shapes = [(m, hidden) for m in token_counts]
    out = []
    for m, k in shapes:
        bf16 = jnp.dtype(jnp.bfloat16)
        out += [
            Case("per_token_group_fp8_quant", "bf16 G128", (m, k), bf16,
                 lambda x: jaxq.per_token_group_fp8_quant(x, 128), lambda x: _jnp_group_quant(x, 128)),
            Case("per_token_group_fp8_quant", "bf16 G128 col-major ue8m0", (m, k), bf16,
                 lambda x: jaxq.per_token_group_fp8_quant(x, 128, column_major_scales=True, scale_ue8m0=True),
                 lambda x: tuple(o if i == 0 else o.T for i, o in enumerate(_jnp_group_quant(x, 128, True)))),
            Case("per_token_group_fp8_quant_packed", "bf16 G128", (m, k), bf16,
                 lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128), lambda x: _jnp_group_quant_packed(x, 128)),
            Case("scaled_fp4_quant", "bf16", (m, k), bf16, jaxq.scaled_fp4_quant, _jnp_fp4, needs_global_scale=True),
        ]
    return out


def run(ops: set[str] | None, token_counts: list[int], hidden: int, quick: bool) -> list[dict]:
    copy = copy_bandwidth(64 << 20 if quick else 1 << 30)
    print(f"device: {jax.devices()[0].device_kind}; kernels: {'CUDA' if jaxq.cuda_available() else 'jnp reference'}; "
          f"copy bandwidth {copy / 1e9:.0f} GB/s (read + write)")
    rows = []
    for case in cases(token_counts, hidden):
        if ops and case.op not in ops:
            continue
        m, k = case.shape

        def make_input(i, case=case):
            x = jax.random.normal(jax.random.key(i), case.shape, jnp.float32).astype(case.dtype)
            return (x, jnp.float32(448.0 * 6.0 / 4.0)) if case.needs_global_scale else (x,)

        outputs = jax.eval_shape(case.ours, *make_input(0))
        moved = case.bytes_moved(outputs)
        ours = _time_per_call(case.ours, make_input, moved)
        xla = _time_per_call(case.xla, make_input, moved)
        rows.append(dict(op=case.op, variant=case.label, shape=f"M{m} K{k}", us=ours * 1e6,
                         gbps=moved / ours / 1e9, pct_copy=100 * moved / ours / copy,
                         xla_us=xla * 1e6, speedup=xla / ours))
    header = "| op | variant | shape | µs | GB/s | % of copy BW | XLA jnp µs | vs XLA |"
    print(header + "\n|" + "---|" * 8)
    for r in rows:
        print(f"| {r['op']} | {r['variant']} | {r['shape']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{r['pct_copy']:.1f}% | {r['xla_us']:.1f} | {r['speedup']:.2f}x |")
    return rows


# ------------------------------------------------------------------------------- weight-only GEMMs

WEIGHT_SHAPES = [(8192, 28672), (4096, 14336), (28672, 8192)]  # (K, N): Llama-3-8B/70B-like projections


@dataclasses.dataclass
class WeightCase:
    family: str  # "awq" or "gptq"
    bits: int
    k: int
    n: int
    dtype: jnp.dtype = jnp.dtype(jnp.bfloat16)
    group_size: int = 128

    def make_weight(self, i: int) -> tuple:
        """Random packed tensors (every bit pattern is a valid weight), scales near 1e-2."""
        keys = jax.random.split(jax.random.key(10_000 + i), 3)
        groups = self.k // self.group_size
        scales = (jax.random.uniform(keys[2], (groups, self.n), jnp.float32, 0.5, 1.5) * 1e-2).astype(self.dtype)
        if self.family == "awq":
            qweight = jax.random.bits(keys[0], (self.k, self.n // 8), jnp.uint32).view(jnp.int32)
            qzeros = jax.random.bits(keys[1], (groups, self.n // 8), jnp.uint32).view(jnp.int32)
        else:
            qweight = jax.random.bits(keys[0], (self.k * self.bits // 32, self.n), jnp.uint32).view(jnp.int32)
            qzeros = jax.random.bits(keys[1], (groups, self.n * self.bits // 32), jnp.uint32).view(jnp.int32)
        return qweight, qzeros, scales

    def weight_bytes(self) -> int:
        groups = self.k // self.group_size
        return self.k * self.n * self.bits // 8 + groups * self.n * (2 + self.bits / 8)

    def ours(self, x, qweight, qzeros, scales):
        if self.family == "awq":
            return jaxq.awq_gemm(x, qweight, scales, qzeros)
        return jaxq.gptq_gemm(x, qweight, qzeros, scales, jnp.zeros((0,), jnp.int32), use_exllama=True, bits=self.bits)

    def kernel(self, x, qweight, qzeros, scales):
        """The kernel alone, for any M (crossover measurements)."""
        if self.family == "awq":
            return awq_ops._awq_gemm(x, qweight, qzeros, scales, split_k_hint=None)[0]
        return gptq_ops._gptq_gemm(x, qweight, qzeros, scales, bits=self.bits, exllama=True, v2=False)[0]

    def dequantize(self, qweight, qzeros, scales):
        if self.family == "awq":
            return jaxq.awq_dequantize(qweight, scales, qzeros)
        return jaxq.gptq_dequantize(qweight, qzeros, scales, jnp.zeros((0,), jnp.int32), bits=self.bits, use_exllama=True)

    def xla(self, x, qweight, qzeros, scales):
        """What a user writes without jaxq: unpack in jnp, then jnp.dot."""
        if self.family == "awq":
            w = awq_ops.awq_dequantize_reference(qweight, qzeros, scales)
        else:
            w = gptq_ops.gptq_dequantize_reference(qweight, qzeros, scales, bits=self.bits, exllama=False, v2=False)
        return jnp.dot(x, w)


def run_weight_only(families: set[str], rows: list[int], sweep: list[int], copy: float,
                    splits: list[int] = ()) -> list[dict]:
    cases = [WeightCase("awq", 4, k, n) for k, n in WEIGHT_SHAPES]
    cases += [WeightCase("gptq", 4, k, n) for k, n in WEIGHT_SHAPES]
    cases += [WeightCase("gptq", 8, 8192, 28672)]
    out = []
    for case in cases:
        if f"{case.family}_gemm" not in families:
            continue
        moved = case.weight_bytes()
        make_weight = functools.cache(case.make_weight)
        for m in sorted(set(rows + (sweep if (case.k, case.n, case.bits) == (8192, 28672, 4) else []))):
            if m >= 1024 and (case.k, case.n) != (8192, 28672):
                continue

            def make_input(i, m=m, case=case):
                x = jax.random.normal(jax.random.key(i), (m, case.k), jnp.float32).astype(case.dtype)
                return (x, *make_weight(i))

            row = dict(op=f"{case.family}_gemm", variant=f"{case.bits}-bit G{case.group_size} bf16", shape=f"M{m} K{case.k} N{case.n}")
            ours = _time_per_call(case.ours, make_input, moved)
            row.update(us=ours * 1e6, gbps=moved / ours / 1e9, pct_copy=100 * moved / ours / copy)
            if m <= 256:
                xla = _time_per_call(case.xla, make_input, moved)
                row.update(xla_us=xla * 1e6, speedup=xla / ours)
            if m in sweep:  # both sides of the crossover
                row["kernel_us"] = _time_per_call(case.kernel, make_input, moved) * 1e6
                row["dequant_dot_us"] = _time_per_call(
                    lambda x, *w, case=case: jnp.dot(x, case.dequantize(*w)), make_input, moved) * 1e6
            if splits and case.family == "awq" and m <= 16:
                for split in splits:  # the K-split choice of jaxq/ops/_weight_only.py, checked
                    row[f"split{split}_us"] = _time_per_call(
                        lambda x, q, z, s, split=split: awq_ops._awq_gemm(x, q, z, s, split_k_hint=split)[0],
                        make_input, moved) * 1e6
            if m >= 1024:  # against cuBLAS bf16 on an already dequantized weight
                dense = functools.cache(lambda i, case=case: case.dequantize(*make_weight(i)))
                bf16 = _time_per_call(lambda x, w: jnp.dot(x, w),
                                      lambda i, m=m, case=case: (make_input(i)[0], dense(i)), moved * 4)
                row.update(bf16_dot_us=bf16 * 1e6, vs_bf16=ours / bf16)
            out.append(row)
            print(row, flush=True)
    _print_table(out, [("µs", "us", "{:.1f}"), ("weight GB/s", "gbps", "{:.0f}"), ("% of copy BW", "pct_copy", "{:.1f}%"),
                       ("XLA jnp µs", "xla_us", "{:.1f}"), ("vs XLA", "speedup", "{:.2f}x"),
                       ("kernel µs", "kernel_us", "{:.1f}"), ("dequant+dot µs", "dequant_dot_us", "{:.1f}"),
                       ("bf16 dot µs", "bf16_dot_us", "{:.1f}"), ("time / bf16 dot", "vs_bf16", "{:.3f}x")])
    return out


def _print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
    """A markdown table of ``rows``: op, variant and shape, then per column (header, key, format); a cell
    whose key a row lacks stays empty."""
    print("| op | variant | shape | " + " | ".join(c[0] for c in columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "" for _, key, fmt in columns]
        print(f"| {r['op']} | {r['variant']} | {r['shape']} | " + " | ".join(cells) + " |")


WEIGHT_ONLY_OPS = {"awq_gemm", "gptq_gemm"}

# ------------------------------------------------------------------------------------------ Marlin

# (b_q_type, K, N, activations): the GEMM shapes above for 4-bit, the 8-bit types on two of them, the small
# projections of a Llama-3-8B decode layer (q/o: K4096 N4096; k/v: K4096 N1024), and float16 on the largest
# shape, where the original Marlin kernel (float16 only) runs beside it.
MARLIN_CASES = [("uint4b8", k, n, "bfloat16") for k, n in WEIGHT_SHAPES] + [("uint4", 8192, 28672, "bfloat16")]
MARLIN_CASES += [(t, 8192, 28672, "bfloat16") for t in ("uint8b128", "float8_e4m3fn")]
MARLIN_CASES += [("uint4b8", 4096, 4096, "bfloat16"), ("uint4b8", 4096, 1024, "bfloat16")]
MARLIN_CASES += [("uint4b8", 8192, 28672, "float16")]
MARLIN_ROWS = (1, 16, 32, 64, 128, 256)
# The original Marlin (IST-DASLab) on the 4-bit shapes, timed by jaxq.bench_torch.
MARLIN_PEER_CASES = [("marlin-ist", m, k, n) for q, k, n, _ in MARLIN_CASES if q == "uint4b8" for m in MARLIN_ROWS]


def _marlin_weight(q_type: str, k: int, n: int, i: int, group_size: int = 128, dtype=jnp.bfloat16) -> tuple:
    """Random Marlin tensors (b_q_weight, b_scales, b_zeros): every bit pattern is a valid integer weight;
    fp8 codes keep clear of NaN (0x7f, 0xff)."""
    from jaxq.ops import marlin

    bits = marlin.SCALAR_TYPES[q_type][0]
    keys = jax.random.split(jax.random.key(30_000 + i), 3)
    q = jax.random.bits(keys[0], (k // 16, n * bits // 2), jnp.uint32)
    if q_type == "float8_e4m3fn":
        q = q & jnp.uint32(0xFEFEFEFE)
    scales = (jax.random.uniform(keys[1], (k // group_size, n), jnp.float32, 0.5, 1.5) * 1e-2).astype(dtype)
    if q_type == "float8_e4m3fn":
        scales = marlin.marlin_fp8_scales(scales, size_k=k, group_size=group_size)
    zeros = jax.random.bits(keys[2], (k // group_size, n // 8), jnp.uint32).view(jnp.int32) if q_type == "uint4" else None
    return q.view(jnp.int32), scales, zeros


def run_marlin(peer_times: dict, copy: float, rows: tuple = MARLIN_ROWS) -> list[dict]:
    """marlin_gemm per type and shape: its kernel's time and share of the copy bandwidth (weight bytes over
    time), against XLA's bf16 dot on a [N, K] weight, the original Marlin kernel (float16; `peer_times` from
    jaxq.bench_torch) and, for 4-bit, jaxq's gptq_gemm; at M >= 128 also its dequantize + dot path, to place
    the crossover; up to 8 rows also the kernel under batch_invariant(), what that mode costs."""
    from jaxq.ops import marlin

    out = []
    for q_type, k, n, dtype_name in MARLIN_CASES:
        dtype = jnp.dtype(dtype_name)
        bits = marlin.SCALAR_TYPES[q_type][0]
        groups = k // 128
        moved = k * n * bits // 8 + groups * n * 2 + (groups * n // 2 if q_type == "uint4" else 0)
        make_weight = functools.cache(
            lambda i, q_type=q_type, k=k, n=n, dtype=dtype: _marlin_weight(q_type, k, n, i, dtype=dtype))

        def ours(x, q, s, z, q_type=q_type):
            return jaxq.marlin_gemm(x, q, s, b_q_type=q_type, b_zeros=z)

        def kernel(*args):  # the kernel at every M: above its default rows only batch_invariant() runs it
            with marlin.batch_invariant(args[0].shape[0] > marlin.MARLIN_KERNEL_MAX_M):
                return ours(*args)

        def invariant(*args):
            with marlin.batch_invariant():
                return ours(*args)

        gptq = WeightCase("gptq", 4, k, n)
        for m in rows:
            def make_input(i, m=m, k=k, dtype=dtype):
                x = jax.random.normal(jax.random.key(i), (m, k), jnp.float32).astype(dtype)
                return (x, *make_weight(i))

            row = dict(op="marlin_gemm", variant=f"{q_type} G128 {dtype_name}", shape=f"M{m} K{k} N{n}")
            t = _time_per_call(kernel, make_input, moved)
            row.update(us=t * 1e6, pct_copy=100 * moved / t / copy, tflops=2 * m * k * n / t / 1e12)
            if m <= 8:
                row["invariant_us"] = _time_per_call(invariant, make_input, moved) * 1e6
            peer = peer_times.get(f"marlin-ist {m} {k} {n}") if q_type == "uint4b8" else None
            if peer:
                row.update(peer_us=peer * 1e6, vs_peer=peer / t)
            bf16 = _time_per_call(
                lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))),
                lambda i, m=m, k=k, n=n: (make_input(i)[0],
                                          jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16)), k * n * 2)
            row.update(bf16_dot_us=bf16 * 1e6, vs_bf16=bf16 / t)
            if bits == 4 and m <= 64 and dtype == jnp.bfloat16:
                g = _time_per_call(gptq.ours, lambda i, m=m, gptq=gptq: (make_input(i)[0], *gptq.make_weight(i)), moved)
                row.update(gptq_us=g * 1e6, vs_gptq=g / t)
            if m >= 128:
                # marlin_gemm's path above MARLIN_KERNEL_MAX_M rows: the dequantize kernel, then XLA's dot.
                row["dequant_dot_us"] = _time_per_call(
                    lambda x, q, s, z, q_type=q_type: marlin._product(x, marlin._marlin_dequantize(
                        q, s, *([z] if z is not None else []), b_q_type=q_type, has_zeros=z is not None,
                        has_g_idx=False, per_channel=False)[0], None), make_input, moved) * 1e6
            out.append(row)
            print(row, flush=True)
    _print_table(out, [("kernel µs", "us", "{:.1f}"), ("% of copy BW", "pct_copy", "{:.1f}%"),
                       ("TFLOP/s", "tflops", "{:.0f}"), ("bf16 dot µs", "bf16_dot_us", "{:.1f}"),
                       ("speed-up vs bf16 dot", "vs_bf16", "{:.2f}x"), ("gptq_gemm µs", "gptq_us", "{:.1f}"),
                       ("vs gptq_gemm", "vs_gptq", "{:.2f}x"), ("Marlin (IST, fp16) µs", "peer_us", "{:.1f}"),
                       ("vs Marlin", "vs_peer", "{:.2f}x"), ("dequant+dot µs", "dequant_dot_us", "{:.1f}"),
                       ("batch_invariant µs", "invariant_us", "{:.1f}")])
    return out


# ------------------------------------------------------------------------------- W8A8 scaled GEMMs

# (operand, M, K, N): the W8A8 targets' shapes. Weights are stored [N, K] and passed as w.T, as checkpoints keep them.
SCALED_MM_CASES = [("fp8", m, 8192, 28672) for m in (16, 128, 4096)]
# use_fast_accum (the tensor core's accumulator over all of K) changes the kernel above M = 64 only.
SCALED_MM_CASES += [("fp8-fast", m, 8192, 28672) for m in (128, 4096)]
SCALED_MM_CASES += [("int8", 4096, 4096, 14336), ("int8", 16, 8192, 28672), ("int8", 4096, 8192, 28672)]
# Block-wise 128x128 weight scales, 1x128 activation groups (DeepSeek-V3's projection shape).
SCALED_MM_CASES += [("fp8-block", m, 7168, 18432) for m in (16, 4096)]
SCALED_MM_OPS = {"cutlass_scaled_mm"}
_VARIANTS = {"fp8": "fp8 token x channel", "fp8-fast": "fp8 token x channel, use_fast_accum",
             "int8": "int8 token x channel", "fp8-block": "fp8 block 1x128 / 128x128"}


def _scaled_mm_inputs(kind, m, k, n, i):
    """a [M, K], the weight w [N, K] as stored, and scales: per-token / per-channel, or block-wise with the
    activation scales as a DeepGEMM-style quantizer writes them, [K/128, M] (pass its .T)."""
    keys = jax.random.split(jax.random.key(20_000 + i), 4)
    if kind == "fp8-fast":
        return _scaled_mm_inputs("fp8", m, k, n, i)
    if kind == "fp8-block":
        a, w, _, _ = _scaled_mm_inputs("fp8", m, k, n, i)
        sa_t = jax.random.uniform(keys[2], (k // 128, m), jnp.float32, 1e-3, 1e-2)
        sb = jax.random.uniform(keys[3], (k // 128, -(-n // 128)), jnp.float32, 1e-3, 1e-2)
        return a, w, sa_t, sb
    if kind == "fp8":
        a = (jax.random.normal(keys[0], (m, k)) * 4).astype(jnp.float8_e4m3fn)
        w = (jax.random.normal(keys[1], (n, k)) * 4).astype(jnp.float8_e4m3fn)
    else:
        a = jax.random.randint(keys[0], (m, k), -128, 128, jnp.int8)
        w = jax.random.randint(keys[1], (n, k), -128, 128, jnp.int8)
    sa = jax.random.uniform(keys[2], (m, 1), jnp.float32, 1e-3, 1e-2)
    sb = jax.random.uniform(keys[3], (1, n), jnp.float32, 1e-3, 1e-2)
    return a, w, sa, sb


def _xla_scaled_mm(a, w, sa, sb):
    """XLA's best recipe: the dot against the weight as stored [N, K] (cuBLASLt gets a column-major B and no
    transpose is inserted), fp32 / int32 accumulation, then the scales."""
    acc_type = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
    acc = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_type)
    return (sa * (sb * acc.astype(jnp.float32))).astype(jnp.bfloat16)


def _jaxq_scaled_mm(a, w, sa, sb, use_fast_accum=False):
    """What a user calls: the weight as stored [N, K] passed as w.T."""
    return jaxq.cutlass_scaled_mm(a, w.T, sa, sb, jnp.bfloat16, use_fast_accum=use_fast_accum)


def _jaxq_block_scaled_mm(a, w, sa_t, sb):
    return jaxq.cutlass_scaled_mm(a, w.T, sa_t.T, sb, jnp.bfloat16)


def _xla_block_scaled_mm(a, w, sa_t, sb):
    """Block-wise in plain XLA: both operands dequantized to bf16 with their block scales, then cuBLAS's bf16
    dot (a float32 sum of K-block partial products would be a [K/128, M, N] intermediate)."""
    (m, k), n = a.shape, w.shape[0]
    a_bf16 = (a.astype(jnp.float32).reshape(m, k // 128, 128) * sa_t.T[:, :, None]).astype(jnp.bfloat16)
    w_scales = jnp.repeat(sb.T, 128, axis=0)[:n]  # [N, K/128]
    w_bf16 = (w.astype(jnp.float32).reshape(n, k // 128, 128) * w_scales[:, :, None]).astype(jnp.bfloat16)
    return jax.lax.dot_general(a_bf16.reshape(m, k), w_bf16.reshape(n, k), (((1,), (1,)), ((), ())))


def _torch_peer(cases) -> dict:
    """torch's times from jaxq.bench_torch in a child process (run before JAX takes the GPU's memory)."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        print("torch peer unavailable: torch is not installed")
        return {}
    specs = [f"{kind}:{m}:{k}:{n}" for kind, m, k, n in cases if kind in ("fp8", "fp8-fast", "int8", "marlin-ist")]
    done = subprocess.run([sys.executable, "-m", "jaxq.bench_torch", *specs], capture_output=True, text=True)
    if done.returncode:
        print(f"torch peer unavailable: {done.stderr.strip().splitlines()[-1:]}")
        return {}
    if done.stderr.strip():
        print(done.stderr.strip())
    return json.loads(done.stdout.strip().splitlines()[-1])


def tensor_core_rates() -> dict:
    """Operations per second of the largest dense products XLA (cuBLASLt) runs, 8192^3, per operand type."""
    rates = {}
    for kind in ("fp8", "fp8-highest", "int8", "bf16"):
        size = 8192
        if kind == "bf16":
            make = lambda i: tuple(jax.random.normal(jax.random.key(i + j), (size, size), jnp.bfloat16) for j in (0, 1))
            fn = lambda a, b: jnp.dot(a, b)
        else:
            make = lambda i, kind=kind: _scaled_mm_inputs(kind.split("-")[0], size, size, size, i)[:2]
            acc = jnp.int32 if kind == "int8" else jnp.float32
            # precision=HIGHEST tells whether XLA's default fp8 dot uses cuBLASLt's fast accumulation.
            precision = jax.lax.Precision.HIGHEST if kind == "fp8-highest" else None
            fn = lambda a, w, acc=acc, precision=precision: jax.lax.dot_general(
                a, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=acc)
        rates[kind] = 2 * size**3 / _time_per_call(fn, make, size * size * 2)
    return rates


def run_scaled_mm(torch_times: dict, copy: float) -> list[dict]:
    """Per case: % of the measured tensor-core rate (the roofline at large M) and of the copy bandwidth
    (bytes of A, B and D; the roofline at decode sizes)."""
    rates = tensor_core_rates()
    print("measured tensor-core rates (XLA dot, 8192^3): " +
          ", ".join(f"{k} {v / 1e12:.0f} T/s" for k, v in rates.items()))
    out = []
    for kind, m, k, n in SCALED_MM_CASES:
        make = functools.cache(lambda i, kind=kind, m=m, k=k, n=n: _scaled_mm_inputs(kind, m, k, n, i))
        moved = m * k + n * k + 2 * m * n
        block = kind == "fp8-block"
        jaxq_fn = functools.partial(_jaxq_scaled_mm, use_fast_accum=kind == "fp8-fast")
        ours = _time_per_call(_jaxq_block_scaled_mm if block else jaxq_fn, make, moved)
        xla = _time_per_call(_xla_block_scaled_mm if block else _xla_scaled_mm, make, moved)
        ops = 2 * m * k * n
        row = dict(op="cutlass_scaled_mm", variant=f"{_VARIANTS[kind]}, bf16 out", shape=f"M{m} K{k} N{n}",
                   us=ours * 1e6, tops=ops / ours / 1e12, pct_rate=100 * ops / ours / rates[kind.split("-")[0]],
                   pct_copy=100 * moved / ours / copy, xla_us=xla * 1e6, vs_xla=xla / ours)
        peer = torch_times.get(f"{kind} {m} {k} {n}")
        if peer:
            row.update(torch_us=peer * 1e6, vs_torch=peer / ours)
        out.append(row)
        print(row, flush=True)
    _print_table(out, [("µs", "us", "{:.1f}"), ("T(FL)OP/s", "tops", "{:.0f}"), ("% of measured rate", "pct_rate", "{:.1f}%"),
                       ("% of copy BW", "pct_copy", "{:.1f}%"), ("XLA best µs", "xla_us", "{:.1f}"),
                       ("vs XLA", "vs_xla", "{:.2f}x"), ("torch µs", "torch_us", "{:.1f}"), ("vs torch", "vs_torch", "{:.2f}x")])
    return out


DECODER_LAYER_OPS = {"decoder_layer"}
DECODER_ROWS = (1, 16, 128, 2048)  # decode (one sequence, batches of 16 and 128) and a 2048-token prefill


# Layer variants beyond the schemes: the 4-bit schemes on backend="marlin".
DECODER_VARIANTS = {"awq marlin": ("awq", {"backend": "marlin"}), "gptq marlin": ("gptq", {"backend": "marlin"})}
# A peer JAX users already have: Google's qwix (PTQ of NNX models through XLA), its projections quantized
# (weight type, activation type or None for weight-only, weight tile along K). A bench-only optional dependency:
# its rows are skipped when qwix is not installed.
QWIX_VARIANTS = {"qwix int4 g128 weight-only": ("int4", None, 128), "qwix int8 (w8a8)": ("int8", "int8", None),
                 "qwix fp8 (w8a8)": ("float8_e4m3fn", "float8_e4m3fn", None)}


def decoder_layer_workload(scheme: str):
    """One Llama-3-8B decoder layer (random weights; attention and MLP) with its projections quantized by
    ``scheme`` (a ``jaxq.nn.SCHEMES`` key, a ``DECODER_VARIANTS`` or ``QWIX_VARIANTS`` key, or ``"bf16"`` for
    ``nnx.Linear``):
    ``(fn, make_input(m), weight bytes)`` with ``fn(x, state)`` on hidden states ``x [1, M, 4096]``."""
    from flax import nnx

    import jaxq.nn as qnn
    from jaxq.nn.llama import LLAMA3_8B, DecoderLayer

    layer = DecoderLayer(LLAMA3_8B, rngs=nnx.Rngs(0))
    if scheme in QWIX_VARIANTS:
        import qwix

        weight, activation, tile = QWIX_VARIANTS[scheme]
        rule = qwix.QuantizationRule(module_path=r".*_proj", weight_qtype=jnp.dtype(weight),
                                     act_qtype=None if activation is None else jnp.dtype(activation), tile_size=tile)
        sample = jnp.zeros((1, 1, LLAMA3_8B.hidden_size), jnp.bfloat16)
        layer = qwix.quantize_model(layer, qwix.PtqProvider([rule]), sample)
    elif scheme != "bf16":
        name, options = DECODER_VARIANTS.get(scheme, (scheme, {}))
        qnn.quantize(layer, name, **options)
    graphdef, state = nnx.split(layer)

    def make_input(m):
        def one(i):
            x = jax.random.normal(jax.random.key(i), (1, m, LLAMA3_8B.hidden_size), jnp.float32)
            return x.astype(jnp.bfloat16), state

        return one

    def stored_bytes(x):  # int4 arrays (qwix) hold half a byte per value, whatever nbytes says
        bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo(x.dtype).bits
        return x.size * bits // 8

    weights = sum(stored_bytes(x) for x in jax.tree.leaves(state))
    return (lambda x, state: nnx.merge(graphdef, state)(x)), make_input, weights


def run_decoder_layer(copy: float) -> list[dict]:
    """``decoder_layer_workload`` per scheme against the bf16 layer (XLA's dot), at ``DECODER_ROWS``."""
    import jaxq.nn as qnn

    out, bf16 = [], {}
    try:
        import qwix  # noqa: F401

        peers = tuple(QWIX_VARIANTS)
    except ImportError:
        print("qwix is not installed: its rows are skipped", flush=True)
        peers = ()
    for scheme in ("bf16", *qnn.SCHEMES, *DECODER_VARIANTS, *peers):
        fn, make_input, moved = decoder_layer_workload(scheme)
        for m in DECODER_ROWS:
            seconds = _time_per_call(fn, make_input(m), moved)
            row = dict(op="decoder_layer", variant=scheme, shape=f"M{m} (Llama-3-8B layer)", us=seconds * 1e6,
                       weight_mb=moved / 1e6, pct_copy=100 * moved / seconds / copy)
            if scheme == "bf16":
                bf16[m] = seconds
            row.update(bf16_us=bf16[m] * 1e6, speedup=bf16[m] / seconds)
            out.append(row)
            print(row, flush=True)
        del fn, make_input
    _print_table(out, [("µs", "us", "{:.1f}"), ("weights MB", "weight_mb", "{:.0f}"),
                       ("weights / time, % of copy BW", "pct_copy", "{:.1f}%"), ("bf16 layer µs", "bf16_us", "{:.1f}"),
                       ("vs bf16 (XLA dot)", "speedup", "{:.2f}x")])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--rows", default="16,4096,16384", help="comma-separated M values (activation ops)")
    parser.add_argument("--hidden", type=int, default=7168, help="K (activation ops)")
    parser.add_argument("--gemm-rows", default="1,16,4096", help="comma-separated M values (weight-only GEMMs)")
    parser.add_argument("--sweep", default="16,32,48,64,128", help="M values to time kernel vs dequantize + dot")
    parser.add_argument("--splits", default="", help="K splits to time awq_gemm's kernel with (tuning)")
    parser.add_argument("--marlin-rows", default=",".join(map(str, MARLIN_ROWS)), help="M values (marlin_gemm)")
    parser.add_argument("--quick", action="store_true", help="one small shape per op (smoke run)")
    args = parser.parse_args(argv)
    ops = {o.strip() for o in args.ops.split(",") if o.strip()} or None
    token_counts, hidden = ([256], 1024) if args.quick else ([int(m) for m in args.rows.split(",")], args.hidden)
    gemm_ops = WEIGHT_ONLY_OPS | SCALED_MM_OPS | DECODER_LAYER_OPS | {"marlin_gemm"}
    # torch's times first: its child process must find the GPU's memory before JAX takes it.
    peer_cases = list(SCALED_MM_CASES) if ops is None or ops & SCALED_MM_OPS else []
    marlin_rows = tuple(int(m) for m in args.marlin_rows.split(","))
    if ops is None or "marlin_gemm" in ops:
        peer_cases += [case for case in MARLIN_PEER_CASES if case[1] in marlin_rows]
    torch_times = _torch_peer(peer_cases) if not args.quick and peer_cases else {}
    if ops is None or ops - gemm_ops:
        run(ops - gemm_ops if ops else None, token_counts, hidden, args.quick)
    copy = None
    if not args.quick and (ops is None or ops & gemm_ops):
        copy = copy_bandwidth()
        print(f"copy bandwidth {copy / 1e9:.0f} GB/s (read + write)")
    if not args.quick and (ops is None or ops & WEIGHT_ONLY_OPS):
        run_weight_only(ops & WEIGHT_ONLY_OPS if ops else WEIGHT_ONLY_OPS, [int(m) for m in args.gemm_rows.split(",")],
                        [int(m) for m in args.sweep.split(",")], copy, [int(v) for v in args.splits.split(",") if v])
    if not args.quick and (ops is None or "marlin_gemm" in ops):
        run_marlin(torch_times, copy, marlin_rows)
    if not args.quick and (ops is None or ops & SCALED_MM_OPS):
        run_scaled_mm(torch_times, copy)
    if not args.quick and (ops is None or ops & DECODER_LAYER_OPS):
        run_decoder_layer(copy)


if __name__ == "__main__":
    main()
