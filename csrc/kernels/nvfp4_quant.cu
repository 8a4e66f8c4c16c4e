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

// Byte offset of scale (row, k) in the [rows/128, k_tiles, 32, 4, 4] tensor-core layout.
__device__ __forceinline__ int64_t SwizzledOffset(uint32_t row, uint32_t k, uint32_t k_tiles) {
  return (static_cast<int64_t>(row / 128) * k_tiles + k / 4) * 512 + (row % 32) * 16 + ((row / 32) % 4) * 4 + k % 4;
}

// Quantizes one 16-element block held in two vectors; returns its e4m3 scale byte and writes 8 bytes of codes.
template <typename T>
__device__ __forceinline__ uint8_t QuantizeBlock(const Vec16<T>& lo, const Vec16<T>& hi, float global_scale,
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

// Each thread quantizes kBlocks consecutive 16-element blocks of a row (all loads issued first) and
// writes their scale bytes. Threads over padding rows write zero scales; the thread holding a row's last
// block also clears the row's padding columns. Indices fit 32 bits (the launcher checks).
template <typename T, int kBlocks>
__global__ void __launch_bounds__(256) Nvfp4QuantKernel(Nvfp4QuantParams p, uint32_t num_threads) {
  using V = Vec16<T>;
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= num_threads) return;
  const uint32_t blocks_per_row = static_cast<uint32_t>(p.cols / 16);
  const uint32_t threads_per_row = blocks_per_row / kBlocks;
  const uint32_t padded_row = t / threads_per_row;  // over batch * padded_rows
  const uint32_t k = (t % threads_per_row) * kBlocks;
  const uint32_t padded_rows = static_cast<uint32_t>(p.padded_rows);
  const uint32_t b = padded_row / padded_rows, r = padded_row % padded_rows;

  uint8_t scale_bytes[kBlocks] = {};
  if (r < p.rows) {
    const int64_t row = static_cast<int64_t>(b) * p.rows + r;
    const T* x = static_cast<const T*>(p.x) + row * p.cols + k * 16;
    V v[2 * kBlocks];
#pragma unroll
    for (int i = 0; i < 2 * kBlocks; ++i) v[i].Load(x + 8 * i);
    const float global_scale = p.global_scale[b];
    uint2* out = reinterpret_cast<uint2*>(p.q + row * (p.cols / 2) + k * 8);
#pragma unroll
    for (int i = 0; i < kBlocks; ++i) scale_bytes[i] = QuantizeBlock(v[2 * i], v[2 * i + 1], global_scale, out + i);
  }
  uint8_t* scales = p.scales + static_cast<int64_t>(b) * padded_rows * p.padded_scale_cols;
  const uint32_t k_tiles = static_cast<uint32_t>(p.padded_scale_cols / 4);
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) scales[SwizzledOffset(r, k + i, k_tiles)] = scale_bytes[i];
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
