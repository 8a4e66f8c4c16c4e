// Chooses the scaled-GEMM instantiation for a call: operand type, output type and the M bucket.
#include "kernels/scaled_mm.h"

namespace jaxq {

ScaledMmTile ChooseScaledMmTile(int64_t m) {
  if (m <= 16) return ScaledMmTile::kM16;
  if (m <= 64) return ScaledMmTile::kM64;
  if (m <= 128) return ScaledMmTile::kM128;
  return ScaledMmTile::kLarge;
}

ScaledMmTile ChooseBlockScaledMmTile(int64_t m) { return m <= 64 ? ScaledMmTile::kM64 : ScaledMmTile::kLarge; }

bool ScaledMmSupports(const ScaledMmParams& p) {
  const bool types = (p.out_type == FloatType::kBF16 || p.out_type == FloatType::kF16) &&
                     (p.operand == MmOperand::kInt8 || (p.azp_adj == nullptr && p.azp == nullptr));
  const bool blocks = !p.block_scales || (p.operand == MmOperand::kFp8E4M3 && p.azp_adj == nullptr &&
                                          p.azp == nullptr && p.k % 128 == 0 && p.m % 4 == 0);
  const bool fast_accum = !p.fast_accum || (p.operand == MmOperand::kFp8E4M3 && !p.block_scales);
  return types && blocks && fast_accum && p.m >= 0 && p.n > 0 && p.k > 0 && p.k % 16 == 0 && p.n % 8 == 0 && p.m < (int64_t{1} << 31) &&
         p.n < (int64_t{1} << 31) && p.k < (int64_t{1} << 31);
}

namespace {

template <MmOperand kOperand, FloatType kOut, bool kFastAccum>
cudaError_t RunForTile(const ScaledMmParams& p, cudaStream_t stream) {
  switch (ChooseScaledMmTile(p.m)) {
    case ScaledMmTile::kM16: return RunScaledMmSm90<kOperand, kOut, ScaledMmTile::kM16, false>(p, stream);
    case ScaledMmTile::kM64: return RunScaledMmSm90<kOperand, kOut, ScaledMmTile::kM64, false>(p, stream);
    case ScaledMmTile::kM128: return RunScaledMmSm90<kOperand, kOut, ScaledMmTile::kM128, kFastAccum>(p, stream);
    case ScaledMmTile::kLarge: return RunScaledMmSm90<kOperand, kOut, ScaledMmTile::kLarge, kFastAccum>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <FloatType kOut>
cudaError_t RunBlockScaledForTile(const ScaledMmParams& p, cudaStream_t stream) {
  return ChooseBlockScaledMmTile(p.m) == ScaledMmTile::kM64 ? RunBlockScaledMmSm90<kOut, ScaledMmTile::kM64>(p, stream)
                                                             : RunBlockScaledMmSm90<kOut, ScaledMmTile::kLarge>(p, stream);
}

template <FloatType kOut>
cudaError_t RunForOut(const ScaledMmParams& p, cudaStream_t stream) {
  if (p.block_scales) return RunBlockScaledForTile<kOut>(p, stream);
  if (p.operand == MmOperand::kInt8) return RunForTile<MmOperand::kInt8, kOut, false>(p, stream);
  return p.fast_accum ? RunForTile<MmOperand::kFp8E4M3, kOut, true>(p, stream)
                      : RunForTile<MmOperand::kFp8E4M3, kOut, false>(p, stream);
}

}  // namespace

cudaError_t LaunchScaledMm(const ScaledMmParams& p, cudaStream_t stream) {
  if (!ScaledMmSupports(p)) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  return p.out_type == FloatType::kBF16 ? RunForOut<FloatType::kBF16>(p, stream) : RunForOut<FloatType::kF16>(p, stream);
}

}  // namespace jaxq
