#include <cuda_fp8.h>

#include "kernels/device_utils.cuh"
#include "kernels/group_quant.h"

namespace jaxq {
namespace {

template <typename Q>
struct Quant8;

template <>
struct Quant8<__nv_fp8_e4m3> {
  static constexpr float kMax = 448.f;
  // Round to nearest even, saturating to +-448 (the clamp before it already bounds the value).
  static __device__ __forceinline__ uint32_t Encode(float v) { return __nv_fp8_e4m3(v).__x; }
};

template <>
struct Quant8<int8_t> {
  static constexpr float kMax = 127.f;
  // vLLM converts with a C cast: truncation toward zero.
  static __device__ __forceinline__ uint32_t Encode(float v) {
    return static_cast<uint8_t>(static_cast<int8_t>(v));
  }
};

// Indices fit 32 bits (the launcher checks), which keeps the divisions below cheap.
__device__ void WriteScale(const GroupQuantParams& p, uint32_t group, float scale, uint32_t exponent) {
  if (p.layout == ScaleLayout::kRowMajor) {
    static_cast<float*>(p.scales)[group] = scale;
    return;
  }
  const uint32_t groups_per_row = static_cast<uint32_t>(p.cols / p.group_size);
  const uint32_t rows = static_cast<uint32_t>(p.rows), padded_rows = static_cast<uint32_t>(p.padded_rows);
  const uint32_t row = group / groups_per_row, g = group % groups_per_row;
  const uint32_t b = row / rows, m = row % rows;
  // The last real row also clears the padding rows below it, so no separate memset is needed.
  const uint32_t m_end = m == rows - 1 ? padded_rows : m + 1;
  if (p.layout == ScaleLayout::kColumnMajor) {
    float* column = static_cast<float*>(p.scales) + (static_cast<int64_t>(b) * groups_per_row + g) * padded_rows;
    for (uint32_t mm = m; mm < m_end; ++mm) column[mm] = mm == m ? scale : 0.f;
    return;
  }
  const uint32_t words_per_row = (groups_per_row + 3) / 4;
  uint8_t* bytes = static_cast<uint8_t*>(p.scales) + static_cast<int64_t>(b) * words_per_row * padded_rows * 4;
  auto byte_at = [&](uint32_t mm, uint32_t gg) -> uint8_t& {
    return bytes[(static_cast<int64_t>(gg / 4) * padded_rows + mm) * 4 + gg % 4];
  };
  const uint32_t g_end = g == groups_per_row - 1 ? words_per_row * 4 : g + 1;
  for (uint32_t mm = m; mm < m_end; ++mm) {
    for (uint32_t gg = g; gg < g_end; ++gg) {
      byte_at(mm, gg) = (mm == m && gg == g) ? static_cast<uint8_t>(exponent) : 0;
    }
  }
}

// x / divisor as IEEE division (vLLM divides: a quotient's last bit decides fp8 and int8 ties) in three
// instructions instead of CUDA's ten: the reciprocal refined once per group (the approximation and Newton step
// CUDA's division repeats per element), then per element the product, its exact residual and one correction,
// the fast path of CUDA's own division. For divisors in [2^-80, 2^80] (Exact) it gives the IEEE quotient of every
// normal dividend (tools/reciprocal_division_check.cc: 2e8 random and near-tie operands, reciprocal seeds up to two
// ulps off, rcp.approx's bound being one); a denormal dividend's quotient (below 2^-46) may be one ulp off and
// encodes as zero either way. The sign is the dividend's (the divisor is positive), so -0 stays -0.
struct ReciprocalDivide {
  float divisor, reciprocal;
  static __device__ __forceinline__ bool Exact(float divisor) { return divisor >= 0x1p-80f && divisor <= 0x1p80f; }
  __device__ __forceinline__ explicit ReciprocalDivide(float d) : divisor(d) {
    float seed;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(seed) : "f"(d));
    reciprocal = __fmaf_rn(seed, __fmaf_rn(seed, -d, 1.f), seed);
  }
  __device__ __forceinline__ float operator()(float x) const {
    const float q = __fmul_rn(x, reciprocal);
    return copysignf(__fmaf_rn(__fmaf_rn(-q, divisor, x), reciprocal, q), x);
  }
};

// The other divisors (zero, non-finite, extreme: groups of zeros with eps = 0, infinities) divide per element.
struct PlainDivide {
  float divisor;
  __device__ __forceinline__ float operator()(float x) const { return x / divisor; }
};

template <typename T, typename Q, typename Divide>
__device__ __forceinline__ void QuantizeVec(const Vec16<T>& v, const Divide& divide, uint8_t* out) {
  constexpr int kLen = Vec16<T>::kLen;
  uint32_t words[kLen / 4] = {};
#pragma unroll
  for (int i = 0; i < kLen; ++i) {
    const float q = fminf(fmaxf(divide(v[i]), -Quant8<Q>::kMax), Quant8<Q>::kMax);
    words[i / 4] |= Quant8<Q>::Encode(q) << (8 * (i % 4));
  }
  if constexpr (kLen == 8) {
    *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint32_t*>(out) = words[0];
  }
}

// A team of `lanes` consecutive threads quantizes one group, the teams of a block consecutive groups.
// With kVecsPerLane > 0 each lane keeps its kVecsPerLane 16-byte vectors in registers between the max
// and the quantize pass (all loads issued before any use); with 0 (group sizes whose vector count has
// no such split) each lane loops and reloads its vectors, which L1 still holds.
template <typename T, typename Q, int kVecsPerLane>
__global__ void __launch_bounds__(256) GroupQuantKernel(GroupQuantParams p, int lanes, uint32_t num_groups) {
  using V = Vec16<T>;
  const uint32_t group = blockIdx.x * (blockDim.x / lanes) + threadIdx.x / lanes;
  if (group >= num_groups) return;  // whole teams leave together, so TeamMax's mask stays valid
  const int lane = threadIdx.x & (lanes - 1);
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(group) * p.group_size;
  uint8_t* q = static_cast<uint8_t*>(p.q) + static_cast<int64_t>(group) * p.group_size;
  const int vecs = static_cast<int>(p.group_size / V::kLen);

  float amax = p.eps;
  V regs[kVecsPerLane > 0 ? kVecsPerLane : 1];
  if constexpr (kVecsPerLane > 0) {
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) regs[i].Load(x + (i * lanes + lane) * V::kLen);
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) amax = regs[i].AbsMax(amax);
  } else {
    for (int i = lane; i < vecs; i += lanes) {
      regs[0].Load(x + i * V::kLen);
      amax = regs[0].AbsMax(amax);
    }
  }
  amax = TeamMax(amax, lanes);

  float scale = amax / Quant8<Q>::kMax;
  uint32_t exponent = 0;
  if (p.ue8m0 || p.layout == ScaleLayout::kPackedUe8m0) {
    exponent = Ue8m0Exponent(scale);
    scale = __uint_as_float(exponent << 23);
  }
  if (lane == 0) WriteScale(p, group, scale, exponent);

  auto quantize = [&](const auto& divide) {
    if constexpr (kVecsPerLane > 0) {
#pragma unroll
      for (int i = 0; i < kVecsPerLane; ++i) QuantizeVec<T, Q>(regs[i], divide, q + (i * lanes + lane) * V::kLen);
    } else {
      for (int i = lane; i < vecs; i += lanes) {
        regs[0].Load(x + i * V::kLen);
        QuantizeVec<T, Q>(regs[0], divide, q + i * V::kLen);
      }
    }
  };
  if (ReciprocalDivide::Exact(scale)) {
    quantize(ReciprocalDivide(scale));
  } else {
    quantize(PlainDivide{scale});
  }
}

bool IsPow2AtMost32(int64_t n) { return n > 0 && n <= 32 && (n & (n - 1)) == 0; }

template <typename T, typename Q>
cudaError_t LaunchTyped(const GroupQuantParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t vecs = p.group_size / Vec16<T>::kLen;
  // Prefer four vectors per lane (64 bytes in flight per thread), then two, then one.
  int vecs_per_lane = 0;
  int lanes = 32;
  for (int candidate : {4, 2, 1}) {
    if (vecs % candidate == 0 && IsPow2AtMost32(vecs / candidate)) {
      vecs_per_lane = candidate;
      lanes = static_cast<int>(vecs / candidate);
      break;
    }
  }
  if (vecs_per_lane == 0) {
    while (vecs % lanes != 0) lanes >>= 1;
  }
  const int64_t num_groups = p.batch * p.rows * (p.cols / p.group_size);
  if (num_groups == 0) return cudaSuccess;
  if (num_groups >= (int64_t{1} << 32) || p.batch * p.padded_rows >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const int64_t teams = kThreads / lanes;
  const dim3 grid(static_cast<unsigned>((num_groups + teams - 1) / teams));
  const auto n = static_cast<uint32_t>(num_groups);
  switch (vecs_per_lane) {
    case 1: GroupQuantKernel<T, Q, 1><<<grid, kThreads, 0, stream>>>(p, lanes, n); break;
    case 2: GroupQuantKernel<T, Q, 2><<<grid, kThreads, 0, stream>>>(p, lanes, n); break;
    case 4: GroupQuantKernel<T, Q, 4><<<grid, kThreads, 0, stream>>>(p, lanes, n); break;
    default: GroupQuantKernel<T, Q, 0><<<grid, kThreads, 0, stream>>>(p, lanes, n); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchForInput(const GroupQuantParams& p, cudaStream_t stream) {
  return p.out_type == Quant8Type::kInt8 ? LaunchTyped<T, int8_t>(p, stream)
                                         : LaunchTyped<T, __nv_fp8_e4m3>(p, stream);
}

}  // namespace

bool GroupQuantSupports(FloatType in_type, int64_t group_size) {
  return group_size > 0 && (group_size * ByteWidth(in_type)) % 16 == 0;
}

cudaError_t LaunchGroupQuant(const GroupQuantParams& p, cudaStream_t stream) {
  if (!GroupQuantSupports(p.in_type, p.group_size) || p.cols % p.group_size != 0) return cudaErrorInvalidValue;
  switch (p.in_type) {
    case FloatType::kF16: return LaunchForInput<__half>(p, stream);
    case FloatType::kBF16: return LaunchForInput<__nv_bfloat16>(p, stream);
    case FloatType::kF32: return LaunchForInput<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jaxq
