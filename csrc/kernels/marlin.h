// Weight-only GEMM on weights in vLLM's Marlin layout (jaxq/ops/marlin.py describes the layout and types).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/types.h"

namespace jaxq {

// FP4 (e2m1 codes) comes in two forms: NVFP4 (e4m3 scales per 16 rows, kept as vLLM's bytes, and a global
// scale) and MXFP4 (e8m0 exponents per 32 rows; bfloat16 activations).
enum class MarlinType : int32_t { kU4B8 = 0, kU4 = 1, kU8B128 = 2, kFp8E4M3 = 3, kNvFp4 = 4, kMxFp4 = 5 };

// How the weight's tensors are laid out: vLLM's Marlin layout (below); a 4-bit GPTQ checkpoint's after exllama's
// shuffle (b_q [k / 8, n]: eight rows of a column per word, even rows in the low half-word; zero points
// [groups, n / 8] in column order); or AutoAWQ's (b_q [k, n / 8] and zero points [groups, n / 8]: eight columns
// per word in AWQ's order). Both with scales [groups, n] in column order; the Hopper kernel reads them for
// gptq_gemm and awq_gemm.
enum class WeightLayout : int32_t { kMarlin = 0, kGptqExllama = 1, kAwq = 2 };

struct MarlinParams {
  FloatType type = FloatType::kBF16;  // of a, the scales, the bias and the output
  MarlinType weight = MarlinType::kU4B8;
  const void* a = nullptr;            // [m, k] (columns already in perm order for act-order)
  const uint32_t* b_q = nullptr;      // [k / 16, n * 16 * bits / 32]
  const void* scales = nullptr;       // [groups, n], permuted per 64 columns (per 32 with one group); FP4: bytes
  const float* global_scale = nullptr;  // [1] for kNvFp4, else null (LaunchMarlinDequantize leaves it out)
  const uint32_t* zeros = nullptr;    // [groups, n / 8] for kU4, else null
  const int32_t* g_idx = nullptr;     // [k] group of each row (act-order; clamped to [0, groups)), or null
  const void* bias = nullptr;         // [n] or null
  void* out = nullptr;                // [m, n]
  int64_t m = 0;
  int k = 0, n = 0, groups = 1;
  // The scales are in the one-group (per-channel) column order. A row-parallel shard of a grouped weight can
  // hold one group and keeps the grouped order, so this is the layout's, not groups == 1.
  bool per_channel = false;
  // One kernel configuration for every m (vLLM's batch-invariant mode): up to 8 rows no longer fold the scales in
  // float32 (faster, but a row's result then differs between at most 8 and more rows).
  bool batch_invariant = false;
  // m from this many rows runs the Hopper kernel (LaunchMarlinGemmHopper) where it supports the weight and the
  // GPU is an sm_90; 0: never. marlin_gemm's Python side sets it, so that the dispatch buckets are its own.
  int64_t hopper_from_rows = 0;
  WeightLayout layout = WeightLayout::kMarlin;  // the others: the Hopper kernel only, kU4 with zero points
  int zero_offset = 0;                          // added to the zero points (GPTQ v1 checkpoints store zero - 1)
};

int MarlinBits(MarlinType t);

// How a launch cuts the output: 64-column tiles per block, and blocks that share a tile's K range (a
// thread-block cluster). A function of n, k and the SM count only, so that a row's result never depends on m.
struct MarlinPlan {
  int tiles_per_block = 1;
  int splits = 1;
};
MarlinPlan PlanMarlin(int n, int k, int sm_count);

// out = W [k, n] (rows in the layout's order), dequantized exactly as LaunchMarlinGemm multiplies by it (NVFP4:
// without the global scale); a, m, bias and global_scale are not read.
cudaError_t LaunchMarlinDequantize(const MarlinParams& p, cudaStream_t stream);

// out = a @ W (+ bias) with float32 sums. Up to 8 rows (without act-order or batch_invariant) the codes are
// multiplied unscaled and each group's sums scaled in float32; otherwise W is dequantized in registers and
// rounded to the activations' type, exactly as LaunchMarlinDequantize writes it.
// Needs sm_90 for K splits (their partial sums meet in a thread-block cluster's shared memory).
cudaError_t LaunchMarlinGemm(const MarlinParams& p, cudaStream_t stream);

// The wgmma kernel (sm_90a): every weight type without act-order, N a multiple of 128, K of 64, groups of 32 rows
// or more (or one; FP4: its format's), float16 or bfloat16 (MXFP4: bfloat16). W rounded to a's type as in
// LaunchMarlinGemm's second form, float32 sums; a row's result is the same for every m (its K split is a function
// of K, N and the SM count).
bool MarlinHopperSupports(const MarlinParams& p);
cudaError_t LaunchMarlinGemmHopper(const MarlinParams& p, cudaStream_t stream);

}  // namespace jaxq
