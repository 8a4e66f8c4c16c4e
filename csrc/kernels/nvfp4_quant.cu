#include <cuda_fp8.h>

#include <algorithm>

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

// A work item is kBlocks consecutive 16-element blocks of one (padded) row.
template <typename T, int kBlocks>
struct Nvfp4Item {
  uint32_t b, r, k;  // batch entry, row (may be a padding row), first block
  Vec16<T> v[2 * kBlocks];

  __device__ __forceinline__ void Load(const Nvfp4QuantParams& p, uint32_t item) {
    const uint32_t blocks_per_row = static_cast<uint32_t>(p.cols / 16);
    const uint32_t items_per_row = blocks_per_row / kBlocks;
    const uint32_t padded_rows = static_cast<uint32_t>(p.padded_rows);
    const uint32_t padded_row = item / items_per_row;  // over batch * padded_rows
    k = (item % items_per_row) * kBlocks;
    b = padded_row / padded_rows;
    r = padded_row % padded_rows;
    if (r < p.rows) {
      const T* x = static_cast<const T*>(p.x) + (static_cast<int64_t>(b) * p.rows + r) * p.cols + k * 16;
#pragma unroll
      for (int i = 0; i < 2 * kBlocks; ++i) v[i].Load(x + 8 * i);
    }
  }

  // Writes the codes and scale bytes; padding rows get zero scales, and the item holding a row's last
  // block also clears the row's padding columns.
  __device__ __forceinline__ void Store(const Nvfp4QuantParams& p) const {
    uint8_t scale_bytes[kBlocks] = {};
    if (r < p.rows) {
      const int64_t row = static_cast<int64_t>(b) * p.rows + r;
      uint2* out = reinterpret_cast<uint2*>(p.q + row * (p.cols / 2) + k * 8);
      const float global_scale = p.global_scale[b];
#pragma unroll
      for (int i = 0; i < kBlocks; ++i) scale_bytes[i] = QuantizeBlock(v[2 * i], v[2 * i + 1], global_scale, out + i);
    }
    uint8_t* scales = p.scales + static_cast<int64_t>(b) * p.padded_rows * p.padded_scale_cols;
    const uint32_t k_tiles = static_cast<uint32_t>(p.padded_scale_cols / 4);
#pragma unroll
    for (int i = 0; i < kBlocks; ++i) scales[SwizzledOffset(r, k + i, k_tiles)] = scale_bytes[i];
    if (k + kBlocks == p.cols / 16) {
      for (uint32_t kk = k + kBlocks; kk < p.padded_scale_cols; ++kk) scales[SwizzledOffset(r, kk, k_tiles)] = 0;
    }
  }
};

// Persistent grid: each thread walks items with a grid stride and loads the next item before rounding
// the current one, so memory stays busy while the (integer-heavy) e2m1 rounding runs. Indices fit 32 bits
// (the launcher checks).
template <typename T, int kBlocks>
__global__ void __launch_bounds__(256) Nvfp4QuantKernel(Nvfp4QuantParams p, uint32_t num_items) {
  const uint32_t stride = gridDim.x * blockDim.x;
  uint32_t item = blockIdx.x * blockDim.x + threadIdx.x;
  if (item >= num_items) return;
  Nvfp4Item<T, kBlocks> current, next;
  current.Load(p, item);
  for (; item < num_items; item += stride) {
    const bool more = item + stride < num_items;
    if (more) next.Load(p, item + stride);
    current.Store(p);
    if (more) current = next;
  }
}

template <typename T, int kBlocks>
cudaError_t LaunchPersistent(const Nvfp4QuantParams& p, uint32_t items, cudaStream_t stream) {
  constexpr int kThreads = 256;
  int device = 0, sms = 0, blocks_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, Nvfp4QuantKernel<T, kBlocks>, kThreads, 0);
  }
  if (err != cudaSuccess) return err;
  const uint32_t needed = (items + kThreads - 1) / kThreads;
  const uint32_t grid = std::min<uint32_t>(needed, static_cast<uint32_t>(sms * std::max(blocks_per_sm, 1)));
  Nvfp4QuantKernel<T, kBlocks><<<grid, kThreads, 0, stream>>>(p, items);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchTyped(const Nvfp4QuantParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.padded_rows * (p.cols / 16);
  if (blocks == 0) return cudaSuccess;
  if (blocks >= (int64_t{1} << 32)) return cudaErrorInvalidValue;
  // Two blocks per item (64 bytes per load batch) where rows have an even number of blocks.
  if ((p.cols / 16) % 2 == 0) return LaunchPersistent<T, 2>(p, static_cast<uint32_t>(blocks / 2), stream);
  return LaunchPersistent<T, 1>(p, static_cast<uint32_t>(blocks), stream);
}

}  // namespace

cudaError_t LaunchNvfp4Quant(const Nvfp4QuantParams& p, cudaStream_t stream) {
  if (p.cols % 16 != 0 || p.in_type == FloatType::kF32) return cudaErrorInvalidValue;
  return p.in_type == FloatType::kF16 ? LaunchTyped<__half>(p, stream) : LaunchTyped<__nv_bfloat16>(p, stream);
}

}  // namespace jaxq
