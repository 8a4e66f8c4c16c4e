// What the standalone GPU tools share: bf16/fp16 bits of a float, uploading a host vector, and timing: CUDA
// events around 30 calls, best of 5; calls get a rotating index 0..kCopies-1 so that each can use its own copy of
// the weights and none finds the previous call's in L2.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                      \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

namespace tool_timing {

// f rounded to bfloat16 or float16, as its bits.
inline uint16_t HalfBits(float f, bool bf16) {
  uint16_t bits;
  if (bf16) {
    const __nv_bfloat16 b = __float2bfloat16(f);
    std::memcpy(&bits, &b, 2);
  } else {
    const __half h = __float2half(f);
    std::memcpy(&bits, &h, 2);
  }
  return bits;
}

constexpr int kCopies = 3;

// Microseconds per call of fn(copy index).
template <typename Fn>
float BestMicroseconds(Fn&& fn) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {
    CHECK(cudaEventRecord(e0));
    for (int i = 0; i < 30; ++i) fn(i % kCopies);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best = std::fmin(best, ms * 1000.f / 30);
  }
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  return best;
}

// Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB cudaMemcpy.
inline double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *src, *dst;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  const float us = BestMicroseconds([&](int) { CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  return 2.0 * bytes / (us * 1e-6);
}

// A device copy of `host` (freed by the caller).
template <typename X>
X* Upload(const std::vector<X>& host) {
  X* device;
  CHECK(cudaMalloc(&device, host.size() * sizeof(X)));
  CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(X), cudaMemcpyHostToDevice));
  return device;
}

}  // namespace tool_timing
