"""Marlin: ``marlin_gemm`` (vLLM's ``gptq_marlin_gemm``) and the helpers that put checkpoints into its layout.

The Marlin layout (bit-exact with vLLM's ``gptq_marlin_repack`` / ``awq_marlin_repack``) stores a logical
weight ``W [K, N]`` of ``b``-bit codes (``b`` = 4 or 8) as int32 ``[K/16, N*16*b/32]``: row ``t`` holds the
16-row slab ``t`` of K, cut into ``N/64`` tiles of 16 x 64 codes, each tile ``512*b/32`` words. Inside a tile,
word ``lane*4 + warp`` (4-bit) or ``lane*8 + warp*2 + half`` (8-bit) holds the codes that lane ``lane`` of an
``mma.m16n8k16`` needs for the B operand of columns ``warp*16 .. warp*16+15``: rows ``2*(lane%4) + {0, 1, 8,
9}`` of columns ``warp*16 + lane//4`` and ``+8``, in the order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (4-bit) or
``[0, 2, 1, 3]`` per column (8-bit) so that two codes of a column land in one 16-bit lane pair.

Scales ``[groups, N]`` are permuted within every 64 columns (``marlin_permute_scales``): position ``8*i + j``
holds column ``i + 8*j``, so one lane reads its 8 columns' scales as one 16-byte vector; a single group
(``group_size`` -1 or K) uses vLLM's other permutation, per 32 columns. Zero points (``uint4`` type) are
permuted the same way, then interleaved per 8 and packed 8 per int32 along N (``marlin_zero_points``).

Scalar types (vLLM's names), with ``g`` the row's group:

* ``uint4b8``: ``W = (q - 8) * s[g]`` (GPTQ symmetric); ``uint8b128``: ``W = (q - 128) * s[g]``;
* ``uint4`` with ``b_zeros``: ``W = (q - z[g]) * s[g]`` (AWQ, asymmetric GPTQ);
* ``float8_e4m3fn``: ``W = fp8(q) * s[g] / 2**bias`` where ``b_scales`` carries vLLM's folded exponent bias
  (``bias`` = 120 for bfloat16, 8 for float16; :func:`marlin_fp8_scales` folds it), per-channel or group scales.
* ``float4_e2m1f`` (codes in the 4-bit layout; the scales' dtype names the format):
  NVFP4, ``W = e2m1(q) * s[g]`` with e4m3 scales per 16 rows, and the product times a global scale;
  ``b_scales`` holds vLLM's bytes (:func:`nvfp4_marlin_process_scales`: permuted, every 4 columns in the order
  0 2 1 3, each byte the top of float16 ``s * 2**7``). MXFP4, ``W = e2m1(q) * 2**(e[g] - 127)`` with e8m0
  exponents per 32 rows (:func:`mxfp4_marlin_process_scales`: permuted, then the same 0 2 1 3 order).

``W`` is rounded once to the activations' dtype (the kernel multiplies codes and scales in that dtype, as
vLLM's does; FP4 products are exact there) and the product is accumulated in float32. Act-order: ``perm`` reorders the columns of ``a``
(the repack applied it to the rows of ``W``) and ``g_idx`` gives the group of every row in that order.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats
from jaxq._op import Op, ShardingRule, map_batching
from jaxq.ops import _weight_only as wo

TILE_K, TILE_N = 16, 64
GROUP_SIZES = (-1, 32, 64, 128)
SCALAR_TYPES = {  # name -> (bits, subtracted bias or None, has zero points)
    "uint4b8": (4, 8, False),
    "uint4": (4, None, True),
    "uint8b128": (8, 128, False),
    "float8_e4m3fn": (8, None, False),
    "float4_e2m1f": (4, None, False),
}
# The kernel's forms of a weight: the scalar types, with FP4 split by its scales' type into NVFP4 (e4m3 scales
# per 16 rows and a global scale) and MXFP4 (e8m0 exponents per 32 rows). == jaxq::MarlinType in
# csrc/kernels/marlin.h
_TYPE_IDS = {"uint4b8": 0, "uint4": 1, "uint8b128": 2, "float8_e4m3fn": 3, "nvfp4": 4, "mxfp4": 5}
FP4_FORMS = {jnp.dtype(jnp.float8_e4m3fn): ("nvfp4", 16), jnp.dtype(jnp.float8_e8m0fnu): ("mxfp4", 32)}
FP8_EXPONENT_BIAS = {jnp.dtype(jnp.bfloat16): 120, jnp.dtype(jnp.float16): 8}
# e2m1's exponent bias under each 16-bit type (vLLM's nvfp4_marlin_process_global_scale folds it, less 7).
FP4_EXPONENT_BIAS = {jnp.dtype(jnp.bfloat16): 126, jnp.dtype(jnp.float16): 14}
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _form(b_q_type: str, scales_dtype) -> str:
    """The kernel's form of a weight of ``b_q_type`` with scales of ``scales_dtype``."""
    if b_q_type != "float4_e2m1f":
        return b_q_type
    return FP4_FORMS[jnp.dtype(scales_dtype)][0] if jnp.dtype(scales_dtype) in FP4_FORMS else "nvfp4"


def _bits(form: str) -> int:
    return 4 if form in ("nvfp4", "mxfp4") else SCALAR_TYPES[form][0]

# Rows of ``a`` up to which marlin_gemm runs its kernel, by the weight's size (K * N at least the first entry);
# above, the dequantize kernel + XLA's dot. Measured on the H200 (benchmarks/RESULTS.md, 2026-12-03; uint4b8 G128,
# bf16; kernel against dequantize + dot, µs): K8192 N28672 M32 112 vs 272, M64 199 vs 269, M96 347 vs 271;
# K28672 N8192 M64 262 vs 270; K4096 N14336 M32 54 vs 76, M64 109 vs 79; K4096 N4096 M32 29 vs 20; K4096 N1024
# M32 16 vs 9. The 8-bit, fp8 and FP4 weights cross where the 4-bit ones do.
_KERNEL_ROWS_BY_WEIGHT = ((1 << 27, 64), (1 << 25, 32), (0, 16))
MARLIN_KERNEL_MAX_M = 64  # no weight runs the kernel above this many rows (outside batch_invariant())


def kernel_max_rows(k: int, n: int) -> int:
    """The most rows of ``a`` with which ``marlin_gemm`` runs its decode (mma.sync) kernel on a ``[k, n]``
    weight."""
    rows = next(rows for weights, rows in _KERNEL_ROWS_BY_WEIGHT if k * n >= weights)
    return min(rows, MARLIN_KERNEL_MAX_M)


# From HOPPER_FIRST_ROWS to HOPPER_MAX_ROWS rows, a Hopper GPU runs the wgmma kernel where it takes the weight
# (hopper_kernel_takes): its blocks hold 16, 32, 64 or 128 rows (the fewest that hold M), and a weight with few
# 128-column blocks splits K over a cluster, so every weight fills the GPU. Up to 16 rows the decode kernel
# streams large weights faster (small ones not: HOPPER_SMALL_WEIGHT below); past 256 rows dequantize + XLA's dot
# catches up. The 8-bit, fp8 and FP4 weights take the 4-bit weights' rows until they are timed.
# Measured (benchmarks/RESULTS.md, uint4b8 G128 bf16, µs): on the H100 (2026-12-07, tools/weight_only_ab), wgmma
# against the decode kernel, K8192 N28672 M16 98 vs 74, M32 106 vs 113, M64 135 vs 199; K28672 N8192 M16 148 vs
# 83; K4096 N4096 M16 13 vs 19; on the H200 (2026-12-03, 128-row blocks without K splits) against dequantize +
# dot, K8192 N28672 M256 291 vs 339, M512 512 vs 494.
HOPPER_FIRST_ROWS = 17
HOPPER_MAX_ROWS = 256
# Weights of fewer than 2**26 elements with 4-bit integer codes (a 7B-class model's attention and down projections,
# and tensor-parallel shards) run it from 9 rows, past the decode kernel's folded rows: its K split fills the GPU
# where the decode kernel's plans leave SMs short. Measured on the H100 (2026-12-08, tools/weight_only_ab, uint4b8
# G128 bf16, M16, µs), wgmma against the decode kernel: K4096 N14336 27.9 vs 34.1, K4096 N4096 11.8 vs 19.1, K4096
# N1024 8.5 vs 11.5; above it, K8192 N28672 94.0 vs 72.9 and K28672 N8192 109.1 vs 82.6 (K4096 N28672, 2**26.8,
# not timed). The 8-bit, fp8 and FP4 weights keep the rule above: the wgmma kernel streams them slower (K8192
# N28672 M16: uint8b128 180 vs 101 µs fp16, NVFP4 108 vs 96).
HOPPER_SMALL_WEIGHT = 1 << 26
HOPPER_SMALL_WEIGHT_FIRST_ROWS = 9
_HOPPER_SMALL_WEIGHT_FORMS = ("uint4b8", "uint4")
_HOPPER_FORMS = ("uint4b8", "uint4", "uint8b128", "float8_e4m3fn", "nvfp4", "mxfp4")
_hopper_limits = contextvars.ContextVar("jaxq_hopper_limits", default=None)


@contextlib.contextmanager
def hopper_limits(first_rows: int, max_rows: int):
    """Within this context (at trace time), the wgmma kernel runs from ``first_rows`` up to ``max_rows`` rows
    on the weights it takes, instead of :func:`hopper_first_rows` and :data:`HOPPER_MAX_ROWS`: for measuring
    where it wins (``jaxq.bench``) and for testing every row count (tests, compute-sanitizer)."""
    if first_rows < 1 or max_rows < first_rows:
        raise ValueError(f"hopper_limits: need 1 <= first_rows <= max_rows; got {first_rows} and {max_rows}")
    token = _hopper_limits.set((int(first_rows), int(max_rows)))
    try:
        yield
    finally:
        _hopper_limits.reset(token)


@functools.lru_cache(maxsize=None)
def _hopper_gpu() -> bool:
    """Whether JAX's default device is an sm_90 GPU (the wgmma kernel's)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def hopper_first_rows(k: int, n: int, own_kernel_rows: int | None = None, form: str | None = None) -> int:
    """The fewest rows of ``a`` with which ``marlin_gemm`` runs the Hopper kernel on a ``[k, n]`` weight of
    type ``form`` (a ``b_q_type`` as marlin_gemm names it: ``uint4b8``, ``nvfp4``, ...) that it takes (up to
    :func:`hopper_max_rows`): :data:`HOPPER_SMALL_WEIGHT_FIRST_ROWS` for a 4-bit integer weight of fewer than
    :data:`HOPPER_SMALL_WEIGHT` elements, else :data:`HOPPER_FIRST_ROWS`, or past :func:`kernel_max_rows` where
    the decode kernel stops sooner; for a caller with a kernel of its own (``gptq_gemm``), past its
    ``own_kernel_rows``."""
    limits = _hopper_limits.get()
    if limits:
        return limits[0]
    if own_kernel_rows is not None:
        return own_kernel_rows + 1
    if form in _HOPPER_SMALL_WEIGHT_FORMS and k * n < HOPPER_SMALL_WEIGHT:
        return HOPPER_SMALL_WEIGHT_FIRST_ROWS
    return min(HOPPER_FIRST_ROWS, kernel_max_rows(k, n) + 1)


def hopper_rows_past_own_kernel(m: int, k: int, n: int, groups: int, own_kernel_rows: int) -> int:
    """For ``gptq_gemm`` and ``awq_gemm``, whose 4-bit weights the Hopper kernel reads as they hold them and which
    run a kernel of their own up to ``own_kernel_rows`` rows: the first row from which a call of ``m`` rows on a
    ``[k, n]`` weight of ``groups`` groups runs the Hopper kernel (the handler dispatches by rows), or 0 where it
    does not (``m`` past :func:`hopper_max_rows`, a weight it does not take, not an sm_90 GPU)."""
    if m > hopper_max_rows() or not hopper_kernel_takes("uint4", False, k, n, groups):
        return 0
    return hopper_first_rows(k, n, own_kernel_rows)


def hopper_max_rows() -> int:
    """The most rows of ``a`` with which ``marlin_gemm`` runs the Hopper kernel: :data:`HOPPER_MAX_ROWS`
    (outside :func:`hopper_limits`)."""
    limits = _hopper_limits.get()
    return limits[1] if limits else HOPPER_MAX_ROWS


def hopper_kernel_takes(form: str, act_order: bool, k: int, n: int, groups: int) -> bool:
    """Whether the Hopper (wgmma) kernel takes this weight: every form (``uint4b8``, ``uint4``, ``uint8b128``,
    ``float8_e4m3fn``, ``nvfp4``, ``mxfp4``) without act-order, N a multiple of 128, K of 64, groups of 32 rows or
    more (or one; FP4: its format's), on an sm_90 GPU."""
    whole_groups = form in ("nvfp4", "mxfp4") or groups == 1 or (k % groups == 0 and (k // groups) % 32 == 0)
    return form in _HOPPER_FORMS and not act_order and n % 128 == 0 and k % 64 == 0 and whole_groups and _hopper_gpu()


_batch_invariant = contextvars.ContextVar("jaxq_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Within this context (at trace time), ``marlin_gemm`` runs one kernel form for every M, so that a row's
    result is bit-identical whatever batch it is computed in (vLLM's batch-invariant mode). It costs speed at
    both ends: up to 8 rows the faster form (group scales folded in float32) is not used, and above
    :func:`kernel_max_rows` rows the kernel reads the weight once per 64 rows, where dequantize + dot would be
    faster (benchmarks/RESULTS.md has the figures)."""
    token = _batch_invariant.set(bool(enabled))
    try:
        yield
    finally:
        _batch_invariant.reset(token)


# ------------------------------------------------------------------------------------------ layouts


@functools.cache
def _tile_positions(bits: int) -> np.ndarray:
    """For each (word, slot) of one 16 x 64 tile, flattened, the tile position ``row * 64 + col`` it holds."""
    offsets = (0, 1, 8, 9)
    per_word = 32 // bits
    order = (0, 2, 4, 6, 1, 3, 5, 7) if bits == 4 else (0, 2, 1, 3)
    positions = np.empty(TILE_K * TILE_N, np.int64)
    for lane in range(32):
        for warp in range(4):
            for half in range(1 if bits == 4 else 2):
                word = lane * 4 + warp if bits == 4 else lane * 8 + warp * 2 + half
                for slot in range(per_word):
                    value = order[slot] + 4 * half  # vLLM's vals[] index: rows offsets[v % 4], column +8 if v >= 4
                    row = 2 * (lane % 4) + offsets[value % 4]
                    col = warp * 16 + lane // 4 + 8 * (value // 4)
                    positions[word * per_word + slot] = row * TILE_N + col
    return positions


def _check_tiles(fn: str, size_k: int, size_n: int):
    if size_k <= 0 or size_k % TILE_K:
        raise ValueError(f"{fn}: size_k={size_k} must be a positive multiple of {TILE_K} (the Marlin tile)")
    if size_n <= 0 or size_n % TILE_N:
        raise ValueError(f"{fn}: size_n={size_n} must be a positive multiple of {TILE_N} (the Marlin tile)")


def marlin_pack(values, bits: int) -> jax.Array:
    """Codes ``[K, N]`` (0 .. 2**bits - 1) -> the Marlin layout, int32 ``[K/16, N*16*bits/32]``."""
    v = formats._u32(values)
    k, n = v.shape
    _check_tiles("marlin_pack", k, n)
    per_word = 32 // bits
    tiles = v.reshape(k // TILE_K, TILE_K, n // TILE_N, TILE_N).transpose(0, 2, 1, 3).reshape(k // TILE_K, n // TILE_N, -1)
    slots = tiles[..., _tile_positions(bits)].reshape(k // TILE_K, n // TILE_N, -1, per_word)
    shifts = (bits * jnp.arange(per_word, dtype=jnp.uint32))
    words = jnp.sum((slots & ((1 << bits) - 1)) << shifts, axis=-1, dtype=jnp.uint32)
    return formats._i32(words.reshape(k // TILE_K, -1))


def marlin_unpack(packed, bits: int) -> jax.Array:
    """Inverse of :func:`marlin_pack`: int32 ``[K/16, N*16*bits/32]`` -> int32 codes ``[K, N]``."""
    w = formats._u32(packed)
    per_word = 32 // bits
    k_tiles, n = w.shape[0], w.shape[1] * per_word // TILE_K
    slots = (w[..., None] >> (bits * jnp.arange(per_word, dtype=jnp.uint32))) & ((1 << bits) - 1)
    slots = slots.reshape(k_tiles, n // TILE_N, TILE_K * TILE_N)
    tiles = slots[..., np.argsort(_tile_positions(bits))]
    q = tiles.reshape(k_tiles, n // TILE_N, TILE_K, TILE_N).transpose(0, 2, 1, 3).reshape(k_tiles * TILE_K, n)
    return q.astype(jnp.int32)


def _check_num_bits(fn: str, num_bits: int):
    if num_bits not in (4, 8):
        raise ValueError(f"{fn}: num_bits must be 4 or 8; got {num_bits!r}")


def gptq_marlin_repack(b_q_weight, perm, *, size_k: int, size_n: int, num_bits: int) -> jax.Array:
    """A GPTQ ``qweight`` (int32 ``[K*bits/32, N]``, packed along K) in the Marlin layout (vLLM's
    ``gptq_marlin_repack``): int32 ``[K/16, N*16*bits/32]``. ``perm`` (int32 ``[K]``, act-order:
    ``argsort(g_idx)``) or an empty array: row ``i`` of the result's logical weight is row ``perm[i]``."""
    fn = "gptq_marlin_repack"
    _check_num_bits(fn, num_bits)
    _check_tiles(fn, size_k, size_n)
    wo.check_int32(fn, "b_q_weight", b_q_weight, 2)
    wo.check_int32(fn, "perm", perm, 1)
    if tuple(b_q_weight.shape) != (size_k * num_bits // 32, size_n):
        raise ValueError(f"{fn}: b_q_weight must have shape {(size_k * num_bits // 32, size_n)} for size_k={size_k}, "
                         f"size_n={size_n}, num_bits={num_bits}; got {tuple(b_q_weight.shape)}")
    if perm.shape[0] not in (0, size_k):
        raise ValueError(f"{fn}: perm must have size_k={size_k} entries or none; got {perm.shape[0]}")
    q = formats.unpack_gptq(b_q_weight, num_bits, axis=0)
    if perm.shape[0]:
        q = jnp.take(q, perm, axis=0, mode="clip")
    return marlin_pack(q, num_bits)


def _unpack_awq_columns(packed, num_bits: int) -> jax.Array:
    """AWQ's column packing (8 nibbles per word in order 0 2 4 6 1 3 5 7; 4 bytes in order 0 2 1 3)."""
    if num_bits == 4:
        return formats.unpack_awq(packed)
    order = np.array([0, 2, 1, 3])
    w = formats._u32(packed)
    slots = (w[..., None] >> (8 * jnp.arange(4, dtype=jnp.uint32))) & 0xFF
    return slots[..., np.argsort(order)].reshape(*w.shape[:-1], w.shape[-1] * 4).astype(jnp.int32)


def awq_marlin_repack(b_q_weight, *, size_k: int, size_n: int, num_bits: int) -> jax.Array:
    """An AutoAWQ ``qweight`` (int32 ``[K, N*bits/32]``, packed along N in AWQ's interleaved order) in the
    Marlin layout (vLLM's ``awq_marlin_repack``): int32 ``[K/16, N*16*bits/32]``."""
    fn = "awq_marlin_repack"
    _check_num_bits(fn, num_bits)
    _check_tiles(fn, size_k, size_n)
    wo.check_int32(fn, "b_q_weight", b_q_weight, 2)
    if tuple(b_q_weight.shape) != (size_k, size_n * num_bits // 32):
        raise ValueError(f"{fn}: b_q_weight must have shape {(size_k, size_n * num_bits // 32)}; "
                         f"got {tuple(b_q_weight.shape)}")
    return marlin_pack(_unpack_awq_columns(b_q_weight, num_bits), num_bits)


@functools.cache
def _scale_perms() -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``get_scale_perms``: position ``p`` of a permuted chunk holds column ``perm[p]``."""
    grouped = np.array([i + 8 * j for i in range(8) for j in range(8)])
    single = np.array([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])
    return grouped, single


def _permute_columns(s, single: bool, inverse: bool = False):
    perm = _scale_perms()[1 if single else 0]
    if inverse:
        perm = np.argsort(perm)
    return s.reshape(-1, perm.size)[:, perm].reshape(s.shape)


def marlin_permute_scales(s, *, size_k: int, size_n: int, group_size: int) -> jax.Array:
    """Scales ``[groups, N]`` in the order the Marlin kernel reads them (vLLM's ``marlin_permute_scales``)."""
    if s.ndim != 2 or s.shape[1] != size_n or size_n % TILE_N:
        raise ValueError(f"marlin_permute_scales: s must be [groups, size_n={size_n}] with size_n a multiple of "
                         f"{TILE_N}; got {tuple(s.shape)}")
    return _permute_columns(jnp.asarray(s), single=not (group_size != -1 and group_size < size_k))


def marlin_unpermute_scales(s, *, size_k: int, group_size: int) -> jax.Array:
    """Inverse of :func:`marlin_permute_scales`: scales ``[groups, N]`` in natural column order."""
    if s.ndim != 2 or s.shape[1] % TILE_N:
        raise ValueError(f"marlin_unpermute_scales: s must be [groups, N] with N a multiple of {TILE_N}; "
                         f"got {tuple(s.shape)}")
    return _permute_columns(jnp.asarray(s), single=not (group_size != -1 and group_size < size_k), inverse=True)


def _pack_columns(values, num_bits: int) -> jax.Array:
    """vLLM's ``pack_cols``: column ``c`` at bits ``num_bits * (c % per_word)`` of word ``c // per_word``."""
    per_word = 32 // num_bits
    v = formats._u32(values)
    v = v.reshape(v.shape[0], -1, per_word) & ((1 << num_bits) - 1)
    return formats._i32(jnp.sum(v << (num_bits * jnp.arange(per_word, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32))


def _unpack_columns(packed, num_bits: int) -> jax.Array:
    per_word = 32 // num_bits
    w = formats._u32(packed)
    v = (w[..., None] >> (num_bits * jnp.arange(per_word, dtype=jnp.uint32))) & ((1 << num_bits) - 1)
    return v.reshape(w.shape[0], -1).astype(jnp.int32)


def _zero_interleave(num_bits: int) -> np.ndarray:
    return np.array([0, 2, 4, 6, 1, 3, 5, 7] if num_bits == 4 else [0, 2, 1, 3])


def marlin_zero_points(zp, *, size_k: int, size_n: int, num_bits: int) -> jax.Array:
    """Zero points ``[groups, N]`` (integers) packed as the kernel reads them, int32 ``[groups, N*bits/32]``
    (vLLM's ``marlin_zero_points``; ``size_k`` is the number of groups there)."""
    fn = "marlin_zero_points"
    _check_num_bits(fn, num_bits)
    if zp.ndim != 2 or tuple(zp.shape) != (size_k, size_n) or size_n % TILE_N:
        raise ValueError(f"{fn}: zp must have shape {(size_k, size_n)} with size_n a multiple of {TILE_N}; "
                         f"got {tuple(zp.shape)}")
    z = _permute_columns(formats._u32(zp), single=False)
    interleave = _zero_interleave(num_bits)
    z = z.reshape(-1, interleave.size)[:, interleave].reshape(size_k, size_n)
    return _pack_columns(z, num_bits)


def marlin_unpack_zero_points(packed, num_bits: int) -> jax.Array:
    """Inverse of :func:`marlin_zero_points`: int32 ``[groups, N]`` zero points."""
    z = _unpack_columns(packed, num_bits)
    interleave = _zero_interleave(num_bits)
    z = z.reshape(-1, interleave.size)[:, np.argsort(interleave)].reshape(z.shape)
    return _permute_columns(z, single=False, inverse=True)


def awq_to_marlin_zero_points(q_zp_packed, *, size_k: int, size_n: int, num_bits: int) -> jax.Array:
    """AutoAWQ ``qzeros`` (int32 ``[groups, N*bits/32]``, AWQ's interleaved order) in the kernel's layout
    (vLLM's ``awq_to_marlin_zero_points``; ``size_k`` is the number of groups)."""
    fn = "awq_to_marlin_zero_points"
    _check_num_bits(fn, num_bits)
    wo.check_int32(fn, "q_zp_packed", q_zp_packed, 2)
    if tuple(q_zp_packed.shape) != (size_k, size_n * num_bits // 32):
        raise ValueError(f"{fn}: q_zp_packed must have shape {(size_k, size_n * num_bits // 32)}; "
                         f"got {tuple(q_zp_packed.shape)}")
    return marlin_zero_points(_unpack_awq_columns(q_zp_packed, num_bits), size_k=size_k, size_n=size_n,
                              num_bits=num_bits)


def marlin_fp8_repack(weight) -> jax.Array:
    """An fp8 e4m3fn weight ``[K, N]`` in the Marlin layout (vLLM's ``pack_fp8_to_int32`` then
    ``gptq_marlin_repack`` with 8 bits). A checkpoint's ``[N, K]`` weight is passed as ``weight.T``."""
    if getattr(weight, "dtype", None) != jnp.float8_e4m3fn or weight.ndim != 2:
        raise TypeError(f"marlin_fp8_repack: weight must be a 2-d float8_e4m3fn array; got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    return marlin_pack(jax.lax.bitcast_convert_type(weight, jnp.uint8), 8)


def marlin_fp8_scales(scales, *, size_k: int, group_size: int) -> jax.Array:
    """fp8 weight scales ``[groups, N]`` (float16/bfloat16; one row for per-channel) as vLLM hands them to the
    kernel: permuted, times ``2**bias`` (its dequantization skips the exponent-bias correction)."""
    s = jnp.asarray(scales)
    if s.dtype not in FP8_EXPONENT_BIAS:
        raise TypeError(f"marlin_fp8_scales: scales must be float16 or bfloat16; got {s.dtype}")
    permuted = marlin_permute_scales(s, size_k=size_k, size_n=s.shape[-1], group_size=group_size)
    return (permuted.astype(jnp.float32) * 2.0 ** FP8_EXPONENT_BIAS[s.dtype]).astype(s.dtype)


def marlin_fp4_repack(weight) -> jax.Array:
    """An FP4 checkpoint weight (uint8 ``[N, K/2]``, two e2m1 codes per byte, the even column of K in the low
    nibble, as NVFP4 and MXFP4 checkpoints store it) in the Marlin layout, int32 ``[K/16, N*2]`` (vLLM's
    ``gptq_marlin_repack`` of ``weight.view(int32).T``)."""
    fn = "marlin_fp4_repack"
    if getattr(weight, "dtype", None) != jnp.uint8 or weight.ndim != 2:
        raise TypeError(f"{fn}: weight must be a 2-d uint8 array [N, K/2]; got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    n, k = weight.shape[0], 2 * weight.shape[1]
    _check_tiles(fn, k, n)
    w = jnp.asarray(weight)
    codes = jnp.stack([w & 0xF, w >> 4], axis=-1).reshape(n, k)
    return marlin_pack(codes.T, 4)


def _fp4_column_order(s):
    """vLLM's order of FP4 scales within every 4 columns (0 2 1 3: its own inverse), after the permutation."""
    return s.reshape(-1, 4)[:, np.array([0, 2, 1, 3])].reshape(s.shape)


def _check_16bit(fn: str, name: str, x):
    if not hasattr(x, "dtype") or jnp.dtype(x.dtype) not in FP4_EXPONENT_BIAS:
        raise TypeError(f"{fn}: {name} must be float16 or bfloat16; got {getattr(x, 'dtype', type(x).__name__)}")


def nvfp4_marlin_process_scales(marlin_scales) -> jax.Array:
    """NVFP4 scales ``[groups, N]`` (e4m3 values, non-negative, in a 16-bit dtype, from
    :func:`marlin_permute_scales`) as vLLM's ``nvfp4_marlin_process_scales`` hands them to the kernel:
    float8_e4m3fn-typed bytes, every 4 columns in the order 0 2 1 3, each byte bits 14..7 of float16
    ``s * 2**7`` (5 exponent and 3 mantissa bits, no sign)."""
    _check_16bit("nvfp4_marlin_process_scales", "marlin_scales", marlin_scales)
    s = _fp4_column_order(jnp.asarray(marlin_scales).astype(jnp.float16))
    bits = jax.lax.bitcast_convert_type(s * jnp.float16(2.0**7), jnp.uint16)
    return jax.lax.bitcast_convert_type(((bits >> 7) & 0xFF).astype(jnp.uint8), jnp.float8_e4m3fn)


def mxfp4_marlin_process_scales(marlin_scales) -> jax.Array:
    """MXFP4 scales ``[groups, N]`` (powers of two in bfloat16, from :func:`marlin_permute_scales`) as vLLM's
    ``mxfp4_marlin_process_scales`` hands them to the kernel: float8_e8m0fnu, every 4 columns in the order 0 2 1 3."""
    _check_16bit("mxfp4_marlin_process_scales", "marlin_scales", marlin_scales)
    return _fp4_column_order(jnp.asarray(marlin_scales)).astype(jnp.float8_e8m0fnu)


def nvfp4_marlin_process_global_scale(global_scale) -> jax.Array:
    """An NVFP4 global scale (``weight_scale_2``, in the activations' 16-bit dtype) times
    ``2**(bias - 7)``, ``bias`` e2m1's exponent bias under that dtype (126 bfloat16, 14 float16), as vLLM's
    ``nvfp4_marlin_process_global_scale`` hands it to the kernel."""
    _check_16bit("nvfp4_marlin_process_global_scale", "global_scale", global_scale)
    g = jnp.asarray(global_scale)
    return g * jnp.asarray(2.0 ** (FP4_EXPONENT_BIAS[jnp.dtype(g.dtype)] - 7), g.dtype)


def marlin_fp4_scale_values(b_scales) -> jax.Array:
    """Processed FP4 scales (:func:`nvfp4_marlin_process_scales`, :func:`mxfp4_marlin_process_scales`) back as
    float32 values ``[groups, N]`` in natural column order: the inverse of their preparation."""
    if getattr(b_scales, "dtype", None) not in FP4_FORMS or b_scales.ndim != 2 or b_scales.shape[1] % TILE_N:
        raise TypeError(f"marlin_fp4_scale_values: b_scales must be float8_e4m3fn or float8_e8m0fnu [groups, N], N "
                        f"a multiple of {TILE_N}; got {getattr(b_scales, 'dtype', type(b_scales).__name__)}")
    form = FP4_FORMS[jnp.dtype(b_scales.dtype)][0]
    return _permute_columns(_fp4_scales(b_scales, form), single=False, inverse=True)


def marlin_fp4_weight(weight, weight_scale, weight_scale_2=None, *, dtype=jnp.bfloat16):
    """An NVFP4 or MXFP4 checkpoint weight in marlin_gemm's operands, as vLLM's ``prepare_fp4_layer_for_marlin``
    makes them: ``(b_q_weight, b_scales, global_scale)``.

    Args:
      weight: uint8 ``[N, K/2]`` packed e2m1 codes.
      weight_scale: NVFP4: float8_e4m3fn ``[N, K/16]``; MXFP4: uint8 or float8_e8m0fnu ``[N, K/32]`` exponents.
      weight_scale_2: NVFP4's float32 global scale (``[]`` or ``[1]``); None for MXFP4.
      dtype: the activations' dtype (MXFP4: bfloat16 only).
    Returns the repacked weight, the processed scales and (NVFP4) the processed global scale in ``dtype``.
    """
    fn = "marlin_fp4_weight"
    dtype = jnp.dtype(dtype)
    if dtype not in FP4_EXPONENT_BIAS:
        raise TypeError(f"{fn}: dtype must be float16 or bfloat16; got {dtype}")
    b_q_weight = marlin_fp4_repack(weight)
    n, k = weight.shape[0], 2 * weight.shape[1]
    scale = jnp.asarray(weight_scale)
    nvfp4 = weight_scale_2 is not None
    if nvfp4 != (scale.dtype == jnp.float8_e4m3fn):
        raise TypeError(f"{fn}: NVFP4 has float8_e4m3fn weight_scale and a weight_scale_2, MXFP4 uint8 or "
                        f"float8_e8m0fnu weight_scale and none; got {scale.dtype} and "
                        f"{'a' if nvfp4 else 'no'} weight_scale_2")
    group_size = 16 if nvfp4 else 32
    if scale.shape != (n, k // group_size) or k % group_size:
        raise ValueError(f"{fn}: weight_scale must have shape {(n, k // group_size)} for weight "
                         f"{tuple(weight.shape)} (one scale per {group_size} rows of K); got {tuple(scale.shape)}")
    if not nvfp4:
        if dtype != jnp.bfloat16:
            raise TypeError(f"{fn}: MXFP4 weights take bfloat16 activations; got {dtype}")
        if scale.dtype == jnp.uint8:
            scale = jax.lax.bitcast_convert_type(scale, jnp.float8_e8m0fnu)
    permuted = marlin_permute_scales(scale.T.astype(dtype), size_k=k, size_n=n, group_size=group_size)
    if not nvfp4:
        return b_q_weight, mxfp4_marlin_process_scales(permuted), None
    global_scale = jnp.asarray(weight_scale_2, jnp.float32).reshape(1).astype(dtype)
    return b_q_weight, nvfp4_marlin_process_scales(permuted), nvfp4_marlin_process_global_scale(global_scale)


# ---------------------------------------------------------------------------------------- reference


def _fp4_scales(b_scales, form: str) -> jax.Array:
    """FP4 scales as float32 values, columns still permuted (the 0 2 1 3 order undone)."""
    if form == "nvfp4":
        bits = jax.lax.bitcast_convert_type(b_scales, jnp.uint8).astype(jnp.uint16) << 7
        values = jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32) * 2.0**-7
    else:
        values = b_scales.astype(jnp.float32)
    return _fp4_column_order(values)


def marlin_dequantize(b_q_weight, b_scales, b_zeros=None, g_idx=None, *, b_q_type: str, size_k: int,
                      per_channel: bool | None = None, dtype=None):
    """``W [K, N]`` from Marlin tensors, rows in the kernel's (``perm``) order, in ``dtype`` (default: the
    scales'; FP4 needs it): the reference ``marlin_gemm`` multiplies by (an NVFP4 weight without its global
    scale). ``g_idx`` (act-order) is clamped to the scales' groups. ``per_channel``: whether the scales are in
    the one-group (per-channel) column order; None: when they hold one group. A row-parallel shard of a
    grouped weight may hold one group and keeps the grouped order."""
    form = _form(b_q_type, b_scales.dtype)
    dtype = jnp.dtype(b_scales.dtype if dtype is None else dtype)
    q = marlin_unpack(b_q_weight, _bits(form))
    groups = b_scales.shape[0]
    per_channel = groups == 1 if per_channel is None else per_channel
    if g_idx is not None:
        rows = jnp.clip(g_idx, 0, groups - 1)
    else:
        rows = jnp.arange(size_k) // (size_k // groups)
    if form in ("nvfp4", "mxfp4"):
        scales = _permute_columns(_fp4_scales(b_scales, form), single=per_channel, inverse=True)
        values = jnp.asarray(E2M1_VALUES)[q]
        return (values * scales[rows]).astype(dtype)
    bits, bias, _ = SCALAR_TYPES[form]
    scales = _permute_columns(b_scales, single=per_channel, inverse=True).astype(jnp.float32)
    if form == "float8_e4m3fn":
        values = jax.lax.bitcast_convert_type(q.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
        # Unfold the bias from the scales, not the codes: codes times 2**-120 are float32 denormals, which XLA
        # may flush to zero.
        scales = scales * 2.0 ** -FP8_EXPONENT_BIAS[jnp.dtype(b_scales.dtype)]
    elif b_zeros is not None and jnp.issubdtype(b_zeros.dtype, jnp.floating):
        # HQQ's float zero points (is_zp_float), as vLLM's kernel applies them: q * s - z * s, z * s rounded to
        # the scales' type and the rest rounded once (a fused multiply-add). In float32, q * s and z * s are
        # exact; their difference is too unless |z * s| < 2**-14 |q * s| (a zero point far below one code step).
        zeros = _permute_columns(b_zeros, single=per_channel, inverse=True).astype(jnp.float32)
        zero_scaled = (zeros * scales).astype(b_scales.dtype).astype(jnp.float32)
        return (q.astype(jnp.float32) * scales[rows] - zero_scaled[rows]).astype(dtype)
    elif b_zeros is not None:
        values = (q - marlin_unpack_zero_points(b_zeros, bits)[rows]).astype(jnp.float32)
    else:
        values = (q - bias).astype(jnp.float32)
    return (values * scales[rows]).astype(dtype)


def _has_global_scale(b_q_type: str) -> bool:
    return b_q_type == "nvfp4"


def _unpack_operands(args, b_q_type, has_zeros, has_g_idx, has_bias):
    """marlin_gemm's operands: a, b_q_weight, b_scales, then b_zeros, g_idx, global_scale (float32 [1], the
    true global scale) and b_bias where present."""
    a, b_q_weight, b_scales, *rest = args
    zeros = rest.pop(0) if has_zeros else None
    g_idx = rest.pop(0) if has_g_idx else None
    global_scale = rest.pop(0) if _has_global_scale(b_q_type) else None
    bias = rest.pop(0) if has_bias else None
    return a, b_q_weight, b_scales, zeros, g_idx, global_scale, bias


def _product(a, w, bias, global_scale=None):
    out = jnp.dot(a, w, preferred_element_type=jnp.float32)
    if global_scale is not None:
        out = out * global_scale[0]
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(a.dtype)


def _reference(*args, b_q_type, has_zeros, has_g_idx, has_bias, per_channel, batch_invariant, hopper_from_rows):
    a, b_q_weight, b_scales, zeros, g_idx, global_scale, bias = _unpack_operands(args, b_q_type, has_zeros,
                                                                                 has_g_idx, has_bias)
    w = marlin_dequantize(b_q_weight, b_scales, zeros, g_idx, b_q_type=b_q_type, size_k=a.shape[1],
                          per_channel=per_channel, dtype=a.dtype)
    return (_product(a, w, bias, global_scale),)


def _shapes(a, b_q_weight, b_scales, *rest, **params):
    return (jax.ShapeDtypeStruct((a.shape[0], b_scales.shape[1]), a.dtype),)


def _weight_factors(params, k, groups):
    """Factors of the weight operands (b_q_weight, b_scales, then b_zeros and g_idx when present), of K and N,
    and the sizes of the minor ones: N splits in whole 64-column tiles, K in whole groups. With act-order or
    one group, every shard of K needs all scales: they are not split."""
    bits = _bits(params["b_q_type"])
    n_dims = ("nt", "c64")
    if groups > 1 and not params["has_g_idx"]:
        k_dims, kt_dims, g_dims = ("kg", "gt", "r16"), ("kg", "gt"), ("kg",)
        sizes = {"gt": k // groups // TILE_K}
    else:
        k_dims, kt_dims, g_dims = ("kt", "r16"), ("kt",), ("sg",)
        sizes = {}
    operands = [(kt_dims, ("nt", "tw")), (g_dims, n_dims)]
    if params["has_zeros"]:
        operands.append((g_dims, ("nt", "z8")))
    if params["has_g_idx"]:
        operands.append((k_dims,))
    sizes.update({"r16": TILE_K, "c64": TILE_N, "tw": TILE_K * TILE_N * bits // 32, "z8": 8})
    return operands, k_dims, n_dims, sizes


def _sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    """The weight's factors (``_weight_factors``); K shards add partial sums (psum); rows split freely."""
    a_shape, _, s_shape = operand_shapes[:3]
    weight, k_dims, n_dims, sizes = _weight_factors(params, a_shape[1], s_shape[0])
    operands = [(("m",), k_dims), *weight]
    operands += [(("gs",),)] if _has_global_scale(params["b_q_type"]) else []
    operands += [(n_dims,)] if params["has_bias"] else []
    return ShardingRule(operands=tuple(operands), results=((("m",), n_dims),), factor_sizes=sizes,
                        reduction_factors=("kg", "kt"), replicated_factors=("sg", "gs"))


def _dequantize_sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    q_shape, s_shape = operand_shapes[:2]
    weight, k_dims, n_dims, sizes = _weight_factors(params, q_shape[0] * TILE_K, s_shape[0])
    return ShardingRule(operands=tuple(weight), results=((k_dims, n_dims),), factor_sizes=sizes,
                        replicated_factors=("sg",))


def _dequantize_reference(b_q_weight, b_scales, *rest, b_q_type, has_zeros, has_g_idx, per_channel, dtype):
    zeros = rest[0] if has_zeros else None
    g_idx = rest[int(has_zeros)] if has_g_idx else None
    return (marlin_dequantize(b_q_weight, b_scales, zeros, g_idx, b_q_type=b_q_type,
                              size_k=b_q_weight.shape[0] * TILE_K, per_channel=per_channel, dtype=dtype),)


# W [K, N] of a Marlin weight in `dtype` (an NVFP4 weight without its global scale), as the GEMM kernel
# multiplies by it from 9 rows: marlin_gemm's path above the kernel's rows.
_marlin_dequantize = Op(
    "marlin_dequantize",
    shapes=lambda b_q_weight, b_scales, *rest, dtype, **params: (
        jax.ShapeDtypeStruct((b_q_weight.shape[0] * TILE_K, b_scales.shape[1]), jnp.dtype(dtype)),),
    reference=_dequantize_reference,
    sharding_rule=_dequantize_sharding_rule,
    ffi_target="jaxq_marlin_dequantize",
    ffi_attributes=lambda b_q_type, has_zeros, has_g_idx, per_channel, dtype: dict(
        b_q_type=np.int32(_TYPE_IDS[b_q_type]), has_zeros=bool(has_zeros), has_g_idx=bool(has_g_idx),
        per_channel=bool(per_channel)),
    batching_rule=map_batching,
    operand_names=("b_q_weight", "b_scales", "b_zeros", "g_idx"),
)


def _dequantize_weight(weight, dtype, *, b_q_type, has_zeros, has_g_idx, per_channel):
    """W of marlin_gemm's weight operands (b_q_weight, b_scales, then b_zeros and g_idx where present)."""
    return _marlin_dequantize(*weight, b_q_type=b_q_type, has_zeros=has_zeros, has_g_idx=has_g_idx,
                              per_channel=per_channel, dtype=jnp.dtype(dtype).name)[0]


def _vjp(args, cotangents, *, b_q_type, has_zeros, has_g_idx, has_bias, per_channel, batch_invariant,
         hopper_from_rows):
    a, b_q_weight, b_scales, zeros, g_idx, global_scale, bias = _unpack_operands(args, b_q_type, has_zeros,
                                                                                 has_g_idx, has_bias)
    (dy,) = cotangents
    weight = [b_q_weight, b_scales] + [x for x in (zeros, g_idx) if x is not None]
    w = _dequantize_weight(weight, a.dtype, b_q_type=b_q_type, has_zeros=has_zeros, has_g_idx=has_g_idx,
                           per_channel=per_channel)
    if global_scale is not None:
        da = (jnp.dot(dy.astype(a.dtype), w.T, preferred_element_type=jnp.float32) * global_scale[0]).astype(a.dtype)
    else:
        da = wo.dot_f32(dy.astype(a.dtype), w.T)
    return (da,) + (None,) * (len(args) - 1)


_marlin_gemm = Op(
    "marlin_gemm",
    shapes=_shapes,
    reference=_reference,
    sharding_rule=_sharding_rule,
    ffi_target="jaxq_marlin_gemm",
    ffi_attributes=lambda b_q_type, has_zeros, has_g_idx, has_bias, per_channel, batch_invariant,
    hopper_from_rows: dict(
        b_q_type=np.int32(_TYPE_IDS[b_q_type]), has_zeros=bool(has_zeros), has_g_idx=bool(has_g_idx),
        has_bias=bool(has_bias), per_channel=bool(per_channel), batch_invariant=bool(batch_invariant),
        hopper_from_rows=np.int64(hopper_from_rows)),
    batching_rule=wo.gemm_batching,
    vjp=_vjp,
    operand_names=("a", "b_q_weight", "b_scales", "b_zeros", "g_idx", "global_scale", "b_bias"),
    grad_operands=(0,),
    once_operands=lambda b_q_type, has_zeros, has_g_idx, has_bias, **_: (
        (3 + has_zeros + has_g_idx + _has_global_scale(b_q_type),) if has_bias else ()),
)


def _check_array(fn, name, x, dtypes, rank):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{fn}: {name} must be an array; got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        raise TypeError(f"{fn}: {name} must be {' or '.join(jnp.dtype(d).name for d in dtypes)}; "
                        f"got {jnp.dtype(x.dtype).name}")
    if x.ndim != rank:
        raise ValueError(f"{fn}: {name} must have rank {rank}; got shape {tuple(x.shape)}")


def _empty(x) -> bool:
    return x is None or (hasattr(x, "shape") and x.size == 0)


def permute_columns(a, perm) -> jax.Array:
    """``a[..., perm]``: the activations of an act-order weight, whose row ``i`` is input row ``perm[i]``."""
    # The barrier keeps XLA:CPU from fusing the gather into the dot, whose bf16 x bf16 -> f32 form it cannot run
    # then (jaxlib 0.10); on GPU the gather is its own kernel either way.
    return jax.lax.optimization_barrier(jnp.take(a, perm, axis=-1, mode="clip"))


def marlin_gemm(a, b_q_weight, b_scales, *, b_q_type: str, b_zeros=None, g_idx=None, perm=None, b_bias=None,
                global_scale=None, is_k_full: bool = True, use_fp32_reduce: bool = True,
                is_zp_float: bool = False) -> jax.Array:
    """``a @ W (+ b_bias)`` for a weight in the Marlin layout, in ``a``'s dtype (vLLM's ``gptq_marlin_gemm``,
    functional: no ``c``, ``workspace`` or sizes).

    Args:
      a: float16 or bfloat16 ``[..., K]``.
      b_q_weight: int32 ``[K/16, N*16*bits/32]`` from :func:`gptq_marlin_repack`, :func:`awq_marlin_repack`,
        :func:`marlin_fp8_repack` or :func:`marlin_fp4_repack`.
      b_scales: ``[groups, N]``. Integer and fp8 weights: in ``a``'s dtype, from :func:`marlin_permute_scales`
        (fp8: from :func:`marlin_fp8_scales`); one group: per-channel; else groups of 32, 64 or 128 rows (any
        number of groups with act-order, as a row-parallel shard keeps all of them). FP4 weights: NVFP4,
        float8_e4m3fn from :func:`nvfp4_marlin_process_scales`, one per 16 rows; MXFP4, float8_e8m0fnu from
        :func:`mxfp4_marlin_process_scales`, one per 32 rows (:func:`marlin_fp4_weight` makes both).
      b_q_type: ``"uint4b8"``, ``"uint4"`` (needs ``b_zeros``), ``"uint8b128"``, ``"float8_e4m3fn"`` or
        ``"float4_e2m1f"``.
      b_zeros: int32 ``[groups, N/8]`` from :func:`marlin_zero_points` / :func:`awq_to_marlin_zero_points`
        (with ``is_zp_float``: float ``[groups, N]`` from :func:`marlin_permute_scales`).
      g_idx, perm: act-order (integer weights): int32 ``[K]`` each, ``perm = argsort(checkpoint g_idx)``
        (applied by the repack) and ``g_idx`` the checkpoint's groups in that order (``g_idx[perm]``). Both or
        neither.
      b_bias: ``[N]`` in ``a``'s dtype, natural column order (vLLM permutes its bias; jaxq does not).
      global_scale: NVFP4 only, ``[]`` or ``[1]``: in ``a``'s dtype, vLLM's operand (from
        :func:`nvfp4_marlin_process_global_scale`, which folds an exponent bias in); or float32, the global scale
        itself (not rounded to ``a``'s dtype). The float32 sums are multiplied by the global scale before the
        bias is added and the output rounded.
      is_k_full: False for a row-parallel shard of an act-order layer. jaxq's kernel reads every row's group
        from ``g_idx`` either way, so this only relaxes the check that ``g_idx`` covers this shard's K.
      use_fp32_reduce: accepted for vLLM's signature; partial sums are always added in float32.
      is_zp_float: ``b_zeros`` are float zero points in ``a``'s dtype, ``[groups, N]`` permuted as the scales
        (HQQ, ``uint4`` only, no act-order): ``W = q * s - round(z * s)`` as vLLM's kernel computes it. This form
        runs through XLA on every platform (W dequantized in jnp, then XLA's dot): jaxq's kernels read integer
        zero points only. Differentiable with respect to ``a``, ``b_scales`` and ``b_zeros``.

    Returns ``[..., N]`` in ``a``'s dtype. Up to ``kernel_max_rows(K, N)`` rows (16 for a weight under 2**25
    elements, 32 under 2**27, else 64: where the kernel beats dequantize + dot on the H200) and for all rows
    inside :func:`batch_invariant`, the CUDA kernel runs, deterministic, in two numerical forms: up to 8 rows
    of an integer or fp8 weight without act-order it multiplies the integer codes (fp8 values) unscaled and
    applies each group's scales and zero points to the float32 sums; otherwise (from 9 rows, always for FP4
    and act-order, and inside :func:`batch_invariant`) it multiplies W rounded to ``a``'s dtype, as the
    reference does. Within each form a row's output is bit-identical in any batch (rows 1-8 share one,
    9-``kernel_max_rows`` the other; FP4 has one for all): every row is summed in the same order whatever M is
    (the K split depends on K, N and the GPU only). On an sm_90 GPU, from :func:`hopper_first_rows` (17; 9 for
    ``uint4b8`` and ``uint4`` weights of fewer than 2**26 elements, whose rows 9-256 then share one form) to
    :data:`HOPPER_MAX_ROWS` rows, weights the wgmma kernel takes (:func:`hopper_kernel_takes`: every type without
    act-order) run it instead: W rounded to ``a``'s dtype on Hopper's tensor cores with float32 sums,
    its K split (if any) a function of K, N and the GPU only, so a row's output is bit-identical in any batch of
    that range too, whichever of its 16- to 128-row blocks runs it (a tensor-parallel shard it does not take,
    e.g. N not a multiple of 128, runs the decode kernel's second form there). Elsewhere above
    ``kernel_max_rows``, W is dequantized once (a CUDA kernel, bit-identical to the W
    the second form multiplies by) and multiplied by XLA's dot, whose summation order is XLA's choice for each
    M. Differentiable with respect to ``a`` only (``is_zp_float``: also ``b_scales`` and ``b_zeros``).
    """
    fn = "marlin_gemm"
    if b_q_type not in SCALAR_TYPES:
        raise ValueError(f"{fn}: b_q_type must be one of {sorted(SCALAR_TYPES)}; got {b_q_type!r}")
    if is_zp_float and b_q_type != "uint4":
        raise ValueError(f"{fn}: is_zp_float (HQQ's float zero points) goes with b_q_type 'uint4'; got {b_q_type!r}")
    bits, _, needs_zeros = SCALAR_TYPES[b_q_type]
    if not hasattr(a, "dtype") or jnp.dtype(a.dtype) not in wo.ACTIVATION_DTYPES:
        raise TypeError(f"{fn}: a must be a float16 or bfloat16 array; got {getattr(a, 'dtype', type(a).__name__)}")
    _check_array(fn, "b_q_weight", b_q_weight, [jnp.int32], 2)
    fp4 = b_q_type == "float4_e2m1f"
    if fp4:
        _check_array(fn, "b_scales", b_scales, list(FP4_FORMS), 2)
    else:
        _check_array(fn, "b_scales", b_scales, [a.dtype], 2)
    form = _form(b_q_type, b_scales.dtype)
    k = b_q_weight.shape[0] * TILE_K
    if a.ndim < 1 or a.shape[-1] != k:
        raise ValueError(f"{fn}: a {tuple(a.shape)} must end in K={k} (b_q_weight has {b_q_weight.shape[0]} "
                         f"16-row tiles)")
    if (b_q_weight.shape[1] * 32) % (TILE_K * bits) or (b_q_weight.shape[1] * 32 // (TILE_K * bits)) % TILE_N:
        raise ValueError(f"{fn}: b_q_weight {tuple(b_q_weight.shape)} is not a Marlin layout of {bits}-bit codes "
                         f"(N must be a multiple of {TILE_N})")
    n = b_q_weight.shape[1] * 32 // (TILE_K * bits)
    groups = b_scales.shape[0]
    if b_scales.shape[1] != n or groups < 1:
        raise ValueError(f"{fn}: b_scales must be [groups, N={n}]; got {tuple(b_scales.shape)}")
    act_order = not _empty(g_idx)
    if act_order != (not _empty(perm)):
        raise ValueError(f"{fn}: act-order needs both g_idx and perm (or neither); got "
                         f"g_idx {None if g_idx is None else tuple(g_idx.shape)}, "
                         f"perm {None if perm is None else tuple(perm.shape)}")
    if fp4:
        _check_fp4(fn, a, b_scales, global_scale, act_order, form, k)
    elif global_scale is not None:
        raise ValueError(f"{fn}: global_scale goes with NVFP4 weights (b_q_type 'float4_e2m1f'); got {b_q_type!r}")
    if act_order:
        _check_array(fn, "g_idx", g_idx, [jnp.int32], 1)
        _check_array(fn, "perm", perm, [jnp.int32], 1)
        if g_idx.shape[0] != k or perm.shape[0] != k:
            raise ValueError(f"{fn}: g_idx and perm must have K={k} entries; got {g_idx.shape[0]} and {perm.shape[0]}")
        if is_k_full and k % groups:
            raise ValueError(f"{fn}: {groups} groups do not divide K={k} (is_k_full=True)")
    elif groups > 1 and not fp4:
        if k % groups or k // groups not in GROUP_SIZES:
            raise ValueError(f"{fn}: the group size K/groups = {k}/{groups} must be one of "
                             f"{[g for g in GROUP_SIZES if g > 0]} (or one group: per-channel)")
    if needs_zeros != (not _empty(b_zeros)):
        raise ValueError(f"{fn}: b_q_type {b_q_type!r} " + ("needs b_zeros" if needs_zeros else "takes no b_zeros"))
    if needs_zeros and is_zp_float:
        _check_array(fn, "b_zeros", b_zeros, [a.dtype], 2)
        if tuple(b_zeros.shape) != (groups, n):
            raise ValueError(f"{fn}: float b_zeros (is_zp_float) must be [groups, N] = {(groups, n)}, permuted as "
                             f"the scales; got {tuple(b_zeros.shape)}")
        if act_order:
            raise ValueError(f"{fn}: is_zp_float takes no act-order (g_idx, perm), as vLLM's kernel")
    elif needs_zeros:
        _check_array(fn, "b_zeros", b_zeros, [jnp.int32], 2)
        if tuple(b_zeros.shape) != (groups, n * bits // 32):
            raise ValueError(f"{fn}: b_zeros must have shape {(groups, n * bits // 32)}; got {tuple(b_zeros.shape)}")
    if b_bias is not None:
        _check_array(fn, "b_bias", b_bias, [a.dtype], 1)
        if b_bias.shape[0] != n:
            raise ValueError(f"{fn}: b_bias must have N={n} entries; got {b_bias.shape[0]}")

    rows = a.reshape(-1, k)
    if is_zp_float:  # XLA's path on every platform: jaxq's kernels read integer zero points only
        w = marlin_dequantize(b_q_weight, b_scales, b_zeros, b_q_type="uint4", size_k=k, per_channel=groups == 1,
                              dtype=a.dtype)
        return _product(rows, w, b_bias).reshape(*a.shape[:-1], n)
    if act_order:
        rows = permute_columns(rows, perm)
    weight = [b_q_weight, b_scales] + ([b_zeros] if needs_zeros else []) + ([g_idx] if act_order else [])
    # The kernel takes the true global scale; vLLM's operand carries e2m1's exponent bias (less 7).
    true_global_scale = []
    if form == "nvfp4":
        unbias = 1.0 if global_scale.dtype == jnp.float32 else 2.0 ** (7 - FP4_EXPONENT_BIAS[a.dtype])
        true_global_scale = [global_scale.reshape(1).astype(jnp.float32) * unbias]
    # Which scale order the layout uses is fixed here, on the whole weight: a shard may hold one group.
    per_channel = groups == 1 and not fp4
    params = dict(b_q_type=form, has_zeros=needs_zeros, has_g_idx=act_order)
    m = rows.shape[0]
    hopper_from_rows = 0  # the kernel runs the Hopper kernel from this many rows (0: not for this call)
    if (not _batch_invariant.get() and hopper_kernel_takes(form, act_order, k, n, groups)
            and m <= hopper_max_rows()):
        hopper_from_rows = hopper_first_rows(k, n, form=form)
    if use_kernel(m, k, n) or (hopper_from_rows and hopper_from_rows <= m):
        out = _marlin_gemm(rows, *weight, *true_global_scale, *([b_bias] if b_bias is not None else []), **params,
                           has_bias=b_bias is not None, per_channel=per_channel,
                           batch_invariant=_batch_invariant.get(), hopper_from_rows=hopper_from_rows)[0]
    else:
        w = _dequantize_weight(weight, a.dtype, **params, per_channel=per_channel)
        out = _product(rows, w, b_bias, *true_global_scale)
    return out.reshape(*a.shape[:-1], n)


def _check_fp4(fn, a, b_scales, global_scale, act_order, form, k):
    """What an FP4 weight needs beyond the common checks: its format's group size, at least two groups (vLLM's
    grouped scale order), no act-order, and NVFP4's global scale."""
    group_size = FP4_FORMS[jnp.dtype(b_scales.dtype)][1]
    if act_order:
        raise ValueError(f"{fn}: FP4 weights take no act-order (g_idx, perm)")
    if k % group_size or b_scales.shape[0] != k // group_size or k < 2 * group_size:
        raise ValueError(f"{fn}: {form.upper()} b_scales must hold one scale per {group_size} rows of K={k} "
                         f"(K a multiple of {group_size}, at least {2 * group_size}); got {b_scales.shape[0]} groups")
    if form == "mxfp4":
        if a.dtype != jnp.bfloat16:
            raise TypeError(f"{fn}: MXFP4 weights take bfloat16 activations; got a {jnp.dtype(a.dtype).name}")
        if global_scale is not None:
            raise ValueError(f"{fn}: global_scale goes with NVFP4 weights (float8_e4m3fn b_scales), not MXFP4")
        return
    if global_scale is None:
        raise ValueError(f"{fn}: NVFP4 weights need global_scale (from nvfp4_marlin_process_global_scale)")
    _check_array(fn, "global_scale", global_scale, [a.dtype, jnp.float32],
                 global_scale.ndim if hasattr(global_scale, "ndim") else 0)
    if global_scale.size != 1 or global_scale.ndim > 1:
        raise ValueError(f"{fn}: global_scale must have shape () or (1,); got {tuple(global_scale.shape)}")


def use_kernel(m: int, k: int, n: int) -> bool:
    """Whether ``marlin_gemm`` of ``m`` rows on a ``[k, n]`` weight runs the kernel (else dequantize + XLA's
    dot)."""
    return m <= kernel_max_rows(k, n) or _batch_invariant.get()
