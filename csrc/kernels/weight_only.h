// Weight-only quantized GEMM and dequantization for AutoAWQ and AutoGPTQ weights (4-bit AWQ; 2/3/4/8-bit
// GPTQ in its own or exllama's layout). Formats are described in jaxq/formats.py.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/types.h"

namespace jaxq {

enum class WeightFormat : int32_t { kAwq = 0, kGptq = 1, kGptqExllama = 2 };

struct WeightOnlyParams {
  FloatType type = FloatType::kBF16;  // of x, scales and the output (float16 or bfloat16)
  WeightFormat format = WeightFormat::kAwq;
  int bits = 4;
  int zero_offset = 0;  // added to stored zeros (1 for GPTQ v1 checkpoints)
  const void* x = nullptr;  // [m, k], GEMM only
  const uint32_t* qweight = nullptr;
  const uint32_t* qzeros = nullptr;
  const void* scales = nullptr;     // [groups, n]
  const int32_t* g_idx = nullptr;   // dequantization only: group of each row (clamped to [0, groups)); null means k / group size
  void* out = nullptr;              // [m, n] (GEMM) or [k, n] (dequantization)
  uint32_t* workspace = nullptr;    // GEMM: WeightOnlyWorkspaceWords(m, n, split_k) words
  int64_t m = 0, n = 0, k = 0, groups = 1;
};

// K rows one warp covers per step (the unit of the K split).
int WeightOnlySlabK(WeightFormat format, int bits);
// Words of workspace the GEMM needs: float32 partial sums when K is split, then arrival counters.
int64_t WeightOnlyWorkspaceWords(int64_t m, int64_t n, int split_k);
// Whether the GEMM kernel handles these sizes (the dequantizer handles every valid format).
bool WeightOnlyGemmSupports(const WeightOnlyParams& p);

// out[m, n] = x @ W with W dequantized in registers; K split over `split_k` blocks per column tile, whose
// partial sums the last block to finish adds in split order. With split_k > 1 the launcher clears the
// workspace's arrival counters on the stream first.
cudaError_t LaunchWeightOnlyGemm(const WeightOnlyParams& p, int split_k, cudaStream_t stream);

// out[k, n] = W in the scales' dtype.
cudaError_t LaunchWeightDequantize(const WeightOnlyParams& p, cudaStream_t stream);

}  // namespace jaxq
