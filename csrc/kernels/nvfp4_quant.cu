#include <cuda_fp8.h>

#include "kernels/device_utils.cuh"
#include "kernels/nvfp4_quant.h"

namespace jaxq {
namespace {

// e2m1 code of v, rounding to nearest even and saturating at 6 (Hopper has no e2m1 convert instruction).
// Magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 are codes 0..7; bit 3 is the sign of v (small negatives give -0).
// The same function as the reference's threshold comparisons, in fewer instructions: from 1 up, codes
// follow the float32 exponent and top mantissa bit, so an integer round-to-nearest-even of the bits at
// mantissa bit 22 gives the code (clamped to 7); below 1 the step is 0.5, so the code is rint(2|v|).
// NaN takes the second path and gives code 0, as the comparisons do.
__device__ __forceinline__ uint32_t E2m1Code(float v) {
  const uint32_t bits = __float_as_uint(v);
  const uint32_t magnitude_bits = bits & 0x7fffffffu;
  uint32_t magnitude;
  if (__uint_as_float(magnitude_bits) >= 1.f) {
    const uint32_t rounded = (magnitude_bits + 0x1fffffu + ((magnitude_bits >> 22) & 1u)) >> 22;
    magnitude = min(rounded - 252u, 7u);  // 252 = (126 << 1): 1.0 (exponent 127, mantissa 0) -> code 2
  } else {
    magnitude = static_cast<uint32_t>(__float2int_rn(2.f * __uint_as_float(magnitude_bits)));
  }
  return magnitude | ((bits >> 31) << 3);
}

// Byte offset of scale (row, k) in the [rows/128, k_tiles, 32, 4, 4] tensor-core layout.
__device__ __forceinline__ int64_t SwizzledOffset(int64_t row, int64_t k, int64_t k_tiles) {
  return ((row / 128) * k_tiles + k / 4) * 512 + (row % 32) * 16 + ((row / 32) % 4) * 4 + k % 4;
}

// One thread per 16-element block: two 16-byte loads, one 8-byte store, one scale byte.
template <typename T>
__global__ void __launch_bounds__(256) Nvfp4QuantKernel(Nvfp4QuantParams p, int64_t num_blocks) {
  using V = Vec16<T>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_blocks) return;
  const int64_t blocks_per_row = p.cols / 16;
  const int64_t padded_row = t / blocks_per_row;  // over batch * padded_rows
  const int64_t k = t % blocks_per_row;
  const int64_t b = padded_row / p.padded_rows;
  const int64_t r = padded_row % p.padded_rows;

  uint8_t scale_byte = 0;
  if (r < p.rows) {
    const int64_t row = b * p.rows + r;
    const T* x = static_cast<const T*>(p.x) + row * p.cols + k * 16;
    V lo, hi;
    lo.Load(x);
    hi.Load(x + 8);
    const float amax = hi.AbsMax(lo.AbsMax(0.f));
    const float global_scale = p.global_scale[b];
    // IEEE reciprocals where vLLM uses rcp.approx; the same operations in the same order otherwise.
    const __nv_fp8_e4m3 scale_e4m3(global_scale * (amax * (1.f / 6.f)));
    scale_byte = scale_e4m3.__x;
    const float scale = static_cast<float>(scale_e4m3);
    const float out_scale = scale != 0.f ? 1.f / (scale * (1.f / global_scale)) : 0.f;
    uint32_t packed_lo = 0, packed_hi = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      packed_lo |= E2m1Code(lo.v[i] * out_scale) << (4 * i);
      packed_hi |= E2m1Code(hi.v[i] * out_scale) << (4 * i);
    }
    *reinterpret_cast<uint2*>(p.q + row * (p.cols / 2) + k * 8) = make_uint2(packed_lo, packed_hi);
  }
  // Padding rows get zero scales; the last real block of each row also clears the padding columns.
  uint8_t* scales = p.scales + b * p.padded_rows * p.padded_scale_cols;
  const int64_t k_tiles = p.padded_scale_cols / 4;
  scales[SwizzledOffset(r, k, k_tiles)] = scale_byte;
  if (k == blocks_per_row - 1) {
    for (int64_t kk = k + 1; kk < p.padded_scale_cols; ++kk) scales[SwizzledOffset(r, kk, k_tiles)] = 0;
  }
}

}  // namespace

cudaError_t LaunchNvfp4Quant(const Nvfp4QuantParams& p, cudaStream_t stream) {
  if (p.cols % 16 != 0 || p.in_type == FloatType::kF32) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int64_t num_blocks = p.batch * p.padded_rows * (p.cols / 16);
  if (num_blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((num_blocks + kThreads - 1) / kThreads));
  if (p.in_type == FloatType::kF16) {
    Nvfp4QuantKernel<__half><<<grid, kThreads, 0, stream>>>(p, num_blocks);
  } else {
    Nvfp4QuantKernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p, num_blocks);
  }
  return cudaGetLastError();
}

}  // namespace jaxq
