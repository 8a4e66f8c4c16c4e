// Every activation-quantization kernel variant once on small inputs, outside XLA, for compute-sanitizer (memcheck
// under the XLA process crashed inside compute-sanitizer on the H100, 2026-12-07): per_token_group_fp8_quant's
// input types, fp8 and int8 outputs, scale layouts (row-major, column-major, packed UE8M0) and group sizes (each
// vectors-per-lane form), and scaled_fp4_quant with one, two and four blocks per thread. Each buffer is its own
// cudaMalloc of the exact size, so that memcheck sees overruns. Build here, run on the device:
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc \
//     tools/sanitize/activation_kernels.cu csrc/kernels/group_quant.cu csrc/kernels/nvfp4_quant.cu \
//     -o tools/sanitize/bin/activation_kernels
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/group_quant.h"
#include "kernels/nvfp4_quant.h"
#include "../weight_only_ab/timing.cuh"  // CHECK

namespace {

std::mt19937 rng(3);

// `elements` random values of `type`: 16-bit patterns with small exponents (finite in float16 and bfloat16), or
// float32 values whose high halves are such patterns.
void* RandomInput(size_t elements, jaxq::FloatType type) {
  std::vector<uint16_t> halves(type == jaxq::FloatType::kF32 ? elements * 2 : elements);
  for (size_t i = 0; i < halves.size(); ++i) {
    halves[i] = type == jaxq::FloatType::kF32 && i % 2 == 0 ? static_cast<uint16_t>(rng())
                                                             : static_cast<uint16_t>(0x3000 + rng() % 0x1000) |
                                                                   static_cast<uint16_t>((rng() & 1) << 15);
  }
  void* device;
  CHECK(cudaMalloc(&device, halves.size() * 2));
  CHECK(cudaMemcpy(device, halves.data(), halves.size() * 2, cudaMemcpyHostToDevice));
  return device;
}

void GroupQuant(jaxq::FloatType type, jaxq::Quant8Type out, jaxq::ScaleLayout layout, int64_t batch, int64_t rows,
                int64_t cols, int64_t group_size) {
  if (!jaxq::GroupQuantSupports(type, group_size)) return;
  jaxq::GroupQuantParams p{};
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.group_size = group_size;
  p.padded_rows = (rows + 3) / 4 * 4;
  p.eps = 1e-10f;
  p.ue8m0 = layout == jaxq::ScaleLayout::kPackedUe8m0;
  p.in_type = type;
  p.out_type = out;
  p.layout = layout;
  const int64_t groups = cols / group_size;
  const int64_t scale_bytes = layout == jaxq::ScaleLayout::kRowMajor      ? batch * rows * groups * 4
                              : layout == jaxq::ScaleLayout::kColumnMajor ? batch * groups * p.padded_rows * 4
                                                                          : batch * ((groups + 3) / 4) * p.padded_rows * 4;
  p.x = RandomInput(batch * rows * cols, type);
  CHECK(cudaMalloc(&p.q, batch * rows * cols));
  CHECK(cudaMalloc(&p.scales, scale_bytes));
  CHECK(jaxq::LaunchGroupQuant(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaFree(const_cast<void*>(p.x)));
  CHECK(cudaFree(p.q));
  CHECK(cudaFree(p.scales));
}

void Nvfp4Quant(jaxq::FloatType type, int64_t batch, int64_t rows, int64_t cols) {
  jaxq::Nvfp4QuantParams p{};
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.padded_rows = (rows + 127) / 128 * 128;
  p.padded_scale_cols = (cols / 16 + 3) / 4 * 4;
  p.in_type = type;
  p.x = RandomInput(batch * rows * cols, type);
  std::vector<float> global(batch, 1.5f);
  float* global_scale;
  CHECK(cudaMalloc(&global_scale, batch * 4));
  CHECK(cudaMemcpy(global_scale, global.data(), batch * 4, cudaMemcpyHostToDevice));
  p.global_scale = global_scale;
  CHECK(cudaMalloc(&p.q, batch * rows * cols / 2));
  CHECK(cudaMalloc(&p.scales, batch * p.padded_rows * p.padded_scale_cols));
  CHECK(jaxq::LaunchNvfp4Quant(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaFree(const_cast<void*>(p.x)));
  CHECK(cudaFree(global_scale));
  CHECK(cudaFree(p.q));
  CHECK(cudaFree(p.scales));
}

}  // namespace

int main() {
  using jaxq::FloatType;
  for (FloatType type : {FloatType::kBF16, FloatType::kF16, FloatType::kF32}) {
    for (auto out : {jaxq::Quant8Type::kFp8E4M3, jaxq::Quant8Type::kInt8}) {
      for (auto layout : {jaxq::ScaleLayout::kRowMajor, jaxq::ScaleLayout::kColumnMajor,
                          jaxq::ScaleLayout::kPackedUe8m0}) {
        // Group sizes with four, two and one vectors per lane and the looping form (96: six vectors).
        for (int64_t group_size : {16, 32, 96, 128, 1024}) {
          GroupQuant(type, out, layout, 2, 33, 3072, group_size);
          GroupQuant(type, out, layout, 1, 1, group_size * 5, group_size);
        }
      }
    }
    if (type == FloatType::kF32) continue;
    for (int64_t cols : {80, 96, 128, 7168}) {  // one, two, four and four blocks per thread
      Nvfp4Quant(type, 1, 1, cols);
      Nvfp4Quant(type, 3, 130, cols);
    }
  }
  std::printf("ran every activation kernel variant\n");
  return 0;
}
