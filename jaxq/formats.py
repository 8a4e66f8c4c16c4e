"""Packed integer weight formats that vLLM loads, and helpers to make and read them (jnp; NumPy arrays in).

AutoAWQ "GEMM" format (``awq_gemm``, ``awq_dequantize``):

* ``qweight`` int32 ``[K, N/8]``: nibble ``i`` (bits ``4i..4i+3``) of word ``(k, c)`` holds column
  ``8c + AWQ_ORDER[i]`` of row ``k``, ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``;
* ``qzeros`` int32 ``[K/G, N/8]``, packed the same way; ``scales`` float16/bfloat16 ``[K/G, N]``;
* ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.

AutoGPTQ format (``gptq_gemm``), ``b`` bits in {2, 3, 4, 8}:

* ``qweight`` int32 ``[K*b/32, N]``: along K the values of a column form a little-endian bit stream, value
  ``k`` at bit ``k*b`` (3-bit values straddle words: 32 values per 3 words);
* ``qzeros`` int32 ``[groups, N*b/32]``: the same stream along N; ``scales`` ``[groups, N]``;
* ``g_idx`` int32 ``[K]``: the group of each input row (``k // G`` unless the checkpoint uses act-order);
* v1 checkpoints ("zero minus one", ``use_v2_format=False``) store ``zero - 1``: the zero used is the
  stored value plus one, without wrapping (as vLLM's kernels do); v2 stores the zero itself;
* ``W[k, n] = (q[k, n] - zero[g_idx[k], n]) * s[g_idx[k], n]``.

Exllama layout (``gptq_shuffle`` output, ``gptq_gemm(..., use_exllama=True)``): rows optionally reordered
by a permutation, and the values inside each word (each 3 words for 3-bit) interleaved so that even and
odd values sit in the low and high half-words (8-bit words are unchanged).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8
GPTQ_BITS = (2, 3, 4, 8)


def _u32(a) -> jax.Array:
    a = jnp.asarray(a)
    return jax.lax.bitcast_convert_type(a, jnp.uint32) if a.dtype == jnp.int32 else a.astype(jnp.uint32)


def _i32(a) -> jax.Array:
    return jax.lax.bitcast_convert_type(a.astype(jnp.uint32), jnp.int32)


# ----------------------------------------------------------------------------------------------- AWQ


def pack_awq(values) -> jax.Array:
    """``[R, N]`` integers in 0..15 -> int32 ``[R, N/8]`` in AutoAWQ's interleaved nibble order."""
    v = _u32(values)
    r, n = v.shape
    if n % 8:
        raise ValueError(f"pack_awq: the last dimension ({n}) must be a multiple of 8")
    v = v.reshape(r, n // 8, 8)[..., jnp.array(AWQ_ORDER)]
    return _i32(jnp.sum((v & 0xF) << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32))


def unpack_awq(packed) -> jax.Array:
    """int32 ``[R, N/8]`` AutoAWQ words -> int32 ``[R, N]`` values in 0..15 (inverse of :func:`pack_awq`)."""
    w = _u32(packed)
    nibbles = (w[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 0xF
    columns = nibbles[..., jnp.array(np.argsort(AWQ_ORDER))]
    return columns.reshape(*w.shape[:-1], w.shape[-1] * 8).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- GPTQ


def _check_bits(bits: int, fn: str):
    if bits not in GPTQ_BITS:
        raise ValueError(f"{fn}: bits must be one of {GPTQ_BITS}; got {bits}")


def pack_gptq(values, bits: int, axis: int = 0) -> jax.Array:
    """Packs integers in ``0 .. 2**bits - 1`` along ``axis`` into GPTQ's little-endian bit stream of int32
    words (value ``i`` at bit ``i*bits``): ``qweight`` uses ``axis=0`` (along K), ``qzeros`` ``axis=1``
    (along N). The packed axis must hold a multiple of ``32 / gcd(32, bits)`` values."""
    _check_bits(bits, "pack_gptq")
    v = jnp.moveaxis(_u32(values), axis, -1)
    per = 32 // math.gcd(32, bits)  # values per whole number of words
    if v.shape[-1] % per:
        raise ValueError(f"pack_gptq: {v.shape[-1]} values along axis {axis} is not a multiple of {per}")
    words_per = per * bits // 32
    v = (v & ((1 << bits) - 1)).reshape(*v.shape[:-1], v.shape[-1] // per, per)
    offsets = np.arange(per) * bits
    words = []
    for w in range(words_per):
        word = jnp.zeros(v.shape[:-1], jnp.uint32)
        for i in range(per):
            shift = int(offsets[i]) - 32 * w
            if -bits < shift < 32:  # value i has bits in word w
                word |= (v[..., i] << shift) if shift >= 0 else (v[..., i] >> -shift)
        words.append(word)
    packed = jnp.stack(words, axis=-1).reshape(*v.shape[:-2], v.shape[-2] * words_per)
    return jnp.moveaxis(_i32(packed), -1, axis)


def unpack_gptq(packed, bits: int, axis: int = 0) -> jax.Array:
    """Inverse of :func:`pack_gptq`: int32 words -> int32 values along ``axis``."""
    _check_bits(bits, "unpack_gptq")
    w = jnp.moveaxis(_u32(packed), axis, -1)
    per = 32 // math.gcd(32, bits)
    words_per = per * bits // 32
    if w.shape[-1] % words_per:
        raise ValueError(f"unpack_gptq: {w.shape[-1]} words along axis {axis} is not a multiple of {words_per}")
    w = w.reshape(*w.shape[:-1], w.shape[-1] // words_per, words_per)
    # A 64-bit window per value: the word holding its first bit and the next one.
    lo = w
    hi = jnp.concatenate([w[..., 1:], jnp.zeros_like(w[..., :1])], axis=-1)
    values = []
    for i in range(per):
        word, shift = divmod(i * bits, 32)
        v = lo[..., word] >> shift
        if shift + bits > 32:
            v |= hi[..., word] << (32 - shift)
        values.append(v & ((1 << bits) - 1))
    out = jnp.stack(values, axis=-1).reshape(*w.shape[:-2], w.shape[-2] * per)
    return jnp.moveaxis(out.astype(jnp.int32), -1, axis)


def _exllama_positions(bits: int) -> list[list[tuple[int, int]]]:
    """For each of the 32 values of a 32*bits-bit block, the (word, bit) of each of its bits in the
    exllama-shuffled layout (the block's words are consecutive rows of one column)."""
    if bits == 8:
        return [[(i // 4, 8 * (i % 4) + j) for j in range(8)] for i in range(32)]
    if bits in (2, 4):
        per = 32 // bits  # values per word; even ones in the low half-word, odd ones in the high
        return [[(i // per, 16 * (i % 2) + bits * ((i % per) // 2) + j) for j in range(bits)] for i in range(32)]
    positions = []
    for i in range(30):  # 3-bit: ten values per word, five per half-word
        word, r = divmod(i, 10)
        positions.append([(word, 16 * (r % 2) + 3 * (r // 2) + j) for j in range(3)])
    # Values 30 and 31 spread their three bits over bit 15 (value 30) or 31 (value 31) of the three words.
    positions += [[(j, 15) for j in range(3)], [(j, 31) for j in range(3)]]
    return positions


def _sources(bits: int, positions) -> tuple[np.ndarray, np.ndarray]:
    """For each word and bit of a packed block, the value and the bit of it stored there: ``[bits, 32]`` each."""
    value, value_bit = np.zeros((bits, 32), np.int32), np.zeros((bits, 32), np.uint32)
    for i, bit_positions in enumerate(positions):
        for j, (word, bit) in enumerate(bit_positions):
            value[word, bit], value_bit[word, bit] = i, j
    return value, value_bit


# One gather, shift and sum per call (not a loop of single-bit operations) keeps XLA's programs small:
# the bits of a word are disjoint, so their sum is their OR.
def _pack_positions(values: jax.Array, bits: int, positions) -> jax.Array:
    """values ``[B, 32, N]`` -> words ``[B, bits, N]`` with value bits placed at ``positions``."""
    value, value_bit = _sources(bits, positions)
    picked = (values[:, value] >> value_bit[None, :, :, None]) & 1  # [B, bits, 32, N]
    return jnp.sum(picked << np.arange(32, dtype=np.uint32)[None, None, :, None], axis=2, dtype=jnp.uint32)


def _unpack_positions(words: jax.Array, bits: int, positions) -> jax.Array:
    """Inverse of :func:`_pack_positions`: words ``[B, bits, N]`` -> values ``[B, 32, N]``."""
    word = np.array([[w for w, _ in p] for p in positions])  # [32, bits]
    bit = np.array([[b for _, b in p] for p in positions], np.uint32)
    picked = (words[:, word] >> bit[None, :, :, None]) & 1  # [B, 32, bits, N]
    return jnp.sum(picked << np.arange(bits, dtype=np.uint32)[None, None, :, None], axis=2, dtype=jnp.uint32)


def exllama_unshuffle(qweight, bits: int) -> jax.Array:
    """Values of exllama-shuffled words back in GPTQ's order (the inverse of :func:`jaxq.gptq_shuffle`
    without a permutation)."""
    _check_bits(bits, "exllama_unshuffle")
    w = _u32(qweight)
    blocks = w.reshape(w.shape[0] // bits, bits, w.shape[1])
    values = _unpack_positions(blocks, bits, _exllama_positions(bits)).reshape(-1, w.shape[1])
    return pack_gptq(values, bits, axis=0)


def exllama_shuffle(values, bits: int) -> jax.Array:
    """``[K, N]`` values (K a multiple of 32) -> exllama-shuffled int32 ``[K*bits/32, N]``."""
    v = _u32(values)
    blocks = v.reshape(v.shape[0] // 32, 32, v.shape[1])
    return _i32(_pack_positions(blocks, bits, _exllama_positions(bits)).reshape(-1, v.shape[1]))


# ------------------------------------------------------------------------------------ RTN quantizers


def rtn_quantize(w, bits: int, group_size: int, *, symmetric: bool = False, g_idx=None, min_zero: int = 0):
    """Round-to-nearest quantization of a float weight ``[K, N]`` per group of input rows.

    Returns ``(q, scales, zeros)``: int32 ``q [K, N]`` in ``0 .. 2**bits - 1``, ``scales [groups, N]`` in
    ``w``'s dtype and int32 ``zeros [groups, N]``, with ``w ~= (q - zeros[g]) * scales[g]`` for ``g`` the
    row's group: ``k // group_size``, or ``g_idx[k]`` when given (act-order). ``group_size=-1`` means one
    group of all K rows. Asymmetric (AWQ-style) by default, zeros clipped to ``min_zero .. 2**bits - 1``;
    ``symmetric`` fixes the zero at ``2**(bits-1)``.
    """
    w = jnp.asarray(w)
    k, n = w.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"rtn_quantize: group_size {group_size} does not divide K={k}")
    groups = k // g
    rows = jnp.arange(k) // g if g_idx is None else jnp.asarray(g_idx)
    wf = w.astype(jnp.float32)
    if g_idx is None:  # contiguous groups
        w_max, w_min = wf.reshape(groups, g, n).max(axis=1), wf.reshape(groups, g, n).min(axis=1)
    else:
        one_hot = rows[None, :] == jnp.arange(groups)[:, None]  # [groups, K]
        w_max = jnp.max(jnp.where(one_hot[:, :, None], wf[None], -jnp.inf), axis=1)
        w_min = jnp.min(jnp.where(one_hot[:, :, None], wf[None], jnp.inf), axis=1)
    q_max = (1 << bits) - 1
    if symmetric:
        zeros = jnp.full((groups, n), 1 << (bits - 1), jnp.int32)
        scales = jnp.maximum(jnp.maximum(jnp.abs(w_max), jnp.abs(w_min)) / (1 << (bits - 1)), 1e-8)
    else:
        w_max, w_min = jnp.maximum(w_max, 0.0), jnp.minimum(w_min, 0.0)
        scales = jnp.maximum((w_max - w_min) / q_max, 1e-8)
        zeros = jnp.clip(jnp.round(-w_min / scales), min_zero, q_max).astype(jnp.int32)
    scales = scales.astype(w.dtype)
    s, z = scales.astype(jnp.float32)[rows], zeros[rows]
    q = jnp.clip(jnp.round(wf / s) + z, 0, q_max).astype(jnp.int32)
    return q, scales, zeros


def quantize_awq(w, group_size: int = 128):
    """A float weight ``[K, N]`` -> AutoAWQ tensors ``(qweight, scales, qzeros)`` (4-bit, asymmetric RTN)."""
    q, scales, zeros = rtn_quantize(w, 4, group_size)
    return pack_awq(q), scales, pack_awq(zeros)


def quantize_gptq(w, bits: int = 4, group_size: int = 128, *, symmetric: bool = True, act_order=None,
                  v2_format: bool = False):
    """A float weight ``[K, N]`` -> AutoGPTQ tensors ``(qweight, qzeros, scales, g_idx)`` by RTN.

    ``act_order``: optional permutation of the K rows (the order GPTQ visited them); row ``k``'s group is
    then its position in that order divided by the group size, as in act-order checkpoints. ``v2_format``
    stores zeros as they are; the default (v1) stores ``zero - 1``, so zeros are kept >= 1 (a stored
    ``-1`` would wrap and read back as ``2**bits``).
    """
    _check_bits(bits, "quantize_gptq")
    k = jnp.shape(w)[0]
    g = k if group_size == -1 else group_size
    if act_order is None:
        g_idx = jnp.arange(k, dtype=jnp.int32) // g
    else:
        position = jnp.argsort(jnp.asarray(act_order))
        g_idx = (position // g).astype(jnp.int32)
    q, scales, zeros = rtn_quantize(w, bits, group_size, symmetric=symmetric,
                                    g_idx=None if act_order is None else g_idx,  # contiguous groups: no one-hot
                                    min_zero=0 if v2_format else 1)
    stored = zeros if v2_format else zeros - 1
    return pack_gptq(q, bits, axis=0), pack_gptq(stored, bits, axis=1), scales, g_idx


def awq_to_gptq(qweight, scales, qzeros, *, v2_format: bool = True):
    """AutoAWQ tensors -> 4-bit AutoGPTQ tensors ``(qweight, qzeros, scales, g_idx)`` of the same weight.

    v2 zeros by default: AWQ zeros of 0 have no v1 encoding (``zero - 1`` would wrap and read back as 16),
    so ``v2_format=False`` is exact only when every zero is at least 1."""
    q, z = unpack_awq(qweight), unpack_awq(qzeros)
    k, groups = q.shape[0], z.shape[0]
    stored = z if v2_format else (z - 1) & 0xF
    g_idx = (jnp.arange(k, dtype=jnp.int32) // (k // groups)).astype(jnp.int32)
    return pack_gptq(q, 4, axis=0), pack_gptq(stored, 4, axis=1), jnp.asarray(scales), g_idx
