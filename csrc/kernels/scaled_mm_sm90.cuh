// The sm90 (wgmma + TMA, warp-specialized) scaled GEMM behind RunScaledMmSm90, built from CUTLASS 3.x
// collectives. Included only by the generated per-instantiation translation units.
#pragma once
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "kernels/scaled_mm.h"
#include "kernels/sm_count.h"

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
using BasicFastAccum = cutlass::gemm::KernelTmaWarpSpecializedFP8FastAccum;
using PingpongFastAccum = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using CooperativeFastAccum = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using Cluster1 = cute::Shape<_1, _1, _1>;
using Cluster2 = cute::Shape<_2, _1, _1>;

template <class Schedule>
constexpr bool kIsFastAccum = std::is_same_v<Schedule, BasicFastAccum> || std::is_same_v<Schedule, PingpongFastAccum> ||
                              std::is_same_v<Schedule, CooperativeFastAccum>;

// Tile configurations by M bucket. The small ones are vLLM's; from M = 65 up, the fastest of
// tools/scaled_mm_sweep's candidates on the H100 at K = 8192, N = 28672 (int8 also at K = 4096, N = 14336); see
// benchmarks/RESULTS.md.
template <ScaledMmTile, MmOperand, bool kFastAccum = false> struct TileConfig;
template <MmOperand kOperand>
struct TileConfig<ScaledMmTile::kM16, kOperand>
    : Config<cute::Shape<_64, _16, _256>, Cluster1, Basic, cutlass::epilogue::TmaWarpSpecialized, true> {};
template <MmOperand kOperand>
struct TileConfig<ScaledMmTile::kM64, kOperand>
    : Config<cute::Shape<_64, _64, _256>, Cluster1, Basic, cutlass::epilogue::TmaWarpSpecialized, true> {};
template <>
struct TileConfig<ScaledMmTile::kM128, MmOperand::kInt8>
    : Config<cute::Shape<_64, _128, _128>, Cluster2, Pingpong, cutlass::epilogue::TmaWarpSpecialized, false> {};
template <>
struct TileConfig<ScaledMmTile::kLarge, MmOperand::kInt8>
    : Config<cute::Shape<_128, _256, _128>, cute::Shape<_1, _2, _1>, Cooperative,
             cutlass::epilogue::TmaWarpSpecializedCooperative, false> {};
// fp8 with float32 sums: each warp group of a cooperative tile holds its accumulator twice (the wgmma one
// and the promoted one), which a 128 x 256 tile would spill; ping-pong (one group per tile) spills at 128 x 128
// (350 TFLOP/s measured).
template <>
struct TileConfig<ScaledMmTile::kM128, MmOperand::kFp8E4M3>
    : Config<cute::Shape<_128, _128, _128>, cute::Shape<_1, _2, _1>, Cooperative,
             cutlass::epilogue::TmaWarpSpecializedCooperative, false> {};
template <>
struct TileConfig<ScaledMmTile::kLarge, MmOperand::kFp8E4M3>
    : Config<cute::Shape<_128, _192, _128>, Cluster2, Cooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
             false> {};
// fp8 with the tensor core's own accumulation over all of K (fast_accum): no promotion registers.
template <>
struct TileConfig<ScaledMmTile::kM128, MmOperand::kFp8E4M3, true>
    : Config<cute::Shape<_64, _256, _128>, Cluster2, PingpongFastAccum, cutlass::epilogue::TmaWarpSpecialized, false> {};
template <>
struct TileConfig<ScaledMmTile::kLarge, MmOperand::kFp8E4M3, true>
    : Config<cute::Shape<_256, _128, _128>, Cluster2, CooperativeFastAccum,
             cutlass::epilogue::TmaWarpSpecializedCooperative, false> {};

// Block-wise scales: the mainloop multiplies each 128-deep K block's partial sums by s_a[m, kb] * s_b[kb, n/128]
// while it adds them up (so fp8 is promoted every block). Small M gets a 64-row ping-pong tile, the rest
// vLLM's 128 x 128 cooperative one.
template <ScaledMmTile> struct BlockScaledTileConfig;
template <>
struct BlockScaledTileConfig<ScaledMmTile::kM64>
    : Config<cute::Shape<_64, _128, _128>, Cluster1, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8BlockScaledAccum,
             cutlass::epilogue::TmaWarpSpecialized, false> {};
template <>
struct BlockScaledTileConfig<ScaledMmTile::kLarge>
    : Config<cute::Shape<_128, _128, _128>, cute::Shape<_1, _2, _1>,
             cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
             cutlass::epilogue::TmaWarpSpecializedCooperative, false> {};

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

template <class Cfg, class Accumulator, class ElementD, class LayoutD, class Tree>
using EpilogueFor = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Shape, typename Cfg::Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, float, void, LayoutD, 16 / sizeof(ElementD), ElementD,
    LayoutD, 16 / sizeof(ElementD), typename Cfg::EpilogueSchedule, Tree>::CollectiveOp;

// Both operands are K-major (A row-major, B column-major), so swapping them keeps the layouts. LayoutA/B may
// carry the block-scale layouts (CUTLASS's tuple form).
template <class Cfg, class Element, class LayoutA, class LayoutB, class Accumulator, class CollectiveEpilogue>
using MainloopFor = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, 16, Element, LayoutB, 16, Accumulator,
    typename Cfg::Shape, typename Cfg::Cluster,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    typename Cfg::Schedule>::CollectiveOp;

template <class Mainloop, class CollectiveEpilogue>
using DeviceFor = cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>, Mainloop, CollectiveEpilogue, cutlass::gemm::PersistentScheduler>>;

template <MmOperand kOperand, FloatType kOut, class Cfg>
struct Gemm {
  using Element = typename OperandTraits<kOperand>::Element;
  using ElementD = typename OutTraits<kOut>::Element;
  using Config = Cfg;
  using Tile = typename Config::Shape;
  static constexpr bool kSwap = Config::kSwapAB;
  using Fusion = Epilogue<Tile, kSwap, ElementD, kOperand == MmOperand::kInt8>;
  // With A and B swapped the kernel writes D^T column-major, which is D row-major.
  using LayoutD = std::conditional_t<kSwap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using Accumulator = typename OperandTraits<kOperand>::Accumulator;
  using CollectiveEpilogue = EpilogueFor<Config, Accumulator, ElementD, LayoutD, typename Fusion::Tree>;
  using Device = DeviceFor<MainloopFor<Config, Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                                       Accumulator, CollectiveEpilogue>,
                           CollectiveEpilogue>;
};

// fp8 with block-wise scales: s_a [m, k/128] m-major, s_b [k/128, n/128] n-major (the only majors CUTLASS's sm90
// mainloop reads); D = acc + bias.
template <FloatType kOut, ScaledMmTile kTile>
struct BlockScaledGemm {
  using Element = cutlass::float_e4m3_t;
  using ElementD = typename OutTraits<kOut>::Element;
  using Config = BlockScaledTileConfig<kTile>;
  using Tile = typename Config::Shape;
  using Scales = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float, kRound>, fusion::Sm90AccFetch,
                               PerKernelCol<Tile, ElementD, float>>;
  using CollectiveEpilogue = EpilogueFor<Config, float, ElementD, cutlass::layout::RowMajor, Tree>;
  using Device = DeviceFor<
      MainloopFor<Config, Element, cute::tuple<cutlass::layout::RowMajor, decltype(Scales::deduce_layoutSFA())>,
                  cute::tuple<cutlass::layout::ColumnMajor, decltype(Scales::deduce_layoutSFB())>, float,
                  CollectiveEpilogue>,
      CollectiveEpilogue>;
};

}  // namespace jaxq::sm90

namespace jaxq {

namespace sm90 {

inline cutlass::KernelHardwareInfo HardwareInfo() {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = CachedSmCount(hw.device_id);
  return hw;
}

template <class Device>
cudaError_t Launch(const typename Device::Arguments& args, cudaStream_t stream) {
  Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // These tile schedulers and epilogues need no global workspace; XLA has none to give without asking.
  if (Device::get_workspace_size(args) != 0) return cudaErrorInvalidConfiguration;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

template <class Kernel>
auto PackedStrides(int m, int n, int k) {
  return cute::make_tuple(cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1)),
                          cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1)),
                          cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1)));
}

}  // namespace sm90

// The scaled GEMM with tile configuration Cfg (RunScaledMmSm90's choice, or any other for tools/scaled_mm_sweep).
template <MmOperand kOperand, FloatType kOut, class Cfg>
cudaError_t RunScaledMmWith(const ScaledMmParams& p, cudaStream_t stream) {
  using G = sm90::Gemm<kOperand, kOut, Cfg>;
  using Element = typename G::Element;
  const int m = static_cast<int>(G::kSwap ? p.n : p.m);
  const int n = static_cast<int>(G::kSwap ? p.m : p.n);
  const int k = static_cast<int>(p.k);
  const auto* a = static_cast<const Element*>(G::kSwap ? p.b : p.a);
  const auto* b = static_cast<const Element*>(G::kSwap ? p.a : p.b);
  const auto [stride_a, stride_b, stride_d] = sm90::PackedStrides<typename G::Device::GemmKernel>(m, n, k);
  typename G::Device::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                     {m, n, k, 1},
                                     {a, stride_a, b, stride_b},
                                     {G::Fusion::Arguments(p), nullptr, stride_d,
                                      static_cast<typename G::ElementD*>(p.d), stride_d},
                                     sm90::HardwareInfo()};
  if constexpr (kOperand == MmOperand::kFp8E4M3 && !sm90::kIsFastAccum<typename Cfg::Schedule>) {
    // Promote once per mainloop iteration (every 128 or 256 of K): the least the mainloop accepts.
    args.mainloop.mma_promotion_interval = cute::size<2>(typename G::Tile{}) / 32;
  }
  return sm90::Launch<typename G::Device>(args, stream);
}

template <MmOperand kOperand, FloatType kOut, ScaledMmTile kTile, bool kFastAccum>
cudaError_t RunScaledMmSm90(const ScaledMmParams& p, cudaStream_t stream) {
  return RunScaledMmWith<kOperand, kOut, sm90::TileConfig<kTile, kOperand, kFastAccum>>(p, stream);
}

template <FloatType kOut, ScaledMmTile kTile>
cudaError_t RunBlockScaledMmSm90(const ScaledMmParams& p, cudaStream_t stream) {
  using G = sm90::BlockScaledGemm<kOut, kTile>;
  using ElementD = typename G::ElementD;
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  const auto [stride_a, stride_b, stride_d] = sm90::PackedStrides<typename G::Device::GemmKernel>(m, n, k);
  const auto problem = cute::make_shape(m, n, k, 1);
  typename G::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {static_cast<const typename G::Element*>(p.a), stride_a, static_cast<const typename G::Element*>(p.b), stride_b,
       p.scale_a, G::Scales::tile_atom_to_shape_SFA(problem), p.scale_b, G::Scales::tile_atom_to_shape_SFB(problem)},
      {{{}, {static_cast<const ElementD*>(p.bias), ElementD(0), {}}, {}}, nullptr, stride_d,
       static_cast<ElementD*>(p.d), stride_d},
      sm90::HardwareInfo()};
  return sm90::Launch<typename G::Device>(args, stream);
}

}  // namespace jaxq
