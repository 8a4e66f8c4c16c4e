#include <cuda_fp8.h>

#include "kernels/device_utils.cuh"
#include "kernels/nvfp4_quant.h"

namespace jaxq {
namespace {

// e2m1 magnitude code of a = |v| (0..7 for 0, .5, 1, 1.5, 2, 3, 4, 6), rounding to nearest even and
// saturating at 6 (Hopper has no e2m1 convert instruction). The same function as the reference's
// threshold comparisons, in fewer instructions and no branches: from 1 up, codes follow the float32
// exponent and top mantissa bit, so an integer round-to-nearest-even of the bits at mantissa bit 22 gives
// the code (clamped to 7); below 1 the step is 0.5, so the code is rint(2a), read off the bits of
// 2a + 1.5 * 2^23. NaN fails both comparisons and gives 0, as the thresholds do.
__device__ __forceinline__ uint32_t E2m1Magnitude(float a) {
  const uint32_t bits = __float_as_uint(a);
  // (0x3f000000 = 126 << 23 makes 1.0, exponent 127 and mantissa 0, come out as code 2.)
  const uint32_t from_one = min((bits + (0x1fffffu - 0x3f000000u) + ((bits >> 22) & 1u)) >> 22, 7u);
  const uint32_t below_one = __float_as_uint(fmaf(2.f, a, 12582912.f)) - 0x4b400000u;
  return a >= 1.f ? from_one : (a < 1.f ? below_one : 0u);
}

// Quantizes one 16-element block held in two vectors; returns its e4m3 scale byte and writes 8 bytes of codes.
template <typename T>
__device__ __forceinline__ uint32_t QuantizeBlock(const Vec16<T>& lo, const Vec16<T>& hi, float global_scale,
                                                  uint2* out) {
  const float amax = hi.AbsMax(lo.AbsMax(0.f));
  // IEEE reciprocals where vLLM uses rcp.approx; the same operations in the same order otherwise.
  const __nv_fp8_e4m3 scale_e4m3(global_scale * (amax * (1.f / 6.f)));
  const float scale = static_cast<float>(scale_e4m3);
  const float out_scale = scale != 0.f ? 1.f / (scale * (1.f / global_scale)) : 0.f;
  // The scale is >= 0, so |x * out_scale| = |x| * out_scale and the code's sign bit is x's. Codes are
  // accumulated with multiply-adds, which run beside the integer work the rounding needs.
  uint32_t packed_lo = 0, packed_hi = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t nibble = 1u << (4 * i);
    packed_lo += (E2m1Magnitude(fabsf(lo[i]) * out_scale) | ((__float_as_uint(lo[i]) >> 28) & 8u)) * nibble;
    packed_hi += (E2m1Magnitude(fabsf(hi[i]) * out_scale) | ((__float_as_uint(hi[i]) >> 28) & 8u)) * nibble;
  }
  *out = make_uint2(packed_lo, packed_hi);
  return scale_e4m3.__x;
}

// The swizzled scale layout is [row tiles of 128, k tiles of 4 blocks, 32, 4, 4]: the 4 scales of one row in
// one k tile are 4 consecutive bytes, at (row % 32) * 16 + ((row / 32) % 4) * 4 inside the tile's 512 bytes.
// So a CUDA block of 128 threads takes one row tile x one k tile, thread i row i of the tile: each thread
// loads its row's 64 elements (128 bytes), writes 32 bytes of codes and one aligned 4-byte scale word, and
// the block's scale words fill the 512-byte tile exactly. Rows past M and blocks past K/16 (the padding)
// get zero scales and no codes. grid.x: batch x row tiles, grid.y: k tiles.
template <typename T>
__global__ void __launch_bounds__(128) Nvfp4QuantKernel(Nvfp4QuantParams p) {
  using V = Vec16<T>;
  const uint32_t row_tiles = static_cast<uint32_t>(p.padded_rows / 128);
  const uint32_t b = blockIdx.x / row_tiles, row_tile = blockIdx.x % row_tiles;
  const uint32_t k_tile = blockIdx.y, k_tiles = gridDim.y;
  const uint32_t r = row_tile * 128 + threadIdx.x;
  const int64_t blocks_per_row = p.cols / 16;

  uint32_t scale_word = 0;
  if (r < p.rows) {
    const int64_t row = static_cast<int64_t>(b) * p.rows + r;
    const T* x = static_cast<const T*>(p.x) + row * p.cols + k_tile * 64;
    uint2* out = reinterpret_cast<uint2*>(p.q + row * (p.cols / 2) + k_tile * 32);
    const int64_t remaining_blocks = blocks_per_row - int64_t{k_tile} * 4;
    const int real_blocks = remaining_blocks < 4 ? static_cast<int>(remaining_blocks) : 4;
    V v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i / 2 < real_blocks) v[i].Load(x + 8 * i);
    }
    const float global_scale = p.global_scale[b];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < real_blocks) scale_word |= QuantizeBlock(v[2 * i], v[2 * i + 1], global_scale, out + i) << (8 * i);
    }
  }
  uint8_t* tile = p.scales + static_cast<int64_t>(b) * p.padded_rows * p.padded_scale_cols +
                  (static_cast<int64_t>(row_tile) * k_tiles + k_tile) * 512;
  *reinterpret_cast<uint32_t*>(tile + (threadIdx.x % 32) * 16 + (threadIdx.x / 32) * 4) = scale_word;
}

template <typename T>
cudaError_t LaunchTyped(const Nvfp4QuantParams& p, cudaStream_t stream) {
  const int64_t row_tiles = p.batch * (p.padded_rows / 128);
  const int64_t k_tiles = p.padded_scale_cols / 4;
  if (row_tiles == 0 || k_tiles == 0) return cudaSuccess;
  if (row_tiles >= (int64_t{1} << 31) || k_tiles > 65535 || p.padded_rows % 128 || p.padded_scale_cols % 4) {
    return cudaErrorInvalidValue;
  }
  Nvfp4QuantKernel<T><<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(k_tiles)), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchNvfp4Quant(const Nvfp4QuantParams& p, cudaStream_t stream) {
  if (p.cols % 16 != 0 || p.in_type == FloatType::kF32) return cudaErrorInvalidValue;
  return p.in_type == FloatType::kF16 ? LaunchTyped<__half>(p, stream) : LaunchTyped<__nv_bfloat16>(p, stream);
}

}  // namespace jaxq
