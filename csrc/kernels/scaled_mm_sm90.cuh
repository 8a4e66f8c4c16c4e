// The sm90 (wgmma + TMA, warp-specialized) scaled GEMM behind RunScaledMmSm90, built from CUTLASS 3.x
// collectives. Included only by the generated per-instantiation translation units.
#pragma once
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "kernels/scaled_mm.h"

namespace jaxq::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// fp8 accumulates with CUTLASS's promoting mainloop (wgmma partial sums added into fp32 registers every few
// k-blocks), not the FP8FastAccum schedules vLLM picks: those keep the whole K sum in the tensor core's
// narrower accumulator and miss the 2e-3 relative-error bound against an fp32 sum at K = 8192 (measured).
template <MmOperand> struct OperandTraits;
template <> struct OperandTraits<MmOperand::kInt8> {
  using Element = int8_t;
  using Accumulator = int32_t;
};
template <> struct OperandTraits<MmOperand::kFp8E4M3> {
  using Element = cutlass::float_e4m3_t;
  using Accumulator = float;
};

template <FloatType> struct OutTraits;
template <> struct OutTraits<FloatType::kBF16> { using Element = cutlass::bfloat16_t; };
template <> struct OutTraits<FloatType::kF16> { using Element = cutlass::half_t; };

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule_, bool kSwap>
struct Config {
  using Shape = TileShape;
  using Cluster = ClusterShape;
  using Schedule = MainloopSchedule;
  using EpilogueSchedule = EpilogueSchedule_;
  static constexpr bool kSwapAB = kSwap;
};
using Basic = cutlass::gemm::KernelTmaWarpSpecialized;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Cluster1 = cute::Shape<_1, _1, _1>;
using Cluster2 = cute::Shape<_2, _1, _1>;

template <ScaledMmTile, MmOperand> struct TileConfig;
template <MmOperand kOperand>
struct TileConfig<ScaledMmTile::kM16, kOperand>
    : Config<cute::Shape<_64, _16, _256>, Cluster1, Basic, cutlass::epilogue::TmaWarpSpecialized, true> {};
template <MmOperand kOperand>
struct TileConfig<ScaledMmTile::kM64, kOperand>
    : Config<cute::Shape<_64, _64, _256>, Cluster1, Basic, cutlass::epilogue::TmaWarpSpecialized, true> {};
template <MmOperand kOperand>
struct TileConfig<ScaledMmTile::kM128, kOperand>
    : Config<cute::Shape<_64, _128, _128>, Cluster2, Pingpong, cutlass::epilogue::TmaWarpSpecialized, false> {};
template <>
struct TileConfig<ScaledMmTile::kLarge, MmOperand::kInt8>
    : Config<cute::Shape<_128, _128, _128>, Cluster2, Pingpong, cutlass::epilogue::TmaWarpSpecialized, false> {};
// Ping-pong gives one warp group the whole 128 x 128 tile: with fp8's second (promotion) accumulator that is
// 256 registers a thread, and it spilled (350 TFLOP/s measured). Cooperative splits the tile over two groups.
template <>
struct TileConfig<ScaledMmTile::kLarge, MmOperand::kFp8E4M3>
    : Config<cute::Shape<_128, _128, _128>, Cluster2, Cooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
             false> {};

// Vectors along the kernel's rows (a column broadcast) or its columns (a row broadcast). Scales may be one
// value instead: their stride is a runtime bool.
template <class Tile, class T, class Compute = T>
using PerKernelRow = fusion::Sm90ColBroadcast<0, Tile, T, Compute, Stride<_1, _0, int64_t>>;
template <class Tile, class T, class Compute = T>
using PerKernelCol = fusion::Sm90RowBroadcast<0, Tile, T, Compute, Stride<_0, _1, int64_t>>;
template <class Tile>
using ScalePerKernelRow = fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<bool, _0, int64_t>>;
template <class Tile>
using ScalePerKernelCol = fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, bool, int64_t>>;

// D = s_outer * (s_inner * acc') + bias with acc' = acc - azp * azp_adj (int8) or acc. The outer scale is the
// per-row one of the kernel's problem: s_a normally, s_b when A and B are swapped (vLLM's order either way).
template <class Tile, bool kSwap, class ElementD, bool kZeroPoints>
struct Epilogue {
  template <class T, class C = T>
  using PerM = std::conditional_t<kSwap, PerKernelCol<Tile, T, C>, PerKernelRow<Tile, T, C>>;
  template <class T, class C = T>
  using PerN = std::conditional_t<kSwap, PerKernelRow<Tile, T, C>, PerKernelCol<Tile, T, C>>;
  using ScaleM = std::conditional_t<kSwap, ScalePerKernelCol<Tile>, ScalePerKernelRow<Tile>>;
  using ScaleN = std::conditional_t<kSwap, ScalePerKernelRow<Tile>, ScalePerKernelCol<Tile>>;

  using ZeroPointTerm =
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, kRound>, PerM<int32_t>, PerN<int32_t>>;
  using Shifted = std::conditional_t<
      kZeroPoints,
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, float, int32_t, kRound>, fusion::Sm90AccFetch, ZeroPointTerm>,
      fusion::Sm90AccFetch>;
  using Outer = std::conditional_t<kSwap, ScaleN, ScaleM>;
  using Inner = std::conditional_t<kSwap, ScaleM, ScaleN>;
  using Scaled = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, Inner, Shifted>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>, Outer,
                               Scaled, PerN<ElementD, float>>;

  static typename Tree::Arguments Arguments(const ScaledMmParams& p) {
    using ScaleMArgs = typename ScaleM::Arguments;
    using ScaleNArgs = typename ScaleN::Arguments;
    ScaleMArgs scale_m{p.scale_a, 0.0f, {}};
    ScaleNArgs scale_n{p.scale_b, 0.0f, {}};
    if constexpr (kSwap) {
      scale_m.dRow = {_0{}, p.scale_a_per_row, int64_t{0}};
      scale_n.dCol = {p.scale_b_per_col, _0{}, int64_t{0}};
    } else {
      scale_m.dCol = {p.scale_a_per_row, _0{}, int64_t{0}};
      scale_n.dRow = {_0{}, p.scale_b_per_col, int64_t{0}};
    }
    const auto* bias = static_cast<const ElementD*>(p.bias);
    typename Shifted::Arguments shifted{};
    if constexpr (kZeroPoints) {
      // Without per-token zero points the term is 1 * azp_adj (pre-multiplied); without azp_adj it is 0.
      shifted = {{}, {{p.azp, 1, {}}, {p.azp_adj, 0, {}}, {}}, {}};
    }
    if constexpr (kSwap) {
      return {{scale_n}, {{scale_m}, shifted, {}}, {bias, ElementD(0), {}}, {}};
    } else {
      return {{scale_m}, {{scale_n}, shifted, {}}, {bias, ElementD(0), {}}, {}};
    }
  }
};

template <MmOperand kOperand, FloatType kOut, ScaledMmTile kTile>
struct Gemm {
  using Element = typename OperandTraits<kOperand>::Element;
  using Accumulator = typename OperandTraits<kOperand>::Accumulator;
  using ElementD = typename OutTraits<kOut>::Element;
  using Config = TileConfig<kTile, kOperand>;
  using Tile = typename Config::Shape;
  static constexpr bool kSwap = Config::kSwapAB;
  using Fusion = Epilogue<Tile, kSwap, ElementD, kOperand == MmOperand::kInt8>;
  // With A and B swapped the kernel writes D^T column-major, which is D row-major.
  using LayoutD = std::conditional_t<kSwap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignD = 16 / sizeof(ElementD);

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, typename Config::EpilogueSchedule, typename Fusion::Tree>::CollectiveOp;

  // Both operands are K-major (A row-major, B column-major), so swapping them keeps the layouts.
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 16, Element,
      cutlass::layout::ColumnMajor, 16, Accumulator, Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

int CachedSmCount(int device);

}  // namespace jaxq::sm90

namespace jaxq {

template <MmOperand kOperand, FloatType kOut, ScaledMmTile kTile>
cudaError_t RunScaledMmSm90(const ScaledMmParams& p, cudaStream_t stream) {
  using G = sm90::Gemm<kOperand, kOut, kTile>;
  using Element = typename G::Element;
  using Kernel = typename G::Kernel;
  const int m = static_cast<int>(G::kSwap ? p.n : p.m);
  const int n = static_cast<int>(G::kSwap ? p.m : p.n);
  const int k = static_cast<int>(p.k);
  const auto* a = static_cast<const Element*>(G::kSwap ? p.b : p.a);
  const auto* b = static_cast<const Element*>(G::kSwap ? p.a : p.b);
  auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1));
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm90::CachedSmCount(hw.device_id);
  typename G::Device::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                     {m, n, k, 1},
                                     {a, stride_a, b, stride_b},
                                     {G::Fusion::Arguments(p), nullptr, stride_d,
                                      static_cast<typename G::ElementD*>(p.d), stride_d},
                                     hw};
  if constexpr (kOperand == MmOperand::kFp8E4M3) {
    // Promote once per mainloop iteration (every 128 or 256 of K): the least the mainloop accepts.
    args.mainloop.mma_promotion_interval = cute::size<2>(typename G::Tile{}) / 32;
  }
  typename G::Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // These tile schedulers and epilogues need no global workspace; XLA has none to give without asking.
  if (G::Device::get_workspace_size(args) != 0) return cudaErrorInvalidConfiguration;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace jaxq
