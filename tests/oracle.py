"""Independent NumPy oracle, written from shared/SPEC.md with different arithmetic than jaxq's jnp
references: e4m3 and e2m1 by nearest-value search over decoded code tables, power-of-two scales via
frexp, swizzled offsets from the explicit formula."""

from __future__ import annotations

import numpy as np


def _e4m3fn_table() -> np.ndarray:
    """Value of every e4m3fn code (bias 7, 3 mantissa bits, S.1111.111 is NaN)."""
    values = np.empty(256, np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[code] = np.nan
        elif exponent == 0:
            values[code] = sign * mantissa / 8 * 2.0**-6
        else:
            values[code] = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return values


E4M3_VALUES = _e4m3fn_table()
_E4M3_POSITIVE = E4M3_VALUES[:127]  # codes 0..126: 0 .. 448, increasing


def _nearest_even(magnitudes: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest grid value (ascending grid); ties go to the even index."""
    idx = np.clip(np.searchsorted(grid, magnitudes), 1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    d_lo, d_hi = magnitudes - lo, hi - magnitudes
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (idx % 2 == 0))
    return np.where(pick_hi, idx, idx - 1)


def e4m3_encode(v: np.ndarray) -> np.ndarray:
    """float -> e4m3fn bits, round to nearest even, saturating at 448."""
    v = np.asarray(v, np.float64)
    a = np.minimum(np.abs(v), 448.0)
    code = _nearest_even(a, _E4M3_POSITIVE).astype(np.uint8)
    return code | (np.signbit(v).astype(np.uint8) << 7)


E2M1_MAGNITUDES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def e2m1_encode(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    a = np.minimum(np.abs(v), 6.0)
    code = _nearest_even(a, E2M1_MAGNITUDES).astype(np.uint8)
    return code | (np.signbit(v).astype(np.uint8) << 3)


def pow2_ceil(s: np.ndarray) -> np.ndarray:
    """2**ceil(log2(max(s, 1e-10))) in float32, via frexp."""
    s = np.maximum(np.abs(s.astype(np.float32)), np.float32(1e-10)).astype(np.float64)
    frac, exp = np.frexp(s)  # s = frac * 2**exp, frac in [0.5, 1)
    return np.ldexp(1.0, np.where(frac == 0.5, exp - 1, exp)).astype(np.float32)


def group_quant(x: np.ndarray, group_size: int, eps: float, ue8m0: bool, int8: bool):
    """Returns (q bits as uint8 [..., K], scales float32 [..., K/G])."""
    xf = x.astype(np.float32)
    g = xf.reshape(*xf.shape[:-1], -1, group_size)
    amax = np.maximum(np.abs(g).max(axis=-1), np.float32(eps))
    q_max = np.float32(127 if int8 else 448)
    scale = (amax / q_max).astype(np.float32)
    if ue8m0:
        scale = pow2_ceil(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.clip(g / scale[..., None], -q_max, q_max).astype(np.float32)
    if int8:
        bits = np.trunc(ratio).astype(np.int8).view(np.uint8)
    else:
        bits = e4m3_encode(ratio)
    return bits.reshape(x.shape), scale


def column_major(scales: np.ndarray, padded_rows: int) -> np.ndarray:
    *lead, m, groups = scales.shape
    out = np.zeros((*lead, groups, padded_rows), np.float32)
    out[..., :m] = np.swapaxes(scales, -1, -2)
    return out


def pack_ue8m0(scales: np.ndarray) -> np.ndarray:
    """[MN, G] power-of-two scales -> int32 [ceil(G/4), round_up(MN, 4)] packed exponents."""
    mn, groups = scales.shape
    words, padded = -(-groups // 4), -(-mn // 4) * 4
    exponents = (np.frexp(scales.astype(np.float64))[1] - 1 + 127).astype(np.uint8)
    out = np.zeros((words, padded, 4), np.uint8)
    for j in range(groups):
        out[j // 4, :mn, j % 4] = exponents[:, j]
    return out.view("<i4").reshape(words, padded)


def nvfp4_quant(x: np.ndarray, global_scale: float):
    """Returns (q uint8 [M, K/2], swizzled e4m3 scale bits uint8 [M_pad, K_pad], block scale bits [M, K/16])."""
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // 16, 16)
    amax = np.abs(blocks).max(axis=-1)
    gs = np.float32(global_scale)
    rcp6 = np.float32(1) / np.float32(6)
    sf = (gs * (amax * rcp6)).astype(np.float32)
    sf_bits = e4m3_encode(sf)
    sf_value = E4M3_VALUES[sf_bits].astype(np.float32)
    with np.errstate(divide="ignore"):
        out_scale = np.where(sf_value != 0, np.float32(1) / (sf_value * (np.float32(1) / gs)), np.float32(0))
    codes = e2m1_encode((blocks * out_scale.astype(np.float32)[..., None]).astype(np.float32)).reshape(m, k)
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return q, swizzle(sf_bits), sf_bits


def swizzle(sf_bits: np.ndarray) -> np.ndarray:
    m, kb = sf_bits.shape
    mp, kp = -(-m // 128) * 128, -(-kb // 4) * 4
    k_tiles = kp // 4
    flat = np.zeros(mp * kp, np.uint8)
    rows, cols = np.meshgrid(np.arange(m), np.arange(kb), indexing="ij")
    offset = ((rows // 128) * k_tiles + cols // 4) * 512 + (rows % 32) * 16 + ((rows // 32) % 4) * 4 + cols % 4
    flat[offset.ravel()] = sf_bits.ravel()
    return flat.reshape(mp, kp)


# ------------------------------------------------------------------------------ AWQ / GPTQ weights

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j of 8 sits at nibble AWQ_REVERSE_ORDER[j]


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    words = np.asarray(packed).astype(np.int64) & 0xFFFFFFFF
    rows, cols = words.shape
    out = np.zeros((rows, cols * 8), np.int64)
    for j in range(8):
        out[:, j::8] = (words >> (4 * AWQ_REVERSE_ORDER[j])) & 0xF
    return out


def bitstream_unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """GPTQ's little-endian bit stream along `axis`, read bit by bit."""
    words = np.moveaxis(np.asarray(packed).astype(np.uint32), axis, -1)
    as_bytes = np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(*words.shape[:-1], -1)
    stream = np.unpackbits(as_bytes, axis=-1, bitorder="little")
    count = stream.shape[-1] // bits
    values = stream[..., : count * bits].reshape(*stream.shape[:-1], count, bits)
    out = (values.astype(np.int64) << np.arange(bits)).sum(-1)
    return np.moveaxis(out, -1, axis)


def exllama_shuffle_word_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """vLLM's shuffle_{2,4,8}bit / shuffle_3bit_32, column by column, on unpacked values [K, N] -> words."""
    k, n = values.shape
    v = values.astype(np.uint64)
    if bits in (2, 4, 8):
        per = 32 // bits
        out = np.zeros((k // per, n), np.uint64)
        for r in range(k // per):
            chunk = v[r * per:(r + 1) * per]
            if bits == 8:
                for i in range(4):
                    out[r] |= chunk[i] << (8 * i)
                continue
            for i in range(per // 2):  # qb |= qa0 << (i*bits); qb |= qa1 << (i*bits + 16)
                out[r] |= chunk[2 * i] << (i * bits)
                out[r] |= chunk[2 * i + 1] << (i * bits + 16)
        return out.astype(np.uint32).view(np.int32)
    out = np.zeros((k // 32 * 3, n), np.uint64)
    for r in range(k // 32):
        chunk = v[r * 32:(r + 1) * 32]
        for w in range(3):  # words of ten values: even ones from bit 0, odd ones from bit 16
            for i in range(5):
                out[3 * r + w] |= chunk[10 * w + 2 * i] << (3 * i)
                out[3 * r + w] |= chunk[10 * w + 2 * i + 1] << (3 * i + 16)
        for j in range(3):  # bit j of value 30 -> bit 15 of word j, of value 31 -> bit 31
            out[3 * r + j] |= ((chunk[30] >> j) & 1) << 15
            out[3 * r + j] |= ((chunk[31] >> j) & 1) << 31
    return out.astype(np.uint32).view(np.int32)


def awq_dequantize(qweight, scales, qzeros) -> np.ndarray:
    q, z = awq_unpack(qweight), awq_unpack(qzeros)
    g = q.shape[0] // z.shape[0]
    s = np.asarray(scales, np.float32)
    w = (q - np.repeat(z, g, axis=0)).astype(np.float32) * np.repeat(s, g, axis=0)
    return w  # float32; round to the scales' dtype to compare


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v2) -> np.ndarray:
    q = bitstream_unpack(qweight, bits, 0)
    z = bitstream_unpack(qzeros, bits, 1) + (0 if v2 else 1)
    rows = np.asarray(g_idx)
    s = np.asarray(scales, np.float32)
    return (q - z[rows]).astype(np.float32) * s[rows]


# ---------------------------------------------------------------------------------------- scaled_mm


def scaled_mm(a, b, scale_a, scale_b, bias=None, azp_adj=None, azp=None, block=False) -> np.ndarray:
    """float32 result of vLLM's scaled GEMM: s_a * (s_b * acc) [+ bias], acc exact (int64 for int8, float64
    for fp8 via the decoded e4m3 table), block-wise as a float32 sum of per-128-block scaled products."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.int8:
        av, bv = a.astype(np.int64), b.astype(np.int64)
    else:
        av, bv = E4M3_VALUES[a.view(np.uint8)], E4M3_VALUES[b.view(np.uint8)]
    sa, sb = np.asarray(scale_a, np.float32), np.asarray(scale_b, np.float32)
    if block:
        k = a.shape[1]
        out = None
        for kb in range(k // 128):
            part = (av[:, kb * 128:(kb + 1) * 128] @ bv[kb * 128:(kb + 1) * 128]).astype(np.float32)
            sbn = np.repeat(sb[kb], 128)[: b.shape[1]]
            term = sa[:, kb:kb + 1] * (sbn[None, :] * part)
            out = term if out is None else out + term
    else:
        acc = av @ bv
        if azp_adj is not None:
            adj = np.asarray(azp_adj, np.int64)[None, :]
            acc = acc - (adj if azp is None else np.asarray(azp, np.int64)[:, None] * adj)
        acc = acc.astype(np.float32)
        sa = sa.reshape(-1, 1) if sa.size > 1 else sa.reshape(1, 1)
        sb = sb.reshape(1, -1) if sb.size > 1 else sb.reshape(1, 1)
        out = sa * (sb * acc)
    if bias is not None:
        out = out + np.asarray(bias, np.float32)[None, :]
    return out


# ------------------------------------------------------------------------ checkpoint writers (packing)


def awq_pack(values: np.ndarray) -> np.ndarray:
    """[R, N] values 0..15 -> int32 [R, N/8]: column 8c + j at nibble AWQ_REVERSE_ORDER[j] of word c."""
    v = np.asarray(values).astype(np.uint64)
    words = np.zeros((v.shape[0], v.shape[1] // 8), np.uint64)
    for j in range(8):
        words |= v[:, j::8] << np.uint64(4 * AWQ_REVERSE_ORDER[j])
    return words.astype(np.uint32).view(np.int32)


def bitstream_pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """GPTQ's little-endian bit stream along `axis`: value i at bits i*bits .. i*bits+bits-1, 32 per word."""
    v = np.moveaxis(np.asarray(values).astype(np.uint64), axis, -1)
    stream = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = stream.reshape(*v.shape[:-1], -1)
    as_bytes = np.packbits(stream, axis=-1, bitorder="little")
    words = np.ascontiguousarray(as_bytes).view("<u4").astype(np.uint32).view(np.int32)
    return np.moveaxis(words, -1, axis)


# ---------------------------------------------------------------------------------------------- Marlin
# Transcribed from the loops of vLLM's gptq_marlin_repack kernel (one 16x64 tile per (k_tile, n_tile); warp w
# and lane t of four warps fill words t*4+w, or t*8+2w and t*8+2w+1 for 8 bits), vectorized over tiles only.


def marlin_pack(q: np.ndarray, bits: int) -> np.ndarray:
    k, n = q.shape
    tiles = q.reshape(k // 16, 16, n // 64, 64).astype(np.uint64)  # [kt, row, nt, col]
    per_word = 32 // bits
    words_per_tile = 16 * 64 // per_word
    out = np.zeros((k // 16, n // 64, words_per_tile), np.uint64)
    for warp in range(4):
        for lane in range(32):
            col = warp * 16 + lane // 4
            rows = [(lane % 4) * 2 + o for o in (0, 1, 8, 9)]
            vals = [tiles[:, r, :, col] for r in rows] + [tiles[:, r, :, col + 8] for r in rows]
            if bits == 4:
                word = sum(vals[j] << np.uint64(4 * i) for i, j in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
                out[:, :, lane * 4 + warp] = word
            else:
                for half in range(2):
                    word = sum(vals[4 * half + j] << np.uint64(8 * i) for i, j in enumerate((0, 2, 1, 3)))
                    out[:, :, lane * 8 + warp * 2 + half] = word
    return out.reshape(k // 16, -1).astype(np.uint32).view(np.int32)


def marlin_scales(s: np.ndarray, single: bool) -> np.ndarray:
    """Permuted scales from the explicit position formulas: grouped, position i of a 64-chunk holds column
    (i % 64) // 8 + 8 * (i % 8); single (one group), position 8a + b of a 32-chunk holds column
    2a + (0, 1, 8, 9, 16, 17, 24, 25)[b]."""
    flat = s.reshape(-1)
    i = np.arange(flat.size)
    if single:
        src = (i // 32) * 32 + 2 * ((i % 32) // 8) + np.array([0, 1, 8, 9, 16, 17, 24, 25])[i % 8]
    else:
        src = (i // 64) * 64 + (i % 64) // 8 + 8 * (i % 8)
    return flat[src].reshape(s.shape)


def marlin_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """Zero points permuted as grouped scales, interleaved per word, packed low slot first."""
    permuted = marlin_scales(z, single=False).astype(np.uint64)
    per_word = 32 // bits
    order = (0, 2, 4, 6, 1, 3, 5, 7) if bits == 4 else (0, 2, 1, 3)
    chunks = permuted.reshape(z.shape[0], -1, per_word)
    words = sum(chunks[..., j] << np.uint64(bits * i) for i, j in enumerate(order))
    return words.astype(np.uint32).view(np.int32)


def marlin_weight(q, scales, zeros, g_idx, q_type: str, dtype) -> np.ndarray:
    """W [K, N] from codes in logical order, natural-order scales [groups, N] and zeros, rounded to dtype."""
    k = q.shape[0]
    rows = np.arange(k) // (k // scales.shape[0]) if g_idx is None else g_idx
    s = np.asarray(scales, np.float64)[rows]
    if q_type == "uint4b8":
        v = q - 8.0
    elif q_type == "uint8b128":
        v = q - 128.0
    elif q_type == "uint4":
        v = q - np.asarray(zeros, np.float64)[rows]
    else:
        v = E4M3_VALUES[q]
    return (v * s).astype(np.float32).astype(dtype)


def fp4_codes(packed: np.ndarray) -> np.ndarray:
    """e2m1 codes [K, N] of a checkpoint's uint8 [N, K/2] (the even column of K in the low nibble)."""
    n, half = packed.shape
    codes = np.empty((n, 2 * half), np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    return codes.T


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    return np.where(codes & 8, -1.0, 1.0) * E2M1_MAGNITUDES[codes & 7]


def marlin_fp4_scale_bytes(scale: np.ndarray, nvfp4: bool, dtype) -> np.ndarray:
    """vLLM's FP4 scale preparation from its description: natural [N, groups] checkpoint scales (NVFP4: e4m3 bits,
    MXFP4: e8m0 exponents) in dtype, permuted as grouped scales, every 4 positions reordered 0 2 1 3; NVFP4 bytes
    are bits 14..7 of float16 s * 128, MXFP4 bytes the exponents."""
    values = E4M3_VALUES[scale] if nvfp4 else np.ldexp(1.0, scale.astype(np.int64) - 127)
    permuted = marlin_scales(values.T.astype(dtype).astype(np.float64), single=False)
    reordered = permuted.reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(permuted.shape)
    if not nvfp4:
        return (np.frexp(reordered)[1] - 1 + 127).astype(np.uint8)
    bits = (reordered * 128).astype(np.float16).view(np.uint16)
    return ((bits >> 7) & 0xFF).astype(np.uint8)
