// Device helpers shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace jaxq {

// One 16-byte vector of T kept as raw bits (4 registers) and widened to float element by element when
// used, so that several vectors per thread fit in registers.
template <typename T>
struct Vec16 {
  static constexpr int kLen = 16 / sizeof(T);
  uint4 raw;

  __device__ __forceinline__ void Load(const T* p) { raw = __ldg(reinterpret_cast<const uint4*>(p)); }

  __device__ __forceinline__ uint32_t Word(int w) const {
    return w == 0 ? raw.x : w == 1 ? raw.y : w == 2 ? raw.z : raw.w;
  }

  // Element i as float (i a compile-time constant after unrolling).
  __device__ __forceinline__ float operator[](int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(Word(i));
    } else {
      const uint32_t word = Word(i / 2);
      const uint16_t half_bits = static_cast<uint16_t>(i % 2 ? word >> 16 : word & 0xffffu);
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return __uint_as_float(static_cast<uint32_t>(half_bits) << 16);
      } else {
        return __half2float(__ushort_as_half(half_bits));
      }
    }
  }

  // max(m, |elements|); 16-bit types compare in pairs (exact: the max is one of the inputs).
  __device__ __forceinline__ float AbsMax(float m) const {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < kLen; ++i) m = fmaxf(m, fabsf((*this)[i]));
      return m;
    } else {
      using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
      auto pair = [&](int w) {
        const uint32_t word = Word(w);
        return __habs2(*reinterpret_cast<const T2*>(&word));
      };
      const T2 top = __hmax2(__hmax2(pair(0), pair(1)), __hmax2(pair(2), pair(3)));
      return fmaxf(m, fmaxf(static_cast<float>(top.x), static_cast<float>(top.y)));
    }
  }
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

// d += a * b on the tensor cores (mma.m16n8k16, T = __half or __nv_bfloat16 operands, float32 sums).
template <typename T>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Copies `Bytes` (4, 8 or 16) from global memory to shared-window address `s` without holding registers;
// src_bytes = 0 fills zeros instead (rows of x past M, columns past the block's). Streaming copies (weights: read
// once) bypass L1; with LinePrefetch they also have L2 fetch the whole 128-byte line around them.
template <int Bytes, bool Streaming, bool LinePrefetch = false>
__device__ __forceinline__ void CopyAsync(uint32_t s, const void* src, int src_bytes) {
  if constexpr (Streaming && LinePrefetch) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(src_bytes));
  } else if constexpr (Streaming) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(s), "l"(src), "n"(Bytes), "r"(src_bytes));
  }
}

__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;"); }

template <int Pending>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending));
}

}  // namespace jaxq
