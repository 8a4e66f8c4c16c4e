// W8A8 GEMMs with scales in the epilogue (vLLM's cutlass_scaled_mm / cutlass_scaled_mm_azp) on Hopper:
// D[m, n] = s_a * (s_b * (acc - azp[m] * azp_adj[n])) + bias[n], acc = A @ B in int32 (int8) or float32 (fp8);
// or, with block-wise scales (fp8), D = sum over 128-deep K blocks kb of s_a[m, kb] * s_b[kb, n / 128] *
// (A_kb @ B_kb) + bias[n].
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/types.h"

namespace jaxq {

enum class MmOperand : int32_t { kInt8 = 0, kFp8E4M3 = 1 };

// M buckets, each with its tile configuration (csrc/kernels/scaled_mm_sm90.cuh). The two small ones compute
// D^T = B^T A^T (N takes the 64-row side of the tensor-core tile, M the narrow one).
enum class ScaledMmTile : int32_t { kM16 = 0, kM64 = 1, kM128 = 2, kLarge = 3 };

struct ScaledMmParams {
  MmOperand operand = MmOperand::kFp8E4M3;
  FloatType out_type = FloatType::kBF16;  // float16 or bfloat16
  const void* a = nullptr;                // [m, k] row-major
  const void* b = nullptr;                // [k, n] column-major, i.e. a row-major [n, k] weight
  const float* scale_a = nullptr;         // [m] when scale_a_per_row, else one value; block: [k/128, m]
  const float* scale_b = nullptr;         // [n] when scale_b_per_col, else one value; block: [k/128, ceil(n/128)]
  bool scale_a_per_row = false;
  bool scale_b_per_col = false;
  bool block_scales = false;              // fp8 only; needs k % 128 == 0 and m % 4 == 0 (TMA reads s_a's rows)
  // fp8 without block scales: for m > 64, CUTLASS's FP8FastAccum schedules, which keep the whole K sum in the
  // tensor core's accumulator instead of adding each k-block's partial sums into float32 registers. For
  // m <= 64 the kernels are bound by reading B and keep the float32 sums.
  bool fast_accum = false;
  const void* bias = nullptr;             // [n] in out_type, or null
  const int32_t* azp_adj = nullptr;       // int8 only: [n], or null (no zero-point term)
  const int32_t* azp = nullptr;           // int8 only: [m] per-token zero points; null: azp_adj is pre-multiplied
  void* d = nullptr;                      // [m, n] row-major
  int64_t m = 0, n = 0, k = 0;
};

ScaledMmTile ChooseScaledMmTile(int64_t m);
// Block-wise scales have two configurations: kM64 (m <= 64) and kLarge.
ScaledMmTile ChooseBlockScaledMmTile(int64_t m);

// Whether the kernels take these sizes: 16-byte aligned rows of A, B and D (K % 16, N % 8); block-wise
// scales also need the conditions above.
bool ScaledMmSupports(const ScaledMmParams& p);

cudaError_t LaunchScaledMm(const ScaledMmParams& p, cudaStream_t stream);

// One instantiation per (operand, output type, tile, fast accumulation); each lives in its own translation unit (the build
// generates them), because one takes about a minute and 3.5 GB to compile.
template <MmOperand kOperand, FloatType kOut, ScaledMmTile kTile, bool kFastAccum>
cudaError_t RunScaledMmSm90(const ScaledMmParams& p, cudaStream_t stream);
template <FloatType kOut, ScaledMmTile kTile>
cudaError_t RunBlockScaledMmSm90(const ScaledMmParams& p, cudaStream_t stream);

}  // namespace jaxq
