// How fast the weight-only GEMM's weight reads stream with no arithmetic: cp.async copies of a GPTQ-shaped weight
// (K8192 N28672 4-bit: 1024 word rows of 112 KB) into a 3-stage ring per warp, as the kernel does, then one XOR.
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a tools/weight_only_ab/stream.cu -o stream && ./stream
// Blocks of 4 warps read a strip of `Width` bytes of every word row over their K range (K split over enough blocks
// per strip for 224 blocks); a warp step reads 2 KB. Map 0 is the kernel's (lane g: 64 bytes at 64 g of a 512-byte
// strip, 16 at a time; lane t: row t, so each copy instruction touches 16 lines in 4 rows); map 1 takes the step's
// 2 KB in order, each copy instruction one contiguous 512 bytes. Desync starts each block's K range at a
// block-dependent step, as blocks drift apart when they compute; spin adds dependent integer work per step.
// Results: benchmarks/RESULTS.md (2026-11-30, "what limits the M16 weight-only kernel").
#include <cstdint>
#include <cstdio>

#include "timing.cuh"

constexpr int kStages = 3;  // of the ring, 2 KB per warp each, as in the kernel for 4-bit weights

__device__ __forceinline__ void CopyAsync(uint32_t s, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src));
}

template <int Width, int Map>
__global__ void __launch_bounds__(128) Strip(const uint8_t* qw, int rows, int row_bytes, int splits, int desync, int spin, uint32_t* out) {
  extern __shared__ uint4 smem[];
  constexpr int kRowsPerStep = 2048 / Width;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int strip = blockIdx.x / splits, split = blockIdx.x % splits;
  const int block_rows = rows / splits, warp_rows = block_rows / 4;
  const int steps = warp_rows / kRowsPerStep;
  const int first_row = split * block_rows + warp * warp_rows;
  const int rot = desync ? (blockIdx.x * 7919) % steps : 0;
  int64_t offs[4];
  for (int u = 0; u < 4; ++u) {
    int row, col;
    if (Map == 0) {  // Width 512 only
      row = lane % 4, col = 64 * (lane / 4) + 16 * u;
    } else {
      const int f = (u * 32 + lane) * 16;
      row = f / Width, col = f % Width;
    }
    offs[u] = static_cast<int64_t>(row) * row_bytes + strip * Width + col;
  }
  uint4* ring = smem + warp * kStages * 128 + lane;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  auto issue = [&](int i) {
    const int step = (i + rot) % steps;
    const uint8_t* base = qw + static_cast<int64_t>(first_row + step * kRowsPerStep) * row_bytes;
    const uint32_t s = ring_s + (i % kStages) * 2048;
#pragma unroll
    for (int u = 0; u < 4; ++u) CopyAsync(s + u * 512, base + offs[u]);
  };
  for (int i = 0; i < kStages - 1; ++i) { if (i < steps) issue(i); asm volatile("cp.async.commit_group;"); }
  uint32_t acc = 0;
  for (int i = 0; i < steps; ++i) {
    if (i + kStages - 1 < steps) issue(i + kStages - 1);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1));
    const uint4* r = ring + (i % kStages) * 128;
#pragma unroll
    for (int u = 0; u < 4; ++u) { const uint4 v = r[u * 32]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    for (int j = 0; j < spin; ++j) acc = acc * 1664525u + 1013904223u;
  }
  out[blockIdx.x * 128 + threadIdx.x] = acc;
}

int main() {
  const int k = 8192, n = 28672, rows = k / 8, row_bytes = n * 4;
  const size_t bytes = static_cast<size_t>(rows) * row_bytes;
  uint8_t* qw[tool_timing::kCopies];
  uint32_t* out;
  for (auto& p : qw) { CHECK(cudaMalloc(&p, bytes)); CHECK(cudaMemset(p, 1, bytes)); }
  CHECK(cudaMalloc(&out, 1 << 24));
  const double bw = tool_timing::CopyBandwidth();
  printf("copy %.0f GB/s\n", bw / 1e9);
  auto run = [&](const char* name, auto kernel, int width, int desync, int spin) {
    const int strips = row_bytes / width;
    const int splits = (224 + strips - 1) / strips;
    const int smem = 4 * kStages * 2048;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float us = tool_timing::BestMicroseconds([&](int c) { kernel<<<strips * splits, 128, smem>>>(qw[c], rows, row_bytes, splits, desync, spin, out); });
    CHECK(cudaGetLastError());
    printf("%-24s width %4d splits %d desync %d spin %3d: %6.1f us %5.1f%%\n", name, width, splits, desync, spin, us, 100 * bytes / (us * 1e-6) / bw);
  };
  for (int spin : {0, 100}) {
    for (int d : {0, 1}) {
      run("map jaxq", Strip<512, 0>, 512, d, spin);
      run("map rows", Strip<512, 1>, 512, d, spin);
      run("map rows", Strip<1024, 1>, 1024, d, spin);
      run("map rows", Strip<2048, 1>, 2048, d, spin);
    }
  }
  return 0;
}
