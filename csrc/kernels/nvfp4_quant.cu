#include <cuda_fp8.h>

#include "kernels/device_utils.cuh"
#include "kernels/nvfp4_quant.h"

namespace jaxq {
namespace {

// e2m1 magnitude code (0..7 for 0, .5, 1, 1.5, 2, 3, 4, 6) of a = |v|, plus 252, rounding to nearest even
// and saturating at 6 (Hopper has no e2m1 convert instruction). Equal to the reference's threshold
// comparisons on every float32 (checked exhaustively on the host over [2^-30, 16); larger values saturate,
// smaller ones give 0), in float multiply-adds where the previous integer form kept the integer pipe busy:
// - from 1 up, codes follow the float32 exponent and top mantissa bit: Veltkamp's split with 2^22 + 1
//   rounds to two significant bits, ties to even, and bits >> 22 is then code + 252;
// - below 1 the step is 0.5, so the code is rint(2a), read off the bits of 2a + 1.5 * 2^23;
// - the first form on max(a, 1) is 2 for a < 1, never below the second; on a >= 1 it never exceeds the
//   second, so the smaller of the two is the code. NaN gives 7 (saturated), confined to its nibble.
// The + 252 is taken off once per packed word (E2m1Pack).
__device__ __forceinline__ uint32_t E2m1MagnitudePlus252(float a) {
  const float from_one_input = fminf(fmaxf(a, 1.f), 6.f);
  // _rn intrinsics: a contraction into a fused multiply-add would undo the split.
  const float split = __fmul_rn(from_one_input, 4194305.f);
  const float rounded = __fsub_rn(split, __fsub_rn(split, from_one_input));
  const uint32_t from_one = __float_as_uint(rounded) >> 22;
  const uint32_t below_one = __float_as_uint(__fmaf_rn(2.f, a, 12582912.f)) - (0x4b400000u - 252u);
  return min(from_one, below_one);
}

// The nibble word of eight codes: sum of (code_i + 252) * 16^i, less 252 per nibble, with sign bits.
struct E2m1Pack {
  uint32_t word = 0u - 252u * 0x11111111u;
  __device__ __forceinline__ void Add(int i, float a) { word += E2m1MagnitudePlus252(a) * (1u << (4 * i)); }
};

// Sign bits of the eight 16-bit elements of v at bits 4i + 3, where their e2m1 codes keep theirs: pairs
// (i, i + 4) are gathered into one word, which puts both signs the same distance from their places.
template <typename T>
__device__ __forceinline__ uint32_t E2m1SignBits(const Vec16<T>& v) {
  static_assert(sizeof(T) == 2, "NVFP4 inputs are 16-bit");
  const uint32_t pair04 = __byte_perm(v.raw.x, v.raw.z, 0x5410), pair15 = __byte_perm(v.raw.x, v.raw.z, 0x7632);
  const uint32_t pair26 = __byte_perm(v.raw.y, v.raw.w, 0x5410), pair37 = __byte_perm(v.raw.y, v.raw.w, 0x7632);
  return ((pair04 >> 12) & 0x00080008u) | ((pair15 >> 8) & 0x00800080u) | ((pair26 >> 4) & 0x08000800u) |
         (pair37 & 0x80008000u);
}

// Byte offset of scale (row, k) in the [rows/128, k_tiles, 32, 4, 4] tensor-core layout.
__device__ __forceinline__ int64_t SwizzledOffset(uint32_t row, uint32_t k, uint32_t k_tiles) {
  return (static_cast<int64_t>(row / 128) * k_tiles + k / 4) * 512 + (row % 32) * 16 + ((row / 32) % 4) * 4 + k % 4;
}

// Quantizes one 16-element block held in two vectors: its e4m3 scale byte and its 8 bytes of codes.
struct QuantizedBlock {
  uint2 codes;
  uint8_t scale;
};

template <typename T>
__device__ __forceinline__ QuantizedBlock QuantizeBlock(const Vec16<T>& lo, const Vec16<T>& hi, float global_scale) {
  const float amax = hi.AbsMax(lo.AbsMax(0.f));
  // IEEE reciprocals where vLLM uses rcp.approx; the same operations in the same order otherwise.
  const __nv_fp8_e4m3 scale_e4m3(global_scale * (amax * (1.f / 6.f)));
  const float scale = static_cast<float>(scale_e4m3);
  const float out_scale = scale != 0.f ? 1.f / (scale * (1.f / global_scale)) : 0.f;
  // The scale is >= 0, so |x * out_scale| = |x| * out_scale; the codes' sign bits are x's.
  E2m1Pack packed_lo, packed_hi;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    packed_lo.Add(i, __fmul_rn(fabsf(lo[i]), out_scale));
    packed_hi.Add(i, __fmul_rn(fabsf(hi[i]), out_scale));
  }
  return {make_uint2(packed_lo.word | E2m1SignBits(lo), packed_hi.word | E2m1SignBits(hi)), scale_e4m3.__x};
}

// Each thread quantizes kBlocks (1 or 2) consecutive 16-element blocks of a row (all loads issued first)
// and writes their codes and scale bytes with one store each: with two blocks, k is even, so both scale
// bytes are neighbours in the swizzled layout. Threads over padding rows write zero scales; the thread
// holding a row's last block also clears the row's padding columns. Indices fit 32 bits (the launcher
// checks).
template <typename T, int kBlocks>
__global__ void __launch_bounds__(256) Nvfp4QuantKernel(Nvfp4QuantParams p, uint32_t num_threads) {
  static_assert(kBlocks == 1 || kBlocks == 2);
  using V = Vec16<T>;
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= num_threads) return;
  const uint32_t blocks_per_row = static_cast<uint32_t>(p.cols / 16);
  const uint32_t threads_per_row = blocks_per_row / kBlocks;
  const uint32_t padded_row = t / threads_per_row;  // over batch * padded_rows
  const uint32_t k = (t % threads_per_row) * kBlocks;
  const uint32_t padded_rows = static_cast<uint32_t>(p.padded_rows);
  const uint32_t b = padded_row / padded_rows, r = padded_row % padded_rows;

  QuantizedBlock blocks[kBlocks] = {};
  if (r < p.rows) {
    const int64_t row = static_cast<int64_t>(b) * p.rows + r;
    const T* x = static_cast<const T*>(p.x) + row * p.cols + k * 16;
    V v[2 * kBlocks];
#pragma unroll
    for (int i = 0; i < 2 * kBlocks; ++i) v[i].Load(x + 8 * i);
    const float global_scale = p.global_scale[b];
#pragma unroll
    for (int i = 0; i < kBlocks; ++i) blocks[i] = QuantizeBlock(v[2 * i], v[2 * i + 1], global_scale);
    uint8_t* q = p.q + row * (p.cols / 2) + k * 8;
    if constexpr (kBlocks == 2) {
      *reinterpret_cast<uint4*>(q) = make_uint4(blocks[0].codes.x, blocks[0].codes.y, blocks[1].codes.x, blocks[1].codes.y);
    } else {
      *reinterpret_cast<uint2*>(q) = blocks[0].codes;
    }
  }
  uint8_t* scales = p.scales + static_cast<int64_t>(b) * padded_rows * p.padded_scale_cols;
  const uint32_t k_tiles = static_cast<uint32_t>(p.padded_scale_cols / 4);
  if constexpr (kBlocks == 2) {
    *reinterpret_cast<uint16_t*>(scales + SwizzledOffset(r, k, k_tiles)) = blocks[0].scale | (blocks[1].scale << 8);
  } else {
    scales[SwizzledOffset(r, k, k_tiles)] = blocks[0].scale;
  }
  if (k + kBlocks == blocks_per_row) {
    for (uint32_t kk = blocks_per_row; kk < p.padded_scale_cols; ++kk) scales[SwizzledOffset(r, kk, k_tiles)] = 0;
  }
}

template <typename T>
cudaError_t LaunchTyped(const Nvfp4QuantParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = p.batch * p.padded_rows * (p.cols / 16);
  if (blocks == 0) return cudaSuccess;
  if (blocks >= (int64_t{1} << 32)) return cudaErrorInvalidValue;
  // Two blocks per thread (64 bytes in flight) where rows have an even number of blocks.
  if ((p.cols / 16) % 2 == 0) {
    const auto n = static_cast<uint32_t>(blocks / 2);
    Nvfp4QuantKernel<T, 2><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p, n);
  } else {
    const auto n = static_cast<uint32_t>(blocks);
    Nvfp4QuantKernel<T, 1><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchNvfp4Quant(const Nvfp4QuantParams& p, cudaStream_t stream) {
  if (p.cols % 16 != 0 || p.in_type == FloatType::kF32) return cudaErrorInvalidValue;
  return p.in_type == FloatType::kF16 ? LaunchTyped<__half>(p, stream) : LaunchTyped<__nv_bfloat16>(p, stream);
}

}  // namespace jaxq
