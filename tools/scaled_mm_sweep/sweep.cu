// Times scaled-GEMM tile configurations against each other on the device, outside JAX, and checks each one's
// result on sampled outputs against an fp32 dot product. The configurations are listed in configs.txt; run.sh
// compiles one translation unit per configuration (as the package does) and this driver.
//   usage: scaled_mm_sweep fp8|int8:M,K,N ...
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/scaled_mm.h"
#include "sweep_registry.h"

namespace {

#define CHECK_CUDA(call)                                                                  \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

__device__ uint32_t Hash(uint64_t i, uint32_t seed) {
  uint64_t x = i * 0x9E3779B97F4A7C15ull + seed;
  x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 29;
  return static_cast<uint32_t>(x >> 16);
}

__device__ float Uniform(uint64_t i, uint32_t seed) { return Hash(i, seed) * (2.f / 4294967296.f) - 1.f; }

// fp8: uniform in [-2, 2) rounded to e4m3; int8: uniform integers in [-127, 127].
__global__ void FillOperand(uint8_t* out, int64_t count, bool fp8, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    if (fp8) {
      out[i] = __nv_cvt_float_to_fp8(2.f * Uniform(i, seed), __NV_SATFINITE, __NV_E4M3);
    } else {
      out[i] = static_cast<uint8_t>(static_cast<int8_t>(Hash(i, seed) % 255u) - 127);
    }
  }
}

__global__ void FillScale(float* out, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = (1.f + 0.5f * Uniform(i, seed)) / 64.f;
  }
}

__device__ float OperandValue(uint8_t v, bool fp8) {
  if (!fp8) return static_cast<float>(static_cast<int8_t>(v));
  const __half_raw h = __nv_cvt_fp8_to_halfraw(v, __NV_E4M3);
  return __half2float(__half(h));
}

// out[s] = bf16(s_a[m] s_b[n] sum_k a[m, k] b[n, k]) for sampled (m, n), the sum in float64.
__global__ void SampleReference(const uint8_t* a, const uint8_t* b, const float* sa, const float* sb, int64_t m,
                                int64_t n, int64_t k, bool fp8, int samples, uint32_t seed, float* ref, float* got,
                                const __nv_bfloat16* d) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= samples) return;
  const int64_t row = Hash(s, seed) % m, col = Hash(s, seed + 1) % n;
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += double(OperandValue(a[row * k + i], fp8)) * OperandValue(b[col * k + i], fp8);
  ref[s] = __bfloat162float(__float2bfloat16(static_cast<float>(sa[row] * (sb[col] * sum))));
  got[s] = __bfloat162float(d[row * n + col]);
}

struct Shape {
  int64_t m, k, n;
};

void Run(const SweepEntry& entry, const Shape& shape, bool fp8) {
  const int64_t m = shape.m, k = shape.k, n = shape.n;
  uint8_t *a, *b;
  float *sa, *sb;
  __nv_bfloat16* d;
  CHECK_CUDA(cudaMalloc(&a, m * k));
  CHECK_CUDA(cudaMalloc(&b, n * k));
  CHECK_CUDA(cudaMalloc(&sa, m * 4));
  CHECK_CUDA(cudaMalloc(&sb, n * 4));
  CHECK_CUDA(cudaMalloc(&d, m * n * 2));
  FillOperand<<<1024, 256>>>(a, m * k, fp8, 1);
  FillOperand<<<1024, 256>>>(b, n * k, fp8, 2);
  FillScale<<<64, 256>>>(sa, m, 3);
  FillScale<<<64, 256>>>(sb, n, 4);
  CHECK_CUDA(cudaMemset(d, 0xff, m * n * 2));

  jaxq::ScaledMmParams p;
  p.operand = fp8 ? jaxq::MmOperand::kFp8E4M3 : jaxq::MmOperand::kInt8;
  p.out_type = jaxq::FloatType::kBF16;
  p.a = a, p.b = b, p.scale_a = sa, p.scale_b = sb, p.scale_a_per_row = true, p.scale_b_per_col = true;
  p.d = d, p.m = m, p.n = n, p.k = k;
  cudaError_t err = entry.run(p, nullptr);
  if (err != cudaSuccess) {
    std::printf("%-34s M%-5lld K%-5lld N%-6lld %s\n", entry.name, (long long)m, (long long)k, (long long)n,
                cudaGetErrorString(err));
    cudaGetLastError();
  } else {
    CHECK_CUDA(cudaDeviceSynchronize());
    constexpr int kSamples = 4096;
    float *ref, *got;
    CHECK_CUDA(cudaMallocManaged(&ref, kSamples * 4));
    CHECK_CUDA(cudaMallocManaged(&got, kSamples * 4));
    SampleReference<<<kSamples / 128, 128>>>(a, b, sa, sb, m, n, k, fp8, kSamples, 5, ref, got, d);
    CHECK_CUDA(cudaDeviceSynchronize());
    double err2 = 0, ref2 = 0;
    for (int s = 0; s < kSamples; ++s) err2 += double(got[s] - ref[s]) * (got[s] - ref[s]), ref2 += double(ref[s]) * ref[s];
    cudaFree(ref);
    cudaFree(got);

    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    const int iters = m * n * k > (int64_t{1} << 38) ? 20 : 100;
    for (int i = 0; i < 3; ++i) entry.run(p, nullptr);
    float best = 1e30f;
    for (int rep = 0; rep < 3; ++rep) {
      cudaEventRecord(start);
      for (int i = 0; i < iters; ++i) entry.run(p, nullptr);
      cudaEventRecord(stop);
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms;
      cudaEventElapsedTime(&ms, start, stop);
      best = std::min(best, ms * 1000.f / iters);
    }
    std::printf("%-34s M%-5lld K%-5lld N%-6lld %9.1f us %7.0f T/s  rel L2 %.2e%s\n", entry.name, (long long)m,
                (long long)k, (long long)n, best, 2.0 * m * n * k / best / 1e6, std::sqrt(err2 / ref2), entry.spills);
  }
  cudaFree(a), cudaFree(b), cudaFree(sa), cudaFree(sb), cudaFree(d);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s fp8|int8:M,K,N ...\n", argv[0]);
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    char kind[8] = {};
    Shape shape;
    if (std::sscanf(argv[i], "%7[^:]:%lld,%lld,%lld", kind, (long long*)&shape.m, (long long*)&shape.k,
                    (long long*)&shape.n) != 4 ||
        (std::strcmp(kind, "fp8") && std::strcmp(kind, "int8"))) {
      std::fprintf(stderr, "bad spec %s: want fp8|int8:M,K,N\n", argv[i]);
      return 2;
    }
    const bool fp8 = std::strcmp(kind, "fp8") == 0;
    const auto operand = fp8 ? jaxq::MmOperand::kFp8E4M3 : jaxq::MmOperand::kInt8;
    for (int e = 0; e < kSweepEntryCount; ++e) {
      if (kSweepEntries[e].operand == operand) Run(kSweepEntries[e], shape, fp8);
    }
  }
  return 0;
}
