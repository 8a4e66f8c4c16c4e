// What the Marlin kernels (marlin.cu's mma.sync kernels, marlin_hopper.cu's wgmma kernel) share: a lane's codes of a
// 16 x 64 tile turned into mma fragments of W, exact in the activations' type T, and the scales and zero points
// each fragment needs. A lane's 16-byte vector of a tile holds, in word w, the fragments of columns 16w + g and
// 16w + 8 + g (g = lane / 4) for rows 2t, 2t + 1, 2t + 8, 2t + 9 (t = lane % 4): mma.m16n8k16's A fragments of
// W^T, which is also wgmma's register A fragment for warp w of a warpgroup.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/marlin.h"

namespace jaxq {
namespace {

constexpr int kTileK = 16;
constexpr int kTileN = 64;

template <typename T>
struct Pair;
template <>
struct Pair<half> {
  using Type = half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in each half: 1024 + an 8-bit code is exact
  static constexpr float kMagicValue = 1024.0f;
};
template <>
struct Pair<__nv_bfloat16> {
  using Type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in each half: 128 + a 4-bit code is exact
  static constexpr float kMagicValue = 128.0f;
};

template <typename T>
using T2 = typename Pair<T>::Type;

template <typename T>
__device__ __forceinline__ T2<T> AsPair(uint32_t bits) {
  return *reinterpret_cast<T2<T>*>(&bits);
}

template <typename T>
__device__ __forceinline__ uint32_t Bits(T2<T> v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T2<T> MakePair(float lo, float hi) {
  if constexpr (std::is_same_v<T, half>) {
    return __floats2half2_rn(lo, hi);
  } else {
    return __floats2bfloat162_rn(lo, hi);
  }
}

template <typename T>
__device__ __forceinline__ float ToFloat(T v) {
  if constexpr (std::is_same_v<T, half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v) {
  if constexpr (std::is_same_v<T, half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <MarlinType kType>
constexpr bool kFp4 = kType == MarlinType::kNvFp4 || kType == MarlinType::kMxFp4;

template <MarlinType kType>
constexpr int kBitsOf = kType == MarlinType::kU4B8 || kType == MarlinType::kU4 || kFp4<kType> ? 4 : 8;

// A scale in the scales' array: FP4's are bytes, the others T.
template <typename T, MarlinType kType>
using ScaleOf = std::conditional_t<kFp4<kType>, uint8_t, T>;
template <MarlinType kType>
constexpr int kScaleBytes = kFp4<kType> ? 1 : 2;

// MXFP4 takes bfloat16 activations only: its exponents span far past float16's range.
template <typename T, MarlinType kType>
constexpr bool kSupported = !(kType == MarlinType::kMxFp4 && std::is_same_v<T, half>);

// The power of two by which an NVFP4 W in registers is smaller than W (Fp4Scale's choice); the sums are scaled
// back with the global scale.
template <typename T>
constexpr float kNvFp4Unscale = std::is_same_v<T, half> ? 128.0f : 256.0f;

// (a & kMask) | kOr in one LOP3: written as C++, ptxas emits two, both constants being immediates.
template <uint32_t kMask, uint32_t kOr>
__device__ __forceinline__ uint32_t MaskOr(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "n"(kMask), "n"(kOr));
  return r;
}

// Whether a code's raw fragment is its value (fp8 times 2**-bias; bfloat16's 8-bit codes minus 128) rather than
// magic + code, whose offset (magic + bias or zero point) is still to be taken off.
template <typename T, MarlinType kType>
constexpr bool kRawIsValue =
    kType == MarlinType::kFp8E4M3 || kFp4<kType> || (kBitsOf<kType> == 8 && std::is_same_v<T, __nv_bfloat16>);

// The two e2m1 codes in bits 12..15 and 28..31 of x as a pair of T without e2m1's exponent bias: the sign to bit
// 15, exponent and mantissa under T's (codes 0 and 1, zero and 0.5, become T's subnormals), so that a pair is
// e2m1 * 2**-126 (bfloat16) or e2m1 * 2**-14 (float16), exactly.
template <typename T>
__device__ __forceinline__ uint32_t Fp4Pair(uint32_t x) {
  constexpr int kShift = std::is_same_v<T, half> ? 3 : 6;
  constexpr uint32_t kBits = 0x70007000u >> kShift;
  return (x & 0x80008000u) | ((x >> kShift) & kBits);
}

// The two fragments b0 (rows 2t, 2t + 1) and b1 (rows 2t + 8, 2t + 9) of column j = 2w + h of a tile as the codes
// give them, exact in T: magic + code (4-bit codes, float16's 8-bit codes), or the value (kRawIsValue).
// Two 4-bit codes at bits 0..3 and 16..19 of x as a pair of T: magic + code, exact.
template <typename T>
__device__ __forceinline__ uint32_t RawPair4(uint32_t x) {
  return MaskOr<0x000f000fu, Pair<T>::kMagic>(x);
}

template <typename T, MarlinType kType>
__device__ __forceinline__ void RawFragments(const uint4* codes, int w, int h, uint32_t& b0, uint32_t& b1) {
  if constexpr (kFp4<kType>) {
    // Nibbles 0, 4 (b0) and 1, 5 (b1) of the word shifted by 8h, moved to where Fp4Pair reads codes.
    const uint32_t word = w == 0 ? codes[0].x : w == 1 ? codes[0].y : w == 2 ? codes[0].z : codes[0].w;
    b0 = Fp4Pair<T>(word << (12 - 8 * h));
    b1 = Fp4Pair<T>(word << (8 - 8 * h));
  } else if constexpr (kBitsOf<kType> == 4) {
    const uint32_t word = (w == 0 ? codes[0].x : w == 1 ? codes[0].y : w == 2 ? codes[0].z : codes[0].w) >> (8 * h);
    b0 = RawPair4<T>(word);
    b1 = RawPair4<T>(word >> 4);
  } else {
    const uint4& v = codes[w >> 1];
    const int e = 2 * (w & 1) + h;
    const uint32_t word = e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
    const uint32_t lo = __byte_perm(word, 0u, 0x4240);  // bytes 0 and 2: rows 2t and 2t+1
    const uint32_t hi = __byte_perm(word, 0u, 0x4341);  // bytes 1 and 3: rows 2t+8 and 2t+9
    if constexpr (kType == MarlinType::kFp8E4M3) {
      constexpr int kShift = std::is_same_v<T, half> ? 7 : 4;  // e4m3's exponent and mantissa under T's
      b0 = ((lo & 0x007f007fu) << kShift) | ((lo & 0x00800080u) << 8);
      b1 = ((hi & 0x007f007fu) << kShift) | ((hi & 0x00800080u) << 8);
    } else if constexpr (std::is_same_v<T, half>) {
      b0 = lo | 0x64006400u;  // 1024 + code
      b1 = hi | 0x64006400u;
    } else {
      // bfloat16 has 8 significant bits: go through float32 (exact for 0..255 - 128).
      b0 = Bits<T>(MakePair<T>(static_cast<float>(lo & 0xffu) - 128.0f, static_cast<float>(lo >> 16) - 128.0f));
      b1 = Bits<T>(MakePair<T>(static_cast<float>(hi & 0xffu) - 128.0f, static_cast<float>(hi >> 16) - 128.0f));
    }
  }
}

// A pair of W itself from a raw fragment: minus its offset (`neg`, exact), times the scales, rounded to T once, as
// the reference dequantizes.
template <typename T, MarlinType kType>
__device__ __forceinline__ uint32_t FromRaw(uint32_t raw, T2<T> neg, T2<T> scale) {
  T2<T> v = AsPair<T>(raw);
  // MXFP4: e2m1 itself first (times 2**126), as its scale alone may not fit T's range.
  if constexpr (kType == MarlinType::kMxFp4) v = __hmul2(v, AsPair<T>(0x7e807e80u));
  if constexpr (!kRawIsValue<T, kType>) v = __hadd2(v, neg);
  return Bits<T>(__hmul2(v, scale));
}

// The fragments of W itself (FromRaw of the raw fragments).
template <typename T, MarlinType kType>
__device__ __forceinline__ void Dequantize(const uint4* codes, int w, int h, T2<T> neg01, T2<T> neg89,
                                           T2<T> scale01, T2<T> scale89, uint32_t& b0, uint32_t& b1) {
  uint32_t r0, r1;
  RawFragments<T, kType>(codes, w, h, r0, r1);
  b0 = FromRaw<T, kType>(r0, neg01, scale01);
  b1 = FromRaw<T, kType>(r1, neg89, scale89);
}

// The offset a raw fragment carries for a zero point (or bias) z: magic + z.
template <typename T, MarlinType kType>
__device__ __forceinline__ float RawOffset(float z) {
  return (kBitsOf<kType> == 4 ? Pair<T>::kMagicValue : 1024.0f) + z;  // 8-bit: float16 codes only
}

// Minus the offsets Dequantize subtracts, for a zero point (or bias) `z` of rows (2t, 2t + 1) and (2t + 8, 2t + 9).
template <typename T, MarlinType kType>
__device__ __forceinline__ void Offsets(float z01a, float z01b, float z89a, float z89b, T2<T>& neg01, T2<T>& neg89) {
  neg01 = MakePair<T>(-RawOffset<T, kType>(z01a), -RawOffset<T, kType>(z01b));
  neg89 = MakePair<T>(-RawOffset<T, kType>(z89a), -RawOffset<T, kType>(z89b));
}

// The 8 scales (or zero points) one lane needs for its columns 16 * w + 8 * h + lane / 4 of the tile, in order
// j = 2 * w + h: with several groups one 16-byte vector (vLLM's grouped permutation puts them side by side);
// with one group vLLM's other permutation scatters them. `row` is the tile's 64 scales of one group.
template <typename T>
__device__ __forceinline__ void LoadScales(const T* row, int lane_col, bool single, T (&s)[8]) {
  if (!single) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + 8 * lane_col);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = e[j];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int w = j >> 1, h = j & 1;
      s[j] = row[32 * (w >> 1) + 8 * ((lane_col >> 1) & 3) + 4 * (w & 1) + 2 * h + (lane_col & 1)];
    }
  }
}

// Zero point of column j (= 2 * w + h) from the lane's packed word: nibble w for h = 0, 4 + w for h = 1.
__device__ __forceinline__ uint32_t ZeroNibble(uint32_t word, int j) {
  return (word >> (4 * ((j & 1) * 4 + (j >> 1)))) & 0xfu;
}

// The factor Dequantize multiplies an FP4 pair by, in both halves, from one scale byte. NVFP4 (bits 14..7 of
// float16 s * 2**7): float16 s * 2**7 (the bits moved back); bfloat16 s * 2**118, as s * 2**-105 (the bits under
// bfloat16's exponent; zero stays zero) times 2**111 and 2**112, exact. With Fp4Pair's bias, W in registers is
// W / kNvFp4Unscale, in T's normal range or exact as a subnormal. MXFP4 (bfloat16): 2**(e - 127), exactly (e = 0
// is the subnormal 2**-127, e = 255 NaN); Dequantize has taken e2m1's bias off first.
template <typename T, MarlinType kType>
__device__ __forceinline__ T2<T> Fp4Scale(uint32_t byte) {
  const uint32_t pair = byte * 0x00010001u;
  if constexpr (kType == MarlinType::kNvFp4) {
    if constexpr (std::is_same_v<T, half>) {
      return AsPair<T>(pair << 7);
    } else {
      const T2<T> small = AsPair<T>(pair << 4);
      return __hmul2(__hmul2(small, AsPair<T>(0x77007700u)), AsPair<T>(0x77807780u));
    }
  } else {
    const uint32_t bits = byte == 0u ? 0x00400040u : byte == 255u ? 0x7fc07fc0u : pair << 7;
    return AsPair<T>(bits);
  }
}

// Per column j and row pair (2t, 2t + 1) / (2t + 8, 2t + 9) of a lane: the scale, and minus the offset
// Dequantize subtracts.
template <typename T>
struct Factors {
  T2<T> scale01[8], scale89[8], neg01[8], neg89[8];
};

// A lane's factors for one tile: `scales` / `zeros` point at the tile's 64 scales / 8 zero words of group 0,
// `group[r]` is the group of the lane's row r (2t, 2t + 1, 2t + 8, 2t + 9; all equal without act-order), and
// groups are `scale_stride` scales / `zero_stride` words apart.
template <typename T, MarlinType kType, bool kActOrder>
__device__ __forceinline__ void TileFactors(const void* tile_scales, size_t scale_stride, const uint32_t* zeros,
                                            size_t zero_stride, const int (&group)[4], int g, bool single,
                                            Factors<T>& f) {
  static_assert(!(kActOrder && kFp4<kType>), "FP4 weights have no act-order");
  constexpr bool kHasZeros = kType == MarlinType::kU4;
  if constexpr (kFp4<kType>) {
    // The lane's 8 bytes, in the order 0 2 1 3 4 6 5 7 of j.
    const uint8_t* scales = static_cast<const uint8_t*>(tile_scales);
    const uint2 v = *reinterpret_cast<const uint2*>(scales + group[0] * scale_stride + 8 * g);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int at = (j & 4) | ((j & 1) << 1) | ((j >> 1) & 1);
      f.scale01[j] = f.scale89[j] = Fp4Scale<T, kType>(((at < 4 ? v.x : v.y) >> (8 * (at & 3))) & 0xffu);
    }
    return;
  }
  const T* scales = static_cast<const T*>(tile_scales);
  if constexpr (kActOrder) {
    T sr[4][8];
    uint32_t zr[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      LoadScales(scales + group[r] * scale_stride, g, single, sr[r]);
      if constexpr (kHasZeros) zr[r] = zeros[group[r] * zero_stride + g];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      f.scale01[j] = T2<T>{sr[0][j], sr[1][j]};
      f.scale89[j] = T2<T>{sr[2][j], sr[3][j]};
      if constexpr (kHasZeros) {
        Offsets<T, kType>(ZeroNibble(zr[0], j), ZeroNibble(zr[1], j), ZeroNibble(zr[2], j), ZeroNibble(zr[3], j),
                          f.neg01[j], f.neg89[j]);
      }
    }
  } else {
    T s[8];
    LoadScales(scales + group[0] * scale_stride, g, single, s);
    const uint32_t z = kHasZeros ? zeros[group[0] * zero_stride + g] : 0u;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      f.scale01[j] = f.scale89[j] = T2<T>{s[j], s[j]};
      if constexpr (kHasZeros) {
        const float zero = ZeroNibble(z, j);
        Offsets<T, kType>(zero, zero, zero, zero, f.neg01[j], f.neg89[j]);
      }
    }
  }
  if constexpr (!kHasZeros && kType != MarlinType::kFp8E4M3) {
    const float bias = kType == MarlinType::kU4B8 ? 8.0f : 128.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) Offsets<T, kType>(bias, bias, bias, bias, f.neg01[j], f.neg89[j]);
  }
}

// Launches `kernel(p, per_split)` on `grid`, whose grid.z blocks that share an output tile split K: a thread-block
// cluster (sm_90) when there are several, so that their partial sums meet in shared memory.
template <typename Kernel>
cudaError_t LaunchKSplit(Kernel kernel, dim3 grid, int threads, int shared_bytes, cudaStream_t stream,
                         const MarlinParams& p, int per_split) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 1;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = grid.z;
  config.attrs = cluster;
  config.numAttrs = grid.z > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p, per_split);
}

}  // namespace
}  // namespace jaxq
