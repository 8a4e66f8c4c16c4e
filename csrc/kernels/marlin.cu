// Weight-only GEMM on the Marlin layout. A block (4 warps) owns kTiles 64-column tiles of the output for up to
// 16 * kMBlocks rows of a and one K range; each warp takes a contiguous quarter of that range, in 16-row slabs.
// A lane's 16-byte vector of a slab holds exactly its fragments of mma.m16n8k16 for a tile's 64 columns (that
// is what the layout is for); the kernel multiplies out^T = W^T a^T, so that 8 rows of a fill an mma. Each warp
// streams its slabs (codes, the group's scales and zero points, the slab of a) through its own ring of shared
// memory with cp.async, kStages - 1 slabs ahead, so the loads never wait on the math and need no registers nor
// block barriers. Up to 8 rows (integer and fp8 weights without act-order) the codes are multiplied as they are
// and each group's float32 sums are scaled when the group ends; otherwise codes are turned into W in a's type in
// registers, scaled there, and multiplied with float32 sums (FP4: exactly, NVFP4's W by a power of two smaller
// that the global scale puts back on the sums). The warps' sums meet in shared memory in warp order; when K
// is split over several blocks, those blocks form a thread-block cluster and the first adds the others' sums
// from their shared memory, in rank order. No atomics and no workspace: deterministic, and within each of the
// two forms each row is summed the same way whatever m is (the split depends on n, k and the GPU only; kTiles,
// kMBlocks and kHalves do not change which slabs a warp adds, nor in what order).
#include "kernels/marlin.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/marlin_fragments.cuh"
#include "kernels/sm_count.h"

namespace jaxq {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 4;
constexpr int kMaxSplits = 8;                 // the portable cluster size
constexpr int kRingBytesPerWarp = 24 * 1024;  // two blocks of 4 warps per SM, 7 slabs in flight per warp at M <= 16

// Offset of row r (0..15), half `half` (columns 0..7 or 8..15) of a 16 x 16 slab of a in a stage: rows are 32
// bytes, and the halves swap every 4 rows so that ldmatrix's 8 row reads hit distinct banks.
__device__ __forceinline__ uint32_t ASlot(int r, int half) { return r * 32 + ((half ^ ((r >> 2) & 1)) << 4); }

__device__ __forceinline__ void LoadMatrixX4(uint32_t (&frag)[4], uint32_t at) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(at));
}

// A warp's stage of the ring: the codes of kTiles tiles (lane-major per 16-byte vector), the slab of a
// (kMBlocks 16 x 16 blocks), and without act-order the group's kTiles * 64 scales and kTiles * 8 zero words.
template <MarlinType kType, int kMBlocks, int kTiles, bool kActOrder>
struct Ring {
  static constexpr int kBits = kBitsOf<kType>;
  static constexpr int kVectors = kBits / 4;  // 16-byte vectors of codes per lane per tile
  static constexpr bool kHasZeros = kType == MarlinType::kU4;
  static constexpr int kCodes = 0;
  static constexpr int kA = kCodes + kTiles * kVectors * 32 * 16;
  static constexpr int kScales = kA + kMBlocks * 16 * kTileK * 2;
  static constexpr int kZeros = kScales + (kActOrder ? 0 : kTiles * kTileN * kScaleBytes<kType>);
  static constexpr int kStageBytes = kZeros + (kActOrder || !kHasZeros ? 0 : kTiles * kTileN / 2);
  static constexpr int kStages = std::min(8, std::max(2, kRingBytesPerWarp / kStageBytes));
  static constexpr int kPartialFloats = kMBlocks * 16 * kTiles * kTileN;  // one warp's sums
  static constexpr int kSharedBytes =
      std::max(kWarps * kStages * kStageBytes, kWarps * kPartialFloats * static_cast<int>(sizeof(float)));
};

// Rows of a per block: 16 * kMBlocks; with kHalves == 1 (at most 8 rows) the second 8 are not multiplied.
// kFold (no act-order): the codes are multiplied as they are (RawFragments) and each group's sums are scaled in
// float32 when the group ends, magic + offset times the group's sum of a's row taken off there too; fewer
// instructions per weight than rounding W to T first (Dequantize), which the other kernels do.
template <typename T, MarlinType kType, int kMBlocks, int kHalves, int kTiles, bool kActOrder, bool kFold>
__global__ void __launch_bounds__(kWarps * 32) MarlinGemmKernel(MarlinParams p, int k_tiles_per_split) {
  static_assert(!(kFold && kActOrder), "act-order groups change within a slab");
  using R = Ring<kType, kMBlocks, kTiles, kActOrder>;
  constexpr bool kSumA = kFold && !kRawIsValue<T, kType>;
  const T* a = static_cast<const T*>(p.a);
  using Scale = ScaleOf<T, kType>;
  const Scale* scales = static_cast<const Scale*>(p.scales);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment row / column group
  const int nt0 = blockIdx.y * kTiles;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kMBlocks * 16;
  const int rows = static_cast<int>(p.m - m0 < kMBlocks * 16 ? p.m - m0 : kMBlocks * 16);
  // Each warp takes a contiguous quarter of the block's K range, so that a group's slabs meet in one warp.
  const int split_begin = blockIdx.z * k_tiles_per_split;
  const int split_tiles = max(0, min(k_tiles_per_split, p.k / kTileK - split_begin));
  const int chunk = (split_tiles + kWarps - 1) / kWarps;
  const int kt_begin = split_begin + warp * chunk;
  const int slabs = max(0, min(chunk, split_tiles - warp * chunk));
  const bool single = p.per_channel;
  // Group sizes are powers of two (ValidShape): a slab's group is a shift of its index; one group: shift it all out.
  const int group_shift = p.groups == 1 ? 30 : __ffs(p.k / p.groups / kTileK) - 1;

  extern __shared__ float4 shared_raw[];
  char* ring = reinterpret_cast<char*>(shared_raw) + warp * R::kStages * R::kStageBytes;
  const uint32_t ring_at = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  // What this lane copies of each slab: the lane-th 16-byte vector of every 512 bytes of the tiles' codes (so
  // that one copy instruction reads 512 contiguous bytes; a lane reads its own vectors back from where others
  // put them), one 16-byte half row of a per 16-row block (rows past m are filled with zeros), and a share of
  // the group's scales and zero points.
  const int words_per_tile = kTileK * kTileN * R::kBits / 32;
  const size_t codes_stride = static_cast<size_t>(p.n / kTileN) * words_per_tile / 4;  // uint4s per slab
  const uint4* codes_src = reinterpret_cast<const uint4*>(p.b_q) + static_cast<size_t>(nt0) * (words_per_tile / 4) +
                           kt_begin * codes_stride + lane;
  const int a_row = lane >> 1, a_half = lane & 1;
  const T* a_src[kMBlocks];
  int a_bytes[kMBlocks];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb) {
    const bool valid = mb * 16 + a_row < rows;
    a_src[mb] = a + (valid ? m0 + mb * 16 + a_row : 0) * p.k + kt_begin * kTileK + 8 * a_half;
    a_bytes[mb] = valid ? 16 : 0;
  }
  const uint32_t a_slot = R::kA + ASlot(a_row, a_half);

  auto issue = [&](int i) {
    if (i < slabs) {
      const uint32_t stage = ring_at + (i % R::kStages) * R::kStageBytes;
      const uint4* src = codes_src + static_cast<size_t>(i) * codes_stride;
#pragma unroll
      for (int v = 0; v < kTiles * R::kVectors; ++v) {
        CopyAsync<16, true>(stage + R::kCodes + (v * 32 + lane) * 16, src + v * 32, 16);
      }
#pragma unroll
      for (int mb = 0; mb < kMBlocks; ++mb) {
        CopyAsync<16, false>(stage + a_slot + mb * 512, a_src[mb] + kTileK * i, a_bytes[mb]);
      }
      if constexpr (!kActOrder) {
        const size_t group = (kt_begin + i) >> group_shift;
        if (lane < kTiles * kTileN * sizeof(Scale) / 16) {
          CopyAsync<16, false>(stage + R::kScales + lane * 16,
                               scales + group * p.n + nt0 * kTileN + 16 / sizeof(Scale) * lane, 16);
        }
        if constexpr (R::kHasZeros) {
          if (lane < kTiles * 2) {
            CopyAsync<16, false>(stage + R::kZeros + lane * 16, p.zeros + group * (p.n / 8) + nt0 * 8 + 4 * lane, 16);
          }
        }
      }
    }
    CommitAsync();  // empty groups too, so that every wait below counts the same slabs
  };

  // out^T = W^T a^T: W^T is mma's A operand (a lane's fragments of columns 16w + g and 16w + 8 + g, as the
  // layout holds them, are A's rows g and g + 8), a^T its B operand, 8 rows of a per mma (half h of a 16-row
  // block). acc holds the scaled sums; with kFold, group_acc the current group's unscaled ones and sum_a
  // (columns 2t, 2t + 1 of ones^T a^T) the group's sums of a's rows.
  float acc[kMBlocks][kTiles][4][kHalves][4];
  float group_acc[kMBlocks][kTiles][4][kHalves][4];  // not kFold: never read, and compiled away
  float sum_a[kMBlocks][kHalves][4];
  auto clear = [](auto& array) {
    float* f = reinterpret_cast<float*>(&array);
#pragma unroll
    for (int e = 0; e < static_cast<int>(sizeof(array) / sizeof(float)); ++e) f[e] = 0.0f;
  };
  clear(acc);
  clear(group_acc);
  clear(sum_a);
  const uint32_t ones = Bits<T>(MakePair<T>(1.0f, 1.0f));
  const uint32_t ones_a[4] = {ones, ones, ones, ones};

  // ldmatrix.x4 reads a 16 x 16 block as four 8 x 8 quarters: rows 0-7 and 8-15 of k 0-7, then of k 8-15,
  // which are the B fragments (k 0-7, k 8-15) of rows 0-7 and of rows 8-15.
  const int ld_row = (lane & 7) + 8 * ((lane >> 3) & 1);
  const uint32_t ld_slot = R::kA + ASlot(ld_row, lane >> 4);

#pragma unroll
  for (int i = 0; i < R::kStages - 1; ++i) issue(i);
  for (int i = 0; i < slabs; ++i) {
    WaitAsync<R::kStages - 2>();
    __syncwarp();  // every lane's copies of slab i have landed, and every lane is done with slab i - 1's slot
    issue(i + R::kStages - 1);
    const int kt = kt_begin + i;
    const uint32_t stage_at = ring_at + (i % R::kStages) * R::kStageBytes;
    const char* stage = ring + (i % R::kStages) * R::kStageBytes;

    uint32_t frag_a[kMBlocks][4];
#pragma unroll
    for (int mb = 0; mb < kMBlocks; ++mb) LoadMatrixX4(frag_a[mb], stage_at + ld_slot + mb * 512);

    // W rounded to T (not kFold): act-order gives each of the lane's 4 rows its own group (entries clamped to
    // the groups); else the ring's stage holds the slab's group.
    int row_group[4] = {0, 0, 0, 0};
    if constexpr (kActOrder) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        row_group[r] = min(max(__ldg(p.g_idx + kt * kTileK + 2 * t + (r & 1) + 8 * (r >> 1)), 0), p.groups - 1);
      }
    }
    if constexpr (kSumA) {
#pragma unroll
      for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
        for (int h = 0; h < kHalves; ++h) Mma<T>(sum_a[mb][h], ones_a, frag_a[mb][h], frag_a[mb][h + 2]);
    }
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      uint4 codes[R::kVectors];
#pragma unroll
      for (int v = 0; v < R::kVectors; ++v) {
        codes[v] = *reinterpret_cast<const uint4*>(stage + R::kCodes + ((tile * 32 + lane) * R::kVectors + v) * 16);
      }
      uint32_t b[8][2];  // all of the tile's fragments first: eight independent chains to interleave
      if constexpr (kFold) {
#pragma unroll
        for (int j = 0; j < 8; ++j) RawFragments<T, kType>(codes, j >> 1, j & 1, b[j][0], b[j][1]);
      } else {
        Factors<T> f;
        if constexpr (kActOrder) {
          TileFactors<T, kType, true>(scales + static_cast<size_t>(nt0 + tile) * kTileN, p.n,
                                      p.zeros + (nt0 + tile) * 8, p.n / 8, row_group, g, single, f);
        } else {
          TileFactors<T, kType, false>(stage + R::kScales + tile * kTileN * kScaleBytes<kType>, 0,
                                       reinterpret_cast<const uint32_t*>(stage + R::kZeros) + tile * 8, 0, row_group,
                                       g, single, f);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          Dequantize<T, kType>(codes, j >> 1, j & 1, f.neg01[j], f.neg89[j], f.scale01[j], f.scale89[j], b[j][0],
                               b[j][1]);
        }
      }
      auto& sums = kFold ? group_acc : acc;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t w_t[4] = {b[2 * w][0], b[2 * w + 1][0], b[2 * w][1], b[2 * w + 1][1]};
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
          for (int h = 0; h < kHalves; ++h) Mma<T>(sums[mb][tile][w][h], w_t, frag_a[mb][h], frag_a[mb][h + 2]);
      }
    }
    // kFold: the group ends with this slab (or the warp's range does); scale its sums into acc.
    if constexpr (kFold) {
      if (i == slabs - 1 || ((kt + 1) >> group_shift) != (kt >> group_shift)) {
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
          T scale[8];
          LoadScales(reinterpret_cast<const T*>(stage + R::kScales) + tile * kTileN, g, single, scale);
          const uint32_t* zeros = reinterpret_cast<const uint32_t*>(stage + R::kZeros) + tile * 8;
          float offset[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if constexpr (R::kHasZeros) {
              offset[j] = RawOffset<T, kType>(ZeroNibble(zeros[g], j));
            } else {
              offset[j] = RawOffset<T, kType>(kType == MarlinType::kU4B8 ? 8.0f : 128.0f);
            }
          }
#pragma unroll
          for (int w = 0; w < 4; ++w)
#pragma unroll
            for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
              for (int h = 0; h < kHalves; ++h)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                  const int j = 2 * w + (c >> 1);  // D's row g (c < 2) or g + 8: column 16w + g or 16w + 8 + g
                  float& sum = group_acc[mb][tile][w][h][c];
                  if constexpr (kSumA) sum = fmaf(-offset[j], sum_a[mb][h][c & 1], sum);
                  acc[mb][tile][w][h][c] = fmaf(ToFloat(scale[j]), sum, acc[mb][tile][w][h][c]);
                  sum = 0.0f;
                }
        }
        clear(sum_a);
      }
    }
  }
  WaitAsync<0>();

  // The warps' sums, then (with a K split) the cluster's, added in a fixed order. The ring's memory holds them.
  __syncthreads();
  float* partial = reinterpret_cast<float*>(shared_raw);
  constexpr int kCols = kTiles * kTileN;
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int h = 0; h < kHalves; ++h)  // with one half, rows 8-15 are past m
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            // mma's D: row (a column of the output) g or g + 8, column (a row of a) 2t or 2t + 1.
            const int row = mb * 16 + 8 * h + 2 * t + (c & 1), col = tile * kTileN + 16 * w + 8 * (c >> 1) + g;
            partial[warp * R::kPartialFloats + row * kCols + col] = acc[mb][tile][w][h][c];
          }
  __syncthreads();
  const int live = rows * kCols;  // rows past m are neither added nor written
  for (int i = threadIdx.x; i < live; i += kWarps * 32) {
    float sum = partial[i];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += partial[w * R::kPartialFloats + i];
    partial[i] = sum;
  }
  const int splits = gridDim.z;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (splits > 1) cluster.sync();
  if (splits > 1 && cluster.block_rank() != 0) {
    cluster.sync();  // the first block reads this block's shared memory until here
    return;
  }
#else
  __syncthreads();
#endif
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const float global_scale = kType == MarlinType::kNvFp4 ? __ldg(p.global_scale) * kNvFp4Unscale<T> : 1.0f;
  for (int i = threadIdx.x; i < live; i += kWarps * 32) {
    float sum = partial[i];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int rank = 1; rank < splits; ++rank) sum += cluster.map_shared_rank(partial, rank)[i];
#endif
    const int64_t row = m0 + i / kCols;
    const int col = nt0 * kTileN + i % kCols;
    if constexpr (kType == MarlinType::kNvFp4) sum *= global_scale;
    if (bias != nullptr) sum += ToFloat(bias[col]);
    out[row * p.n + col] = FromFloat<T>(sum);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (splits > 1) cluster.sync();
#endif
}

// W [k, n] in T, rows in the layout's order (perm order under act-order), exactly the W the GEMM multiplies
// by: the path for many rows dequantizes once and hands W to XLA's dot. One warp per 16 x 64 tile, staged in
// shared memory so that rows leave as whole 128-byte lines.
template <typename T, MarlinType kType, bool kActOrder>
__global__ void __launch_bounds__(kWarps * 32) MarlinDequantizeKernel(MarlinParams p) {
  constexpr int kVectors = kBitsOf<kType> / 4;
  constexpr int kRow = kTileN + 8;  // a staged row, padded (elements)
  __shared__ __align__(16) T staged[kWarps][kTileK][kRow];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x;
  const int kt = blockIdx.y * kWarps + warp;
  if (kt >= p.k / kTileK) return;
  const int words_per_tile = kTileK * kTileN * kBitsOf<kType> / 32;
  const uint4* src = reinterpret_cast<const uint4*>(
                         p.b_q + (static_cast<size_t>(kt) * (p.n / kTileN) + nt) * words_per_tile) + lane * kVectors;
  uint4 codes[kVectors];
#pragma unroll
  for (int v = 0; v < kVectors; ++v) codes[v] = __ldcs(src + v);
  int group[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    group[r] = kActOrder ? min(max(__ldg(p.g_idx + kt * kTileK + 2 * t + (r & 1) + 8 * (r >> 1)), 0), p.groups - 1)
                         : kt * kTileK / (p.k / p.groups);
  }
  Factors<T> f;
  TileFactors<T, kType, kActOrder>(static_cast<const ScaleOf<T, kType>*>(p.scales) + static_cast<size_t>(nt) * kTileN, p.n,
                                   p.zeros + nt * 8, p.n / 8, group, g, p.per_channel, f);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t b0, b1;
    Dequantize<T, kType>(codes, j >> 1, j & 1, f.neg01[j], f.neg89[j], f.scale01[j], f.scale89[j], b0, b1);
    const int col = 16 * (j >> 1) + 8 * (j & 1) + g;
    T2<T> v01 = AsPair<T>(b0), v89 = AsPair<T>(b1);
    if constexpr (kType == MarlinType::kNvFp4) {  // W itself: exact, a power of two
      const T2<T> unscale = MakePair<T>(kNvFp4Unscale<T>, kNvFp4Unscale<T>);
      v01 = __hmul2(v01, unscale);
      v89 = __hmul2(v89, unscale);
    }
    staged[warp][2 * t][col] = v01.x;
    staged[warp][2 * t + 1][col] = v01.y;
    staged[warp][2 * t + 8][col] = v89.x;
    staged[warp][2 * t + 9][col] = v89.y;
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + static_cast<size_t>(kt) * kTileK * p.n + nt * kTileN;
  for (int c = lane; c < kTileK * kTileN / 8; c += 32) {
    const int r = c / (kTileN / 8), q = c % (kTileN / 8);
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(r) * p.n + q * 8) =
        *reinterpret_cast<const uint4*>(&staged[warp][r][q * 8]);
  }
}

template <typename T, MarlinType kType, int kMBlocks, int kHalves, int kTiles, bool kActOrder, bool kFold>
cudaError_t Launch(const MarlinParams& p, int splits, cudaStream_t stream) {
  auto kernel = MarlinGemmKernel<T, kType, kMBlocks, kHalves, kTiles, kActOrder, kFold>;
  constexpr int kShared = Ring<kType, kMBlocks, kTiles, kActOrder>::kSharedBytes;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
  if (configured != cudaSuccess) return configured;
  const int k_tiles = p.k / kTileK;
  const int per_split = (k_tiles + splits - 1) / splits;
  const int64_t row_blocks = (p.m + kMBlocks * 16 - 1) / (kMBlocks * 16);
  return LaunchKSplit(kernel, dim3(static_cast<unsigned>(row_blocks), p.n / (kTiles * kTileN), splits),
                      kWarps * 32, kShared, stream, p, per_split);
}

// Rows per block and tiles per block, as many as the accumulators allow (128 floats per lane: the scaled sums
// and, when folding, the group's unscaled ones). Up to 8 rows without act-order (and not batch_invariant) fold
// the group scales in float32; every other row count rounds W to T: within each of the two, every row is summed
// the same way whatever m is.
template <typename T, MarlinType kType, bool kActOrder>
cudaError_t DispatchShape(const MarlinParams& p, const MarlinPlan& plan, cudaStream_t stream) {
  const int tiles = kActOrder ? 1 : plan.tiles_per_block;
  if constexpr (!kActOrder && !kFp4<kType>) {  // FP4 W is exact in T: nothing to gain from folding its scales
    if (p.m <= 8 && !p.batch_invariant) {
      if (tiles == 4) return Launch<T, kType, 1, 1, 4, false, true>(p, plan.splits, stream);
      if (tiles == 2) return Launch<T, kType, 1, 1, 2, false, true>(p, plan.splits, stream);
      return Launch<T, kType, 1, 1, 1, false, true>(p, plan.splits, stream);
    }
  }
  if (p.m <= 16) {
    if constexpr (!kActOrder) {
      if (tiles == 4) return Launch<T, kType, 1, 2, 4, false, false>(p, plan.splits, stream);
      if (tiles == 2) return Launch<T, kType, 1, 2, 2, false, false>(p, plan.splits, stream);
    }
    return Launch<T, kType, 1, 2, 1, kActOrder, false>(p, plan.splits, stream);
  }
  if (p.m <= 32) {
    if constexpr (!kActOrder) {
      if (tiles >= 2) return Launch<T, kType, 2, 2, 2, false, false>(p, plan.splits, stream);
    }
    return Launch<T, kType, 2, 2, 1, kActOrder, false>(p, plan.splits, stream);
  }
  if (p.m <= 48) return Launch<T, kType, 3, 2, 1, kActOrder, false>(p, plan.splits, stream);
  return Launch<T, kType, 4, 2, 1, kActOrder, false>(p, plan.splits, stream);
}

template <typename T, MarlinType kType>
cudaError_t DispatchActOrder(const MarlinParams& p, const MarlinPlan& plan, cudaStream_t stream) {
  if constexpr (!kSupported<T, kType>) {
    return cudaErrorInvalidValue;
  } else if constexpr (kType == MarlinType::kFp8E4M3 || kFp4<kType>) {
    if (p.g_idx != nullptr) return cudaErrorInvalidValue;  // vLLM has no act-order float weights either
    return DispatchShape<T, kType, false>(p, plan, stream);
  } else {
    if (p.g_idx != nullptr) return DispatchShape<T, kType, true>(p, plan, stream);
    return DispatchShape<T, kType, false>(p, plan, stream);
  }
}

template <typename T>
cudaError_t DispatchType(const MarlinParams& p, const MarlinPlan& plan, cudaStream_t stream) {
  switch (p.weight) {
    case MarlinType::kU4B8: return DispatchActOrder<T, MarlinType::kU4B8>(p, plan, stream);
    case MarlinType::kU4: return DispatchActOrder<T, MarlinType::kU4>(p, plan, stream);
    case MarlinType::kU8B128: return DispatchActOrder<T, MarlinType::kU8B128>(p, plan, stream);
    case MarlinType::kFp8E4M3: return DispatchActOrder<T, MarlinType::kFp8E4M3>(p, plan, stream);
    case MarlinType::kNvFp4: return DispatchActOrder<T, MarlinType::kNvFp4>(p, plan, stream);
    case MarlinType::kMxFp4: return DispatchActOrder<T, MarlinType::kMxFp4>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, MarlinType kType, bool kActOrder>
cudaError_t LaunchDequantize(const MarlinParams& p, cudaStream_t stream) {
  const dim3 grid(p.n / kTileN, (p.k / kTileK + kWarps - 1) / kWarps);
  MarlinDequantizeKernel<T, kType, kActOrder><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, MarlinType kType>
cudaError_t DispatchDequantize(const MarlinParams& p, cudaStream_t stream) {
  if constexpr (!kSupported<T, kType>) {
    return cudaErrorInvalidValue;
  } else if constexpr (kType == MarlinType::kFp8E4M3 || kFp4<kType>) {
    if (p.g_idx != nullptr) return cudaErrorInvalidValue;
    return LaunchDequantize<T, kType, false>(p, stream);
  } else {
    if (p.g_idx != nullptr) return LaunchDequantize<T, kType, true>(p, stream);
    return LaunchDequantize<T, kType, false>(p, stream);
  }
}

template <typename T>
cudaError_t DispatchDequantizeType(const MarlinParams& p, cudaStream_t stream) {
  switch (p.weight) {
    case MarlinType::kU4B8: return DispatchDequantize<T, MarlinType::kU4B8>(p, stream);
    case MarlinType::kU4: return DispatchDequantize<T, MarlinType::kU4>(p, stream);
    case MarlinType::kU8B128: return DispatchDequantize<T, MarlinType::kU8B128>(p, stream);
    case MarlinType::kFp8E4M3: return DispatchDequantize<T, MarlinType::kFp8E4M3>(p, stream);
    case MarlinType::kNvFp4: return DispatchDequantize<T, MarlinType::kNvFp4>(p, stream);
    case MarlinType::kMxFp4: return DispatchDequantize<T, MarlinType::kMxFp4>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int MarlinBits(MarlinType t) {
  return t == MarlinType::kFp8E4M3 || t == MarlinType::kU8B128 ? 8 : 4;
}

MarlinPlan PlanMarlin(int n, int k, int sm_count) {
  // Measured on the H200 (tools/marlin_plan_sweep.py, benchmarks/RESULTS.md): the kernel wants about 1.5 blocks
  // per SM or more, and then as few blocks per tile as get there: the widest blocks (a's slab read once for
  // more columns), then the fewest K splits. A weight too small to give that many blocks takes the most it can.
  const int tiles = n / kTileN, k_tiles = k / kTileK;
  const int64_t wanted = (3 * int64_t{sm_count} + 1) / 2;
  MarlinPlan most{1, 1};
  int64_t most_blocks = tiles;
  for (int per_block : {4, 2, 1}) {
    if (tiles % per_block != 0) continue;
    for (int splits = 1; splits <= kMaxSplits; ++splits) {
      if (splits > 1 && (k_tiles + splits - 1) / splits < 2 * kWarps) break;  // each warp keeps 2 slabs
      const int64_t blocks = int64_t{tiles / per_block} * splits;
      if (blocks >= wanted) return MarlinPlan{per_block, splits};
      if (blocks > most_blocks) {
        most_blocks = blocks;
        most = MarlinPlan{per_block, splits};
      }
    }
  }
  return most;
}

namespace {
bool ValidShape(const MarlinParams& p) {
  if (p.layout != WeightLayout::kMarlin || p.k % kTileK != 0 || p.n % kTileN != 0 || p.groups < 1 || (p.weight == MarlinType::kU4) != (p.zeros != nullptr)) {
    return false;
  }
  if (p.weight == MarlinType::kNvFp4 || p.weight == MarlinType::kMxFp4) {  // vLLM's grouped order, 16 or 32 rows
    const int group = p.weight == MarlinType::kNvFp4 ? 16 : 32;
    if (p.g_idx != nullptr || p.per_channel || p.groups * group != p.k) return false;
  }
  if (p.g_idx != nullptr || p.groups == 1) return true;
  const int group_tiles = p.k % p.groups == 0 && (p.k / p.groups) % kTileK == 0 ? p.k / p.groups / kTileK : 0;
  return group_tiles > 0 && (group_tiles & (group_tiles - 1)) == 0;  // the kernels shift, not divide
}
}  // namespace

cudaError_t LaunchMarlinDequantize(const MarlinParams& p, cudaStream_t stream) {
  if (!ValidShape(p)) return cudaErrorInvalidValue;
  if (p.type == FloatType::kF16) return DispatchDequantizeType<half>(p, stream);
  if (p.type == FloatType::kBF16) return DispatchDequantizeType<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t LaunchMarlinGemm(const MarlinParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (!ValidShape(p) || (p.weight == MarlinType::kNvFp4) != (p.global_scale != nullptr)) return cudaErrorInvalidValue;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  MarlinPlan plan = PlanMarlin(p.n, p.k, CachedSmCount(device));
  // Tuning only (tools/marlin_plan_sweep.py times plans side by side): JAXQ_MARLIN_PLAN="tiles,splits"
  // replaces the plan where it fits this weight.
  if (const char* forced = std::getenv("JAXQ_MARLIN_PLAN")) {
    int tiles = 0, splits = 0;
    if (std::sscanf(forced, "%d,%d", &tiles, &splits) == 2 && (tiles == 1 || tiles == 2 || tiles == 4) &&
        (p.n / kTileN) % tiles == 0 && splits >= 1 && splits <= kMaxSplits && splits <= p.k / kTileK) {
      plan = MarlinPlan{tiles, splits};
    }
  }
  if (major == 9 && p.hopper_from_rows > 0 && p.m >= p.hopper_from_rows && MarlinHopperSupports(p)) {
    return LaunchMarlinGemmHopper(p, stream);
  }
  if (major < 9) plan.splits = 1;  // K splits meet in a cluster's shared memory
  if (p.type == FloatType::kF16) return DispatchType<half>(p, plan, stream);
  if (p.type == FloatType::kBF16) return DispatchType<__nv_bfloat16>(p, plan, stream);
  return cudaErrorInvalidValue;
}

}  // namespace jaxq
