// Device helpers shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace jaxq {

// Loads one 16-byte vector of T and widens it to float.
template <typename T>
struct Vec16 {
  static constexpr int kLen = 16 / sizeof(T);
  float v[kLen];

  __device__ __forceinline__ void Load(const T* p) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kLen; ++i) v[i] = ToFloat(e[i]);
  }
  __device__ __forceinline__ float AbsMax(float m) const {
#pragma unroll
    for (int i = 0; i < kLen; ++i) m = fmaxf(m, fabsf(v[i]));
    return m;
  }
  static __device__ __forceinline__ float ToFloat(float x) { return x; }
  static __device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Max over the `lanes` consecutive lanes (a power of two <= 32) that share a group.
__device__ __forceinline__ float TeamMax(float v, int lanes) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (lane & ~(lanes - 1));
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(mask, v, offset));
  return v;
}

// UE8M0 rounding: the float32 exponent field, plus one when the mantissa is non-zero
// (== exp2(ceil(log2(max(|s|, 1e-10)))) bit for bit, without transcendental functions).
__device__ __forceinline__ uint32_t Ue8m0Exponent(float s) {
  const uint32_t bits = __float_as_uint(fmaxf(fabsf(s), 1e-10f));
  return ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
}

}  // namespace jaxq
