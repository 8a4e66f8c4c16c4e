// marlin_gemm on Hopper's tensor cores (wgmma, sm_90a): integer, fp8 and FP4 weights (uint4b8, uint4 with zero
// points, uint8b128, float8_e4m3fn, NVFP4, MXFP4) in the Marlin layout as it is stored, so that one copy of the
// weight serves every M; also 4-bit GPTQ and AWQ weights as gptq_gemm (exllama's layout) and awq_gemm hold them
// (WeightLayout), whose rows past those ops' own kernels run here.
//
// out^T = W^T a^T. A block is two warpgroups, one 64-column Marlin tile each, and kRows (16, 32, 64 or 128) rows of
// a, the fewest that hold m; W^T is wgmma's A operand from registers (warp w of a warpgroup takes word w of each
// lane's 16-byte vector: that word holds the lane's register A fragment, marlin_fragments.cuh), dequantized there
// and rounded to T as the reference does (an 8-bit tile's lane holds two vectors: warp w takes words 2w, 2w + 1,
// and the copy puts the lanes' first vectors before their second ones, so that a warp's reads spread over the
// banks); a^T is the B operand, kRows rows x 64 k per stage in shared memory with the 128-byte swizzle (without
// it the wgmmas ran at half the rate on the H200). All 256 threads copy a stage (codes, a, the scales and zero
// points of its two 32-row halves, since group 32 changes within it; FP4's scale bytes of its four 16-row NVFP4
// or two 32-row MXFP4 groups) with cp.async into a ring, kStages - 2 stages ahead. Each k-step's wgmma is its own
// commit group with at most three in flight, and a k-step's A registers are written after the wait that retires
// the wgmma that last read them (ptxas serializes the wgmmas otherwise).
//
// A weight with too few 128-column blocks to fill the GPU splits K over the blocks of a thread-block cluster
// (HopperSplits: a function of K, N and the SM count only); the blocks' float32 sums meet in shared memory and are
// added in rank order. Each row is summed in the same order whatever m is: wgmma's sums of a column do not depend
// on how many rows share the instruction, so every kRows gives a row the same result.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/marlin.h"
#include "kernels/marlin_fragments.cuh"
#include "kernels/sm_count.h"

namespace cg = cooperative_groups;

namespace jaxq {
namespace {

constexpr int kThreads = 256;           // two warpgroups
constexpr int kBlockCols = 2 * kTileN;  // one tile per warpgroup
constexpr int kStageK = 64;             // four k-steps of 16
constexpr int kMaxHopperSplits = 8;     // the portable cluster size
constexpr int kMinSplitStages = 8;      // a split's pipeline needs a few stages to fill

// One ring slot's layout for blocks of kRows rows of a and kBits-bit codes, and the ring: the SM's share of a block
// (two per SM; four of up to 32 rows, which wait for the weight's bytes: on the H100, 2026-12-07, 16-row blocks ran
// K28672 N8192 in 110 instead of 148 µs, K8192 N28672 in 94 instead of 99).
template <int kRows, int kBits>
struct Ring {
  static constexpr int kTileBytes = kTileK * kTileN * kBits / 8;  // one 16 x 64 tile of codes
  static constexpr int kA = 0;  // 1024-aligned: the swizzle repeats every 8 rows of 128 bytes
  static constexpr int kCodes = kA + kRows * kStageK * 2;                    // 4 slabs x 2 tiles
  static constexpr int kScales = kCodes + kStageK / kTileK * 2 * kTileBytes;  // 2 halves x 128 scales (FP4: bytes)
  static constexpr int kZeros = kScales + 2 * kBlockCols * 2;                   // 2 halves x 16 words (uint4 only)
  static constexpr int kStageBytes = (kZeros + 2 * kBlockCols / 8 * 4 + 1023) / 1024 * 1024;
  static constexpr int kBlocksPerSm = kRows <= 32 ? 4 : 2;
  static constexpr int kShare = 228 * 1024 / kBlocksPerSm - 1024;  // an SM's shared memory, 1 KB per block reserved
  // 4-bit: the counts timed on the H100 (2026-12-07); 8-bit: as many as the share holds.
  static constexpr int kStages = kBits == 8 ? kShare / kStageBytes
                                 : kRows == 128 ? 5 : kRows == 64 ? 7 : kRows == 32 ? 5 : 6;
  static constexpr int kSharedBytes = kStages * kStageBytes;
  // The block's float32 sums once the ring is drained, rows padded by 4 floats: the lanes of a warp that write
  // one register (8 columns, 4 row pairs) then hit 32 banks.
  static constexpr int kSumStride = kBlockCols + 4;
  static_assert(kRows * kSumStride * 4 <= kSharedBytes, "the sums reuse the ring");
  static_assert(kStages >= 4 && kSharedBytes <= kShare, "a ring of at least four stages in the SM's share");
};

// Byte offset of a's element (row r, k) in a stage: a row's 64 k are 128 contiguous bytes whose 16-byte pieces
// are permuted by the row's index mod 8 (the 128-byte swizzle).
__device__ __forceinline__ uint32_t AOffset(int r, int k) {
  return r * 128 + ((((k >> 3) ^ r) & 7) << 4) + (k & 7) * 2;
}

// Shared-memory descriptor of k-step `step` of the stage's a at `tile`: K-major, 128-byte swizzle, 1024 bytes
// between 8-row groups; the k-step starts 32 bytes into each row (the hardware swizzles the address it is given).
__device__ __forceinline__ uint64_t Descriptor(uint32_t tile, int step) {
  const uint32_t address = tile + step * 32;
  return static_cast<uint64_t>((address & 0x3ffff) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// d (64 weight columns x kN rows of a, float32, wgmma's layout) += A (64 x 16 in T, registers) * B (16 x kN in
// T, shared memory at `desc`); with accumulate false, d = A * B. The operand lists of each shape:
#define JAXQ_D8(i)                                                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define JAXQ_WGMMA(N, TYPE, D, A, DESC, PRED, ...)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE \
               "." TYPE " " D ", " A ", " DESC ", p, 1, 1, 0;\n}\n"                                                    \
               : __VA_ARGS__                                                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(accumulate)))
#define JAXQ_WGMMA_ROWS(TYPE) \
  if constexpr (kN == 16) {                                                                             \
    JAXQ_WGMMA(16, TYPE, "{%0, %1, %2, %3, %4, %5, %6, %7}", "{%8, %9, %10, %11}", "%12", "%13", JAXQ_D8(0)); \
  } else if constexpr (kN == 32) {                                                                             \
    JAXQ_WGMMA(32, TYPE, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}", "{%16, %17, %18, %19}", "%20", "%21", JAXQ_D8(0), JAXQ_D8(8)); \
  } else if constexpr (kN == 64) {                                                                             \
    JAXQ_WGMMA(64, TYPE, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}", "{%32, %33, %34, %35}", "%36", "%37", JAXQ_D8(0), JAXQ_D8(8), JAXQ_D8(16), JAXQ_D8(24)); \
  } else if constexpr (kN == 128) {                                                                             \
    JAXQ_WGMMA(128, TYPE, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}", "{%64, %65, %66, %67}", "%68", "%69", JAXQ_D8(0), JAXQ_D8(8), JAXQ_D8(16), JAXQ_D8(24), JAXQ_D8(32), JAXQ_D8(40), JAXQ_D8(48), JAXQ_D8(56)); \
  }

template <typename T, int kN>
__device__ __forceinline__ void Wgmma(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc, bool accumulate) {
  static_assert(kN == 16 || kN == 32 || kN == 64 || kN == 128);
  if constexpr (std::is_same_v<T, half>) {
    JAXQ_WGMMA_ROWS("f16");
  } else {
    JAXQ_WGMMA_ROWS("bf16");
  }
}
#undef JAXQ_WGMMA_ROWS
#undef JAXQ_WGMMA
#undef JAXQ_D8

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// The nibble of its word that AutoAWQ gives column c of eight (its order 0 2 4 6 1 3 5 7 holds column c at
// nibble c / 2 + 4 (c % 2)).
__device__ __forceinline__ int AwqNibble(int c) { return (c >> 1) | ((c & 1) << 2); }

// Keeps the compiler from moving reads or writes of `r` across the asynchronous wgmmas.
__device__ __forceinline__ void Pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <typename T, MarlinType kType, int kRows, WeightLayout kLayout>
__global__ void __launch_bounds__(kThreads, (Ring<kRows, kBitsOf<kType>>::kBlocksPerSm))
    MarlinHopperKernel(MarlinParams p, int stages_per_split) {
  constexpr bool kGptq = kLayout == WeightLayout::kGptqExllama;  // 4-bit with zero points (MarlinHopperSupports)
  constexpr bool kAwq = kLayout == WeightLayout::kAwq;             // the same
  constexpr bool kColumnOrder = kGptq || kAwq;                     // scales and zero points
  constexpr int kBits = kBitsOf<kType>;
  constexpr int kVectors = kBits / 4;  // 16-byte vectors per lane in a tile
  using R = Ring<kRows, kBits>;
  constexpr int kStages = R::kStages;
  constexpr bool kHasZeros = kType == MarlinType::kU4;
  constexpr int kScaleRows = kType == MarlinType::kNvFp4 ? 4 : 2;  // groups (32-row halves) of a stage
  extern __shared__ __align__(1024) char shared[];
  const uint32_t shared_at = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, half_block = tid >> 7;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kBlockCols;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int splits = gridDim.z, first = blockIdx.z * stages_per_split;  // this block's stages of K
  const int stages = min(p.k / kStageK - first, stages_per_split);      // at least one (HopperSplits)
  const int group_size = p.k / p.groups;
  const size_t slab_bytes = static_cast<size_t>(p.n / kTileN) * R::kTileBytes;  // one 16-row slab of the weight
  const T* a = static_cast<const T*>(p.a);
  const T* scales = static_cast<const T*>(p.scales);

  auto issue = [&](int s) {
    if (s < stages) {
      const uint32_t stage = shared_at + (s % kStages) * R::kStageBytes;
      const int ks = first + s;
      if constexpr (kGptq) {  // codes: the stage's 8 rows of words x the block's 128 columns
        const int word_row = tid >> 5, piece = tid & 31;
        CopyAsync<16, true>(stage + R::kCodes + word_row * kBlockCols * 4 + piece * 16,
                            p.b_q + (static_cast<size_t>(ks) * 8 + word_row) * p.n + n0 + piece * 4, 16);
      } else if constexpr (kAwq) {
        // The stage's 64 rows x the block's 16 words, a row's four 16-byte pieces swizzled by (row / 2) % 4: the
        // lanes that read rows 2t and 2t + 1 (t = 0..3) then hit four different pieces' banks.
        const int k_row = tid >> 2, piece = tid & 3;
        const uint32_t* src = p.b_q + (static_cast<size_t>(ks) * kStageK + k_row) * (p.n / 8) + n0 / 8 + piece * 4;
        CopyAsync<16, true>(stage + R::kCodes + k_row * 64 + ((piece ^ (k_row >> 1)) & 3) * 16, src, 16);
      }
#pragma unroll
      for (int i = 0; i < (kColumnOrder ? 0 : kVectors); ++i) {  // codes: 4 slabs x the block's two tiles
        constexpr int kPieces = 2 * R::kTileBytes / 16;  // of a slab
        const unsigned c = tid + i * kThreads, slab = c / kPieces, piece = c % kPieces;  // unsigned: shifts
        const unsigned tile = piece / (kPieces / 2), lane_vector = piece % (kPieces / 2);
        const char* src = reinterpret_cast<const char*>(p.b_q) + (static_cast<size_t>(ks) * 4 + slab) * slab_bytes +
                          static_cast<size_t>(n0 / kTileN) * R::kTileBytes + piece * 16;
        // A lane's vector v lands at v * 512 + lane * 16 in its tile (the identity for 4-bit codes).
        const unsigned at = tile * R::kTileBytes + (lane_vector % kVectors) * 512 + (lane_vector / kVectors) * 16;
        CopyAsync<16, true>(stage + R::kCodes + slab * 2 * R::kTileBytes + at, src, 16);
      }
#pragma unroll
      for (int i = 0; i < (kRows * 8 + kThreads - 1) / kThreads; ++i) {  // a: kRows x 8 pieces of 8 k
        const int c = tid + i * kThreads, r = c >> 3, q = c & 7;
        if (kRows * 8 % kThreads == 0 || c < kRows * 8) {
          const bool valid = m0 + r < p.m;  // rows past m are zeros
          const T* src = a + (valid ? m0 + r : 0) * p.k + ks * kStageK + q * 8;
          CopyAsync<16, false>(stage + R::kA + AOffset(r, q * 8), src, valid ? 16 : 0);
        }
      }
      const int half = (tid >> 4) & 1;  // the 32-row half of the stage whose group this thread copies
      const size_t group = (ks * kStageK + half * 32) / group_size;
      if constexpr (kFp4<kType>) {  // the block's 128 scale bytes of each of the stage's groups
        if (tid < kScaleRows * 8) {
          const size_t fp4_group = static_cast<size_t>(ks) * kScaleRows + (tid >> 3);
          CopyAsync<16, false>(stage + R::kScales + tid * 16,
                               static_cast<const uint8_t*>(p.scales) + fp4_group * p.n + n0 + (tid & 7) * 16, 16);
        }
      } else if (tid < 32) {
        CopyAsync<16, false>(stage + R::kScales + tid * 16, scales + group * p.n + n0 + (tid & 15) * 8, 16);
      } else if (kHasZeros && tid < 40) {
        const int piece = tid - 32, zero_half = piece >> 2;
        const size_t zero_group = (ks * kStageK + zero_half * 32) / group_size;
        CopyAsync<16, false>(stage + R::kZeros + piece * 16,
                             p.zeros + zero_group * (p.n / 8) + n0 / 8 + (piece & 3) * 4, 16);
      }
    }
    CommitAsync();  // empty groups too, so that every wait counts the same stages
  };

  float acc[kRows / 2];  // written first by a wgmma that does not accumulate: a plain store here would serialize them
  // A k-step's A registers; scale and minus-offset pairs of the lane's columns 16w + g (h = 0) and 16w + 8 + g
  // (h = 1) for each 32-row half of the stage (scales: each group of an FP4 stage; FP4 takes no offset).
  uint32_t frag[4][4];
  T2<T> scale[kScaleRows][2], neg[2][2]{};
  const char* stage = shared;
  auto begin_stage = [&](int s) {
    WaitAsync<kStages - 3>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, seen by wgmma
    __syncthreads();
    issue(s + kStages - 2);  // into the slot of stage s - 2, whose wgmmas both warpgroups have retired
    stage = shared + (s % kStages) * R::kStageBytes;
    if constexpr (kFp4<kType>) {
      // vLLM's FP4 scale order puts column j = 2w + h of a lane's 8 at byte 8g + (0 2 1 3 4 6 5 7)[j] of a tile.
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(stage + R::kScales) + half_block * kTileN + 8 * g;
#pragma unroll
      for (int row = 0; row < kScaleRows; ++row)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * warp + h, at = (j & 4) | ((j & 1) << 1) | ((j >> 1) & 1);
          scale[row][h] = Fp4Scale<T, kType>(bytes[row * kBlockCols + at]);
        }
    } else {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const T* row = reinterpret_cast<const T*>(stage + R::kScales) + half * kBlockCols + half_block * kTileN;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // vLLM's grouped permutation puts column 16w + 8h + g of a tile at 8g + 2w + h; its per-channel one
          // scatters them (LoadScales); GPTQ's and AWQ's are in column order.
          const T s_value =
              kColumnOrder    ? row[16 * warp + 8 * h + g]
              : p.per_channel ? row[32 * (warp >> 1) + 8 * ((g >> 1) & 3) + 4 * (warp & 1) + 2 * h + (g & 1)]
                              : row[8 * g + 2 * warp + h];
          scale[half][h] = T2<T>{s_value, s_value};
          float offset = kType == MarlinType::kU4B8 ? 8.0f : kType == MarlinType::kU8B128 ? 128.0f : 0.0f;
          if constexpr (kColumnOrder) {  // column c in word c / 8: nibble c % 8 (GPTQ) or AWQ's AwqNibble(c % 8)
            const uint32_t word =
                reinterpret_cast<const uint32_t*>(stage + R::kZeros)[half * 16 + half_block * 8 + 2 * warp + h];
            offset = static_cast<float>(((word >> (4 * (kAwq ? AwqNibble(g) : g))) & 0xfu) + p.zero_offset);
          } else if constexpr (kHasZeros) {
            const uint32_t word =
                reinterpret_cast<const uint32_t*>(stage + R::kZeros)[half * 16 + half_block * 8 + g];
            offset = static_cast<float>(ZeroNibble(word, 2 * warp + h));
          }
          T2<T> unused;
          Offsets<T, kType>(offset, offset, offset, offset, neg[half][h], unused);
        }
      }
    }
  };
  auto dequantize = [&](int step) {
    const int half = step >> 1, row = step * kScaleRows / 4;
    if constexpr (kGptq) {
      // Rows 16 step + 2t, + 1 of columns 16w + g (h = 0) and + 8 (h = 1) are values 2t, 2t + 1 of word row
      // 2 step, at bits 4t and 16 + 4t; rows 16 step + 8 + 2t, + 1 the same of word row 2 step + 1.
      const uint32_t* words = reinterpret_cast<const uint32_t*>(stage + R::kCodes) + 2 * step * kBlockCols +
                              half_block * kTileN + 16 * warp + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        frag[step][h] = FromRaw<T, kType>(RawPair4<T>(words[8 * h] >> (4 * t)), neg[half][h], scale[row][h]);
        frag[step][2 + h] =
            FromRaw<T, kType>(RawPair4<T>(words[kBlockCols + 8 * h] >> (4 * t)), neg[half][h], scale[row][h]);
      }
      return;
    }
    if constexpr (kAwq) {
      // Column 16w + 8h + g of the tile is nibble AwqNibble(g) of word 2w + h of the tile's 8 in a row: one 8-byte
      // read per row (both h) of rows 2t, 2t + 1, 2t + 8, 2t + 9 of the k-step.
      const int shift = 4 * AwqNibble(g);
      auto words = [&](int r) {
        const int k_row = 16 * step + r, piece = ((half_block * 2 + (warp >> 1)) ^ (k_row >> 1)) & 3;
        return *reinterpret_cast<const uint2*>(stage + R::kCodes + k_row * 64 + piece * 16 + (warp & 1) * 8);
      };
      const uint2 r0 = words(2 * t), r1 = words(2 * t + 1), r8 = words(2 * t + 8), r9 = words(2 * t + 9);
      auto pair = [&](uint32_t lo, uint32_t hi) {
        return RawPair4<T>(((lo >> shift) & 0xfu) | ((hi >> shift) << 16));
      };
      frag[step][0] = FromRaw<T, kType>(pair(r0.x, r1.x), neg[half][0], scale[row][0]);
      frag[step][1] = FromRaw<T, kType>(pair(r0.y, r1.y), neg[half][1], scale[row][1]);
      frag[step][2] = FromRaw<T, kType>(pair(r8.x, r9.x), neg[half][0], scale[row][0]);
      frag[step][3] = FromRaw<T, kType>(pair(r8.y, r9.y), neg[half][1], scale[row][1]);
      return;
    }
    // The warp's word (4-bit) or words (8-bit) of the lane's vectors, where RawFragments reads them for w = 0.
    const char* tile = stage + R::kCodes + step * 2 * R::kTileBytes + half_block * R::kTileBytes;
    uint4 codes;
    if constexpr (kBits == 4) {
      codes.x = *reinterpret_cast<const uint32_t*>(tile + lane * 16 + warp * 4);
    } else {
      const uint2 words = *reinterpret_cast<const uint2*>(tile + (warp >> 1) * 512 + lane * 16 + (warp & 1) * 8);
      codes.x = words.x;
      codes.y = words.y;
    }
    uint32_t b[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Dequantize<T, kType>(&codes, 0, h, neg[half][h], neg[half][h], scale[row][h], scale[row][h], b[h][0], b[h][1]);
    }
    // wgmma's A fragment: W^T's rows g and g + 8 (columns 16w + g, 16w + 8 + g) at k 2t, 2t + 1, then 2t + 8, 2t + 9.
    frag[step][0] = b[0][0];
    frag[step][1] = b[1][0];
    frag[step][2] = b[0][1];
    frag[step][3] = b[1][1];
  };

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) issue(s);
  begin_stage(0);
  dequantize(0);
  for (int s = 0; s < stages; ++s) {
    const uint32_t tile = shared_at + (s % kStages) * R::kStageBytes + R::kA;
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      WgmmaFence();
      Wgmma<T, kRows>(acc, frag[step], Descriptor(tile, step), s > 0 || step > 0);
      WgmmaCommit();
      WgmmaWait<3>();
      if (step < 3) {
        dequantize(step + 1);
      } else if (s + 1 < stages) {
        begin_stage(s + 1);
        dequantize(0);
      }
    }
  }
  WgmmaWait<0>();
  WaitAsync<0>();
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i) Pin(acc[i]);

  // The sums through shared memory (the drained ring): rows leave whole, and a K split's blocks add theirs.
  // acc[4b + c]: a weight column 16w + g (c < 2) or + 8 of the warpgroup's tile, a row 8b + 2t + (c & 1).
  __syncthreads();  // every wgmma of both warpgroups has read its stage
  float* sums = reinterpret_cast<float*>(shared);
  const int tile_col = half_block * kTileN + 16 * warp + g;
#pragma unroll
  for (int b = 0; b < kRows / 8; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) sums[(8 * b + 2 * t + (c & 1)) * R::kSumStride + tile_col + 8 * (c >> 1)] = acc[4 * b + c];
  cg::cluster_group cluster = cg::this_cluster();
  if (splits > 1) {
    cluster.sync();
  } else {
    __syncthreads();
  }
  const int rank = splits > 1 ? static_cast<int>(cluster.block_rank()) : 0;
  const float* first_sums = splits > 1 ? cluster.map_shared_rank(sums, 0) : sums;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  // NVFP4's W in registers is W / kNvFp4Unscale (Fp4Scale), without the global scale.
  const float global_scale = kType == MarlinType::kNvFp4 ? __ldg(p.global_scale) * kNvFp4Unscale<T> : 1.0f;
  const int live = static_cast<int>(p.m - m0 < kRows ? p.m - m0 : kRows) * (kBlockCols / 2);  // column pairs of rows < m
  for (int i = rank * kThreads + tid; i < live; i += splits * kThreads) {  // each rank writes its share
    const int r = i / (kBlockCols / 2), col = 2 * (i % (kBlockCols / 2)), at = r * R::kSumStride + col;
    float2 sum = *reinterpret_cast<const float2*>(first_sums + at);
    for (int q = 1; q < splits; ++q) {  // rank order, whichever block adds
      const float2 more = *reinterpret_cast<const float2*>(cluster.map_shared_rank(sums, q) + at);
      sum.x += more.x;
      sum.y += more.y;
    }
    if constexpr (kType == MarlinType::kNvFp4) {
      sum.x *= global_scale;
      sum.y *= global_scale;
    }
    if (bias != nullptr) {
      sum.x += ToFloat(bias[n0 + col]);
      sum.y += ToFloat(bias[n0 + col + 1]);
    }
    *reinterpret_cast<T2<T>*>(out + (m0 + r) * p.n + n0 + col) = MakePair<T>(sum.x, sum.y);
  }
  if (splits > 1) cluster.sync();  // the other blocks read this block's sums until here
}

// How many blocks share each 128-column block's K (a cluster): the fewest that give about 1.5 blocks per SM,
// with at least kMinSplitStages stages each. A function of K, N and the SM count only, so that a row's result
// never depends on m.
int HopperSplits(int n, int k, int sm_count) {
  const int col_blocks = n / kBlockCols, stages = k / kStageK;
  const int wanted = (3 * sm_count + 1) / 2;
  int splits = 1;
  while (col_blocks * splits < wanted && splits < kMaxHopperSplits && stages / (splits + 1) >= kMinSplitStages) {
    ++splits;
  }
  // Tuning only (marlin_ab times split counts side by side, one process each): JAXQ_HOPPER_SPLITS, read once,
  // replaces the count where it fits.
  static const int forced = [] {
    const char* text = std::getenv("JAXQ_HOPPER_SPLITS");
    int value = 0;
    return text != nullptr && std::sscanf(text, "%d", &value) == 1 ? value : 0;
  }();
  if (forced >= 1 && forced <= kMaxHopperSplits && stages / forced >= kMinSplitStages) splits = forced;
  return splits;
}

template <typename T, MarlinType kType, int kRows, WeightLayout kLayout>
cudaError_t Launch(const MarlinParams& p, int splits, cudaStream_t stream) {
  auto kernel = MarlinHopperKernel<T, kType, kRows, kLayout>;
  using R = Ring<kRows, kBitsOf<kType>>;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, R::kSharedBytes);
  if (configured != cudaSuccess) return configured;
  const int stages = p.k / kStageK;
  return LaunchKSplit(kernel, dim3(p.n / kBlockCols, static_cast<unsigned>((p.m + kRows - 1) / kRows), splits),
                      kThreads, R::kSharedBytes, stream, p, (stages + splits - 1) / splits);
}

// The fewest rows per block that hold m.
template <typename T, MarlinType kType, WeightLayout kLayout = WeightLayout::kMarlin>
cudaError_t LaunchRows(const MarlinParams& p, int splits, cudaStream_t stream) {
  if (p.m <= 16) return Launch<T, kType, 16, kLayout>(p, splits, stream);
  if (p.m <= 32) return Launch<T, kType, 32, kLayout>(p, splits, stream);
  if (p.m <= 64) return Launch<T, kType, 64, kLayout>(p, splits, stream);
  return Launch<T, kType, 128, kLayout>(p, splits, stream);
}

template <typename T>
cudaError_t DispatchType(const MarlinParams& p, int splits, cudaStream_t stream) {
  if (p.layout == WeightLayout::kGptqExllama) {
    return LaunchRows<T, MarlinType::kU4, WeightLayout::kGptqExllama>(p, splits, stream);
  }
  if (p.layout == WeightLayout::kAwq) return LaunchRows<T, MarlinType::kU4, WeightLayout::kAwq>(p, splits, stream);
  switch (p.weight) {
    case MarlinType::kU4B8:
      return LaunchRows<T, MarlinType::kU4B8>(p, splits, stream);
    case MarlinType::kU4:
      return LaunchRows<T, MarlinType::kU4>(p, splits, stream);
    case MarlinType::kU8B128:
      return LaunchRows<T, MarlinType::kU8B128>(p, splits, stream);
    case MarlinType::kFp8E4M3:
      return LaunchRows<T, MarlinType::kFp8E4M3>(p, splits, stream);
    case MarlinType::kNvFp4:
      return LaunchRows<T, MarlinType::kNvFp4>(p, splits, stream);
    case MarlinType::kMxFp4:
      if constexpr (kSupported<T, MarlinType::kMxFp4>) return LaunchRows<T, MarlinType::kMxFp4>(p, splits, stream);
      return cudaErrorInvalidValue;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool MarlinHopperSupports(const MarlinParams& p) {
  const bool fp4 = p.weight == MarlinType::kNvFp4 || p.weight == MarlinType::kMxFp4;
  const bool type = !(p.weight == MarlinType::kMxFp4 && p.type == FloatType::kF16);  // MXFP4: bfloat16 only
  // FP4: groups of its format's rows (four or two per stage); else whole 32-row halves of a stage, or one group.
  const bool groups = fp4 ? p.k == p.groups * (p.weight == MarlinType::kNvFp4 ? 16 : 32)
                          : p.groups == 1 || (p.k % p.groups == 0 && (p.k / p.groups) % 32 == 0);
  const bool layout = p.layout == WeightLayout::kMarlin ||
                      ((p.layout == WeightLayout::kGptqExllama || p.layout == WeightLayout::kAwq) &&
                       p.weight == MarlinType::kU4 && !p.per_channel);
  const bool operands = (p.weight == MarlinType::kU4) == (p.zeros != nullptr) &&
                        (p.weight == MarlinType::kNvFp4) == (p.global_scale != nullptr);
  return type && groups && layout && operands && p.g_idx == nullptr && p.n % kBlockCols == 0 && p.k % kStageK == 0 &&
         (p.type == FloatType::kF16 || p.type == FloatType::kBF16);
}

cudaError_t LaunchMarlinGemmHopper(const MarlinParams& p, cudaStream_t stream) {
  if (!MarlinHopperSupports(p)) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const int splits = HopperSplits(p.n, p.k, CachedSmCount(device));
  if (p.type == FloatType::kF16) return DispatchType<half>(p, splits, stream);
  return DispatchType<__nv_bfloat16>(p, splits, stream);
}

}  // namespace jaxq
