#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/sm_count.h"
#include "kernels/weight_only.h"

namespace jaxq {
namespace {

constexpr int kWarps = 4;           // per block, splitting the block's K range
constexpr int kWarpColumns = 128;   // output columns per warp (16 per thread)
constexpr int kRowsPerPass = 16;    // rows of x per pass over the weight (two m8 MMA tiles)

// How a launch deals out columns: blocks x < full_tiles take kWarpColumns columns each, later ones
// tail_columns each (lanes past a block's columns load nothing and store nothing).
struct ColumnBlocks {
  int64_t full_tiles;
  int tail_columns;

  __host__ __device__ int64_t First(int64_t block) const {
    return block < full_tiles ? block * kWarpColumns : full_tiles * kWarpColumns + (block - full_tiles) * tail_columns;
  }
  __host__ __device__ int64_t End(int64_t block, int64_t n) const {
    const int64_t end = First(block) + (block < full_tiles ? kWarpColumns : tail_columns);
    return end < n ? end : n;
  }
  int64_t Count(int64_t n) const {
    const int64_t full = (n + kWarpColumns - 1) / kWarpColumns;
    if (full <= full_tiles) return full;
    return full_tiles + (n - full_tiles * kWarpColumns + tail_columns - 1) / tail_columns;
  }
};

// ------------------------------------------------------------------------------------------- values

// Bit offset (in a stream of 32-bit words) of bit j of value i of a 32-value block of `Bits`-bit values.
// GPTQ: a little-endian stream. Exllama: 2/4-bit words hold their even values in the low half-word and
// odd ones in the high; 3-bit words hold ten values so, and values 30 and 31 put their three bits at bit
// 15 (value 30) or 31 (value 31) of the three words; 8-bit words are unchanged.
template <int Bits, bool Exllama>
__host__ __device__ constexpr int BitOf(int i, int j) {
  if (!Exllama || Bits == 8) return i * Bits + j;
  if (Bits == 3) {
    if (i >= 30) return 32 * j + (i == 30 ? 15 : 31);
    return 32 * (i / 10) + 16 * (i % 10 % 2) + 3 * (i % 10 / 2) + j;
  }
  constexpr int per = 32 / Bits;
  return 32 * (i / per) + 16 * (i % per % 2) + Bits * (i % per / 2) + j;
}

// Value i of a 32-value block held in words w[0..Bits) (i a compile-time constant after unrolling).
template <int Bits, bool Exllama>
__device__ __forceinline__ uint32_t ValueOf(const uint32_t* w, int i) {
  constexpr uint32_t mask = (1u << Bits) - 1;
  const int first = BitOf<Bits, Exllama>(i, 0);
  if (BitOf<Bits, Exllama>(i, Bits - 1) == first + Bits - 1) {  // contiguous bits
    const int word = first / 32, shift = first % 32;
    uint32_t v = w[word] >> shift;
    if (shift + Bits > 32) v |= w[word + 1] << (32 - shift);
    return v & mask;
  }
  uint32_t v = 0;
#pragma unroll
  for (int j = 0; j < Bits; ++j) {
    const int b = BitOf<Bits, Exllama>(i, j);
    v |= ((w[b / 32] >> (b % 32)) & 1u) << j;
  }
  return v;
}

// ---------------------------------------------------------------------------------- dequantization

// Magic bit patterns: a 16-bit float whose integer part is 1024 (fp16) or 128 (bf16) with its low
// mantissa bits free, so OR-ing in a small integer q makes the float (magic + q) exactly.
template <typename T>
struct Half2Ops;

template <>
struct Half2Ops<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x6400;
  static constexpr int kMantissaBits = 10;
};

template <>
struct Half2Ops<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300;
  static constexpr int kMantissaBits = 7;
};

template <typename T>
__device__ __forceinline__ uint32_t AsU32(typename Half2Ops<T>::T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// The MMAs multiply unscaled integer codes: an A operand holds (bias + q) exactly as a 16-bit float, bias
// being the magic integer part of the OR-trick (1024 for fp16, 128 for bf16) or 0 where the codes are
// converted (8-bit codes in bf16, whose mantissa has no room beside a magic). Per group and column the
// zero and scale are applied afterwards in float32:
//   sum_k (q - z) s x = s * (sum_k (bias + q) x - (bias + z) * sum_k x),
// with sum_k x computed by one more MMA against a matrix of ones. That leaves two instructions per pair
// of weights (shift, then mask-and-OR) on the path that limits these kernels, the instruction issue rate.
template <typename T, int Bits>
struct Codes {
  static constexpr bool kConvert = Bits >= Half2Ops<T>::kMantissaBits;
  static constexpr float kBias = kConvert ? 0.f : static_cast<float>(Half2Ops<T>::kMagic == 0x6400 ? 1024 : 128);
  static constexpr uint32_t kOnes = std::is_same_v<T, __half> ? 0x3c003c00u : 0x3f803f80u;

  // (bias + q_lo, bias + q_hi) from q_lo in bits 0..Bits-1 and q_hi in 16..15+Bits of `fields` (other bits
  // are ignored).
  __device__ __forceinline__ static uint32_t Operand(uint32_t fields) {
    if constexpr (kConvert) {
      const float lo = __uint_as_float(0x4b000000u | (fields & (1u << Bits) - 1)) - 8388608.f;
      const float hi = __uint_as_float(0x4b000000u | (fields >> 16 & (1u << Bits) - 1)) - 8388608.f;
      return AsU32<T>(__floats2bfloat162_rn(lo, hi));  // exact: codes < 256
    } else {
      // One LOP3, (fields & mask) | magic: written out, because the compiler splits it in two when both
      // constants are immediates.
      uint32_t out;
      asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(fields), "n"(((1u << Bits) - 1) * 0x10001u), "r"(Half2Ops<T>::kMagic * 0x10001u));
      return out;
    }
  }
};

// A group's scales and zeros of a lane's 16 columns as loaded (16-bit scales, packed zeros). They are
// loaded when the group starts and read only when it is folded, steps later, so the loads' latency never
// stalls the warp; kept packed they cost a third of the registers of floats.
struct GroupWords {
  uint32_t scale[16];
  uint32_t zero[4];
};

// ------------------------------------------------------------------------------------ async copies

// Shared memory holds a warp's vectors lane-major: vector v of lane l at 16 (32 v + l) bytes from the
// warp's stage, so a lane's consecutive vectors are this far apart.
constexpr uint32_t kVectorStride = 32 * 16;

// --------------------------------------------------------------------------------------- GEMM tiles
//
// A warp computes a 128-column strip of out^T = W^T x^T with m16n8k16 MMAs: W^T is the A operand (16
// output columns by 16 k), x^T the B operand (16 k by 8 rows of x). Each lane (g = lane / 4, t = lane % 4)
// holds 16 output columns and, per MMA, four k values of them: the A rows g and g + 8 of tile tau are its
// columns 2 tau and 2 tau + 1. Which k a fragment slot stands for is free as long as A and B agree, so
// each format puts in a slot whatever pair of values one shift and mask extracts from its words, and
// the B fragment gathers the matching x values.

// One step of a warp over `kSlabK` rows of K. Each format provides the weight words of a step, the
// column each of a lane's 16 columns is, and for MMA chunk h the two value pairs (P0, P1): the k
// (relative to the lane's first) of each half of the pair, and the pair extracted from a column's words.

template <int Bits, bool Exllama>
struct GptqTiles {
  static constexpr int kWordRows = Bits == 3 ? 3 : 1;    // words of one column a lane holds per step
  static constexpr int kValues = 32 * kWordRows / Bits;  // k values per lane per step
  static constexpr int kChunks = kValues / 4;
  static constexpr int kSlabK = 4 * kValues;
  static constexpr int kPairs = kValues / 2;

  uint32_t w[kWordRows][16];

  // k offsets (within the lane's kValues) of the low and high value of pair j.
  // 3-bit: pairs (2j, 2j + 1) in both layouts; otherwise one shift and mask gives values (j, j + kPairs)
  // of GPTQ's stream and (2j, 2j + 1) of exllama's interleave (8-bit: the same words either way).
  static constexpr bool kInterleaved = Bits == 3 || (Exllama && Bits != 8);
  __host__ __device__ static constexpr int PairLo(int j) { return kInterleaved ? 2 * j : j; }
  __host__ __device__ static constexpr int PairHi(int j) { return kInterleaved ? 2 * j + 1 : j + kPairs; }

  __device__ static int Column(int g, int c) { return 16 * g + c; }
  __device__ static int LaneK(int t) { return t * kValues; }

  static constexpr int kVecs = 4 * kWordRows;     // 16-byte weight vectors per lane per step
  static constexpr int kXBytes = 2 * kValues;      // x bytes per lane and row per step

  // Word rows a warp step advances, and the lane's first word of step 0 (word row k * Bits / 32).
  static constexpr int kStepRows = 4 * kWordRows;
  __device__ static int64_t FirstWord(int64_t n, int64_t k0, int64_t n0, int g, int t) {
    return ((k0 + t * kValues) * Bits / 32) * n + n0 + 16 * g;
  }

  // Lane g's 16 columns of the lane's word rows: kWordRows x four 16-byte vectors from `src` into the
  // lane's slots from shared address `slots`.
  __device__ __forceinline__ static void Issue(uint32_t slots, const uint32_t* src, int64_t n, int src_bytes) {
#pragma unroll
    for (int r = 0; r < kWordRows; ++r) {
#pragma unroll
      for (int u = 0; u < 4; ++u) CopyAsync<16, true>(slots + (4 * r + u) * kVectorStride, src + r * n + 4 * u, src_bytes);
    }
  }

  __device__ __forceinline__ void Read(const uint4* slots) {
#pragma unroll
    for (int r = 0; r < kWordRows; ++r) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint4 v = slots[(4 * r + u) * 32];
        w[r][4 * u] = v.x, w[r][4 * u + 1] = v.y, w[r][4 * u + 2] = v.z, w[r][4 * u + 3] = v.w;
      }
    }
  }

  // Pair j of column c: value PairLo(j) from bit 0, PairHi(j) from bit 16; the bits above each value are
  // left for Codes::Operand to mask.
  __device__ __forceinline__ uint32_t Pair(int c, int j) const {
    if constexpr (Bits == 3 && !Exllama) {
      uint32_t words[3] = {w[0][c], w[1][c], w[2][c]};
      return ValueOf<3, false>(words, 2 * j) | (ValueOf<3, false>(words, 2 * j + 1) << 16);
    } else if constexpr (Bits == 3) {
      if (j == 15) {
        return ((w[0][c] >> 15) & 0x10001u) | ((w[1][c] >> 14) & 0x20002u) | ((w[2][c] >> 13) & 0x40004u);
      }
      return w[j / 5][c] >> (3 * (j % 5));
    } else {
      return w[0][c] >> (Bits * j);  // 8-bit: values (j, j + 2)
    }
  }
};

struct AwqTiles {
  static constexpr int kChunks = 2;
  static constexpr int kSlabK = 32;
  static constexpr int kPairs = 4;

  // After the transpose, w[j][i] holds rows 8t + 2j and 8t + 2j + 1 of the step (its low and high
  // half-word) of half-word g % 2 of word 4 (g / 2) + i: four columns, a nibble each.
  uint32_t w[kPairs][4];

  // Lane g holds half-word g % 2 of words 4 (g / 2) + i: columns 2 j + g % 2 of each, j < 4.
  __device__ static int Column(int g, int c) { return 32 * (g / 2) + 8 * (c / 4) + 2 * (c % 4) + g % 2; }
  // A lane's eight k are consecutive, so its x arrives in one 16-byte copy and pairs (2j, 2j + 1) are its
  // words.
  __device__ static int LaneK(int t) { return 8 * t; }
  __host__ __device__ static constexpr int PairLo(int j) { return 2 * j; }
  __host__ __device__ static constexpr int PairHi(int j) { return 2 * j + 1; }

  static constexpr int kVecs = kPairs;
  static constexpr int kXBytes = 16;

  static constexpr int kStepRows = kSlabK;
  // movmatrix hands lane t rows 2t and 2t + 1 of the matrix whose row r lane g = r loads, so lane g loads
  // rows 8 (g / 2) + g % 2 + 2j: then lane t receives rows 8t + 2j and 8t + 2j + 1. Words 4t..4t+3 of the strip.
  __device__ static int64_t FirstWord(int64_t n, int64_t k0, int64_t n0, int g, int t) {
    return (k0 + 8 * (g / 2) + g % 2) * (n / 8) + n0 / 8 + 4 * t;
  }

  // A column tile is 64 bytes of each row, the other half of its 128-byte line the next tile's; blocks
  // sweep K together, so fetching the whole line into L2 serves both (measured on the H100 at M=1 K=8192
  // N=28672: 58.2 -> 51.5 µs; no gain for GPTQ, whose tiles read 512 bytes a row).
  __device__ __forceinline__ static void Issue(uint32_t slots, const uint32_t* src, int64_t n, int src_bytes) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) CopyAsync<16, true, true>(slots + j * kVectorStride, src + 2 * j * (n / 8), src_bytes);
  }

  __device__ __forceinline__ void Read(const uint4* slots) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const uint4 v = slots[j * 32];
      const uint32_t in[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(w[j][i]) : "r"(in[i]));
      }
    }
  }

  // Pair j of column c: its nibble in rows 8t + 2j (bits 0..3) and 8t + 2j + 1 (bits 16..19).
  __device__ __forceinline__ uint32_t Pair(int c, int j) const { return w[j][c / 4] >> (4 * (c % 4)); }
};

// x values a and b (16-bit elements of the words xv) as one pair register.
__device__ __forceinline__ uint32_t XPair(const uint32_t* xv, int a, int b) {
  if (b == a + 1 && a % 2 == 0) return xv[a / 2];
  const uint32_t select = (a % 2 ? 0x32u : 0x10u) | ((b % 2 ? 0x76u : 0x54u) << 8);
  return __byte_perm(xv[a / 2], xv[b / 2], select);
}

template <typename T, WeightFormat Format, int Bits>
struct Traits {
  using Tiles = std::conditional_t<Format == WeightFormat::kAwq, AwqTiles,
                                   GptqTiles<Bits, Format == WeightFormat::kGptqExllama>>;
};

// Where a lane's scales and zeros of one group start, and how far the next group's are.
// AWQ: lane g's columns are 32 (g / 2) + 8i + 2j + g % 2, half-word g % 2 of word j of eight scales per i,
// and nibbles of one zero word per i. GPTQ: 16 consecutive columns from 16 g, their zeros from bit
// (n0 + 16 g) * Bits of the row (word-aligned except for 3-bit lanes with odd g: half a word in).
template <WeightFormat Format, int Bits>
struct GroupSource {
  const uint16_t* scales;
  const uint32_t* zeros;
  int64_t scale_stride, zero_stride;
  bool valid;  // lanes past the block's columns load nothing (their columns are never stored)

  __device__ GroupSource(const WeightOnlyParams& p, int64_t group, int64_t n0, int64_t n_end, int g) {
    const int64_t first_column = Format == WeightFormat::kAwq ? n0 + 32 * (g / 2) : n0 + 16 * g;
    valid = first_column < n_end;
    scale_stride = p.n;
    zero_stride = Format == WeightFormat::kAwq ? p.n / 8 : p.n * Bits / 32;
    scales = static_cast<const uint16_t*>(p.scales) + group * scale_stride + first_column;
    zeros = p.qzeros + group * zero_stride + first_column * (Format == WeightFormat::kAwq ? 4 : Bits) / 32;
  }

  __device__ __forceinline__ void Load(GroupWords& words) const {
    if (!valid) return;
    auto copy4 = [](uint32_t* dst, uint4 v) { dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w; };
    const uint4* s = reinterpret_cast<const uint4*>(scales);
    if constexpr (Format == WeightFormat::kAwq) {
#pragma unroll
      for (int i = 0; i < 4; ++i) copy4(words.scale + 4 * i, __ldg(s + i));
      copy4(words.zero, __ldg(reinterpret_cast<const uint4*>(zeros)));
    } else {
      copy4(words.scale, __ldg(s));
      copy4(words.scale + 4, __ldg(s + 1));
      if constexpr (Bits == 8) {
        copy4(words.zero, __ldg(reinterpret_cast<const uint4*>(zeros)));
      } else if constexpr (Bits == 4) {
        const uint2 z = __ldg(reinterpret_cast<const uint2*>(zeros));
        words.zero[0] = z.x, words.zero[1] = z.y;
      } else if constexpr (Bits == 2) {
        words.zero[0] = __ldg(zeros);
      } else {
        words.zero[0] = __ldg(zeros), words.zero[1] = __ldg(zeros + 1);
      }
    }
  }

  __device__ __forceinline__ void Advance() {
    scales += scale_stride;
    zeros += zero_stride;
  }
};

// Column c's scale as float32, and (bias + zero + zero_offset) as float32, from a group's words. `half`
// (AWQ: 16 (g % 2), GPTQ: 16 (g % 2) for 3-bit lanes' zeros, else 0) is where the lane's bits start.
template <typename T, WeightFormat Format, int Bits>
__device__ __forceinline__ float ScaleOf(const GroupWords& words, int c, int half) {
  const uint32_t bits = Format == WeightFormat::kAwq ? (words.scale[c] >> half) & 0xffffu
                                                     : (words.scale[c / 2] >> (16 * (c % 2))) & 0xffffu;
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);
  }
}

template <WeightFormat Format, int Bits>
__device__ __forceinline__ uint32_t ZeroOf(const GroupWords& words, int c, int half) {
  if constexpr (Format == WeightFormat::kAwq) {
    return (words.zero[c / 4] >> (half + 4 * (c % 4))) & 0xfu;
  } else if constexpr (Bits == 3) {
    const uint64_t window = (static_cast<uint64_t>(words.zero[1]) << 32 | words.zero[0]) >> half;
    return static_cast<uint32_t>(window >> (3 * c)) & 0x7u;
  } else {
    return (words.zero[c * Bits / 32] >> (c * Bits % 32)) & ((1u << Bits) - 1);
  }
}

// Shared memory per warp and pipeline stage: the lane's weight vectors, then its x bytes per m8 tile, each
// lane in its own 16-byte slots (lane-major, so a warp's accesses never conflict).
template <typename Tiles, int MTiles>
struct StageLayout {
  static constexpr int kXVecs = (Tiles::kXBytes + 15) / 16;
  static constexpr int kVecs = Tiles::kVecs + MTiles * kXVecs;
  // Deep enough that ~4 KB of weights per warp are in flight while one stage is consumed (at 16 warps per
  // SM that covers HBM's latency at full bandwidth), within 24 KB of shared memory per warp.
  static constexpr int kWeightBytes = Tiles::kVecs * 16 * 32;
  static constexpr int kWanted = 1 + (4096 + kWeightBytes - 1) / kWeightBytes;
  static constexpr int kFit = 24576 / (kVecs * 16 * 32);
  static constexpr int kStages = std::max(2, std::min(std::max(3, kWanted), kFit));
  static constexpr int kBytesPerWarp = kStages * kVecs * 16 * 32;
};

// Blocks per SM the register budget aims at: the kernel is latency-bound at low occupancy, so as many as
// fit without spilling (4 needs <= 128 registers, which 2- and 3-bit fields and two m8 tiles exceed).
template <WeightFormat Format, int Bits, int MTiles>
constexpr int kMinBlocks = MTiles == 2 ? 2 : Bits == 4 || Bits == 8 ? 4 : 3;

template <typename T, WeightFormat Format, int Bits, int MTiles>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<Format, Bits, MTiles>) WeightOnlyGemmKernel(WeightOnlyParams p, int split_k, ColumnBlocks columns) {
  using Tiles = typename Traits<T, Format, Bits>::Tiles;
  using Layout = StageLayout<Tiles, MTiles>;
  constexpr int kSlabK = Tiles::kSlabK, kStages = Layout::kStages;
  extern __shared__ uint4 shared[];
  __shared__ bool last_block;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = columns.First(blockIdx.x), n_end = columns.End(blockIdx.x, p.n);
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * kRowsPerPass;
  const int64_t slabs = p.k / kSlabK;
  // Each warp takes a contiguous run of the block's slabs, so its group (scales, zeros) changes rarely.
  const int64_t block_first = blockIdx.y * slabs / split_k;
  const int64_t block_slabs = (blockIdx.y + 1) * slabs / split_k - block_first;
  const int64_t first = block_first + warp * block_slabs / kWarps;
  const int count = static_cast<int>(block_first + (warp + 1) * block_slabs / kWarps - first);
  // A warp step lies in one group (the launcher checks), so groups change for the whole warp at once.
  const int steps_per_group = static_cast<int>(p.k / p.groups / kSlabK);
  const T* x = static_cast<const T*>(p.x);

  // The issue path runs every step in kernels short of registers, so it keeps what it needs precomputed:
  // source pointers that advance by fixed steps, byte counts (0 for lanes past the block's columns and rows of x
  // past M, which copy zeros from an address that does not move) and 32-bit shared addresses.
  const bool lane_valid = Format == WeightFormat::kAwq ? n0 + 32 * t < n_end : n0 + 16 * g < n_end;
  const int64_t words_per_row = Format == WeightFormat::kAwq ? p.n / 8 : p.n;
  const uint32_t* weight_src = lane_valid ? p.qweight + Tiles::FirstWord(p.n, first * kSlabK, n0, g, t) : p.qweight;
  const int64_t weight_step = lane_valid ? Tiles::kStepRows * words_per_row : 0;
  const int weight_bytes = lane_valid ? 16 : 0;
  constexpr int kXCopyBytes = Tiles::kXBytes < 16 ? Tiles::kXBytes : 16;
  const T* x_src[MTiles];
  int x_bytes[MTiles], x_step[MTiles];
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt) {
    const int64_t row = m0 + 8 * mt + g;
    const bool valid = row < p.m;
    x_src[mt] = valid ? x + row * p.k + first * kSlabK + Tiles::LaneK(t) : x;
    x_bytes[mt] = valid ? kXCopyBytes : 0;
    x_step[mt] = valid ? kSlabK : 0;
  }
  uint4* const warp_slots = shared + warp * (Layout::kBytesPerWarp / 16) + lane;
  constexpr int kStageVecs = Layout::kVecs * 32;
  const auto ring_start = static_cast<uint32_t>(__cvta_generic_to_shared(warp_slots));
  const uint32_t ring_end = ring_start + kStages * Layout::kVecs * kVectorStride;
  uint32_t issue_at = ring_start;
  auto issue = [&]() {
    Tiles::Issue(issue_at, weight_src, p.n, weight_bytes);
    weight_src += weight_step;
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
      const uint32_t x_at = issue_at + (Tiles::kVecs + mt * Layout::kXVecs) * kVectorStride;
#pragma unroll
      for (int v = 0; v < Layout::kXVecs; ++v) CopyAsync<kXCopyBytes, false>(x_at + v * kVectorStride, x_src[mt] + 8 * v, x_bytes[mt]);
      x_src[mt] += x_step[mt];
    }
    issue_at += Layout::kVecs * kVectorStride;
    if (issue_at == ring_end) issue_at = ring_start;
  };

  using C = Codes<T, Bits>;
  float acc[MTiles][8][4] = {};
  float group_acc[MTiles][8][4] = {};  // the current group's unscaled sums
  float x_sum[MTiles][4] = {};         // sum of x over the current group's k (every row of the MMA the same)
  int64_t group = first / steps_per_group;
  int group_steps_left = steps_per_group - static_cast<int>(first % steps_per_group);
  GroupSource<Format, Bits> group_source(p, group, n0, n_end, g);
  GroupWords group_words = {};
  if (count > 0) group_source.Load(group_words);
  const int half = Format == WeightFormat::kAwq || Bits == 3 ? 16 * (g % 2) : 0;
  const float zero_bias = C::kBias + static_cast<float>(p.zero_offset);
  // acc += scale * (group_acc - (bias + zero) * x_sum), column by column; then a fresh group.
  auto fold_group = [&]() {
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float scale = ScaleOf<T, Format, Bits>(group_words, c, half);
      const float zero = zero_bias + static_cast<float>(ZeroOf<Format, Bits>(group_words, c, half));
#pragma unroll
      for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
        for (int r = 2 * (c % 2); r < 2 * (c % 2) + 2; ++r) {
          float& sum = group_acc[mt][c / 2][r];
          acc[mt][c / 2][r] = fmaf(scale, fmaf(-zero, x_sum[mt][r % 2], sum), acc[mt][c / 2][r]);
          sum = 0.f;
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) x_sum[mt][r] = 0.f;
    }
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < count) issue();
    CommitAsync();
  }
  // Ends a group: folds its sums and loads the next one's scales and zeros. AWQ does this at the top of the next
  // step, once that step's copies are on their way: at the end of the group's last step it held them back, which
  // cost AWQ 9-10% at M16 and 4% at M1; GPTQ lost up to 2.5% at M1 and M16 with this order (on the H200;
  // benchmarks/history/2026-11-30-h200.md, "what limits the M16 weight-only kernel").
  constexpr bool kFoldAfterCopies = Format == WeightFormat::kAwq;
  auto end_group = [&]() {
    fold_group();
    group_source.Advance();
    group_source.Load(group_words);
    group_steps_left = steps_per_group;
  };
  int read_stage = 0;
  for (int i = 0; i < count; ++i) {
    if (i + kStages - 1 < count) issue();
    CommitAsync();
    if (kFoldAfterCopies && group_steps_left == 0) end_group();
    WaitAsync<kStages - 1>();
    const uint4* read_slots = warp_slots + read_stage * kStageVecs;
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    Tiles tiles;
    tiles.Read(read_slots);
    // x values of this lane's k for the B fragments (row g of each m8 tile).
    constexpr int kXWords = Tiles::kXBytes / 4;
    uint32_t xv[MTiles][kXWords];
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(read_slots + (Tiles::kVecs + mt * Layout::kXVecs) * 32);
#pragma unroll
      for (int v = 0; v < kXWords; ++v) xv[mt][v] = words[(v / 4) * 128 + v % 4];
    }
#pragma unroll
    for (int h = 0; h < Tiles::kChunks; ++h) {
      const int j0 = 2 * h, j1 = 2 * h + 1;
      uint32_t b[MTiles][2];
#pragma unroll
      for (int mt = 0; mt < MTiles; ++mt) {
        b[mt][0] = XPair(xv[mt], Tiles::PairLo(j0), Tiles::PairHi(j0));
        b[mt][1] = XPair(xv[mt], Tiles::PairLo(j1), Tiles::PairHi(j1));
        const uint32_t ones[4] = {C::kOnes, C::kOnes, C::kOnes, C::kOnes};
        Mma<T>(x_sum[mt], ones, b[mt][0], b[mt][1]);
      }
#pragma unroll
      for (int tau = 0; tau < 8; ++tau) {
        const int c0 = 2 * tau, c1 = 2 * tau + 1;
        const uint32_t a[4] = {
            C::Operand(tiles.Pair(c0, j0)),
            C::Operand(tiles.Pair(c1, j0)),
            C::Operand(tiles.Pair(c0, j1)),
            C::Operand(tiles.Pair(c1, j1)),
        };
#pragma unroll
        for (int mt = 0; mt < MTiles; ++mt) Mma<T>(group_acc[mt][tau], a, b[mt][0], b[mt][1]);
      }
    }
    if (--group_steps_left == 0 && !kFoldAfterCopies && i + 1 < count) end_group();
  }
  if (count > 0) fold_group();
  WaitAsync<0>();
  __syncthreads();  // the pipeline's shared memory becomes the reduction buffer
  auto reduce = reinterpret_cast<float(*)[8 * MTiles][kWarpColumns + 1]>(shared);

  // Accumulator (tile tau, m8 tile mt): rows g / g + 8 are columns 2 tau / 2 tau + 1, columns 2t, 2t + 1
  // are rows 8 mt + 2t, + 1 of x. Sum the warps' K ranges in warp order.
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
    for (int tau = 0; tau < 8; ++tau) {
      const int col0 = Tiles::Column(g, 2 * tau), col1 = Tiles::Column(g, 2 * tau + 1);
      reduce[warp][8 * mt + 2 * t][col0] = acc[mt][tau][0];
      reduce[warp][8 * mt + 2 * t + 1][col0] = acc[mt][tau][1];
      reduce[warp][8 * mt + 2 * t][col1] = acc[mt][tau][2];
      reduce[warp][8 * mt + 2 * t + 1][col1] = acc[mt][tau][3];
    }
  }
  __syncthreads();

  const int col = threadIdx.x;  // one output column per thread
  const int64_t n = n0 + col;
  const int rows = static_cast<int>(p.m - m0 < 8 * MTiles ? p.m - m0 : 8 * MTiles);
  T* out = static_cast<T*>(p.out);
  if (split_k == 1) {
    for (int r = 0; r < rows && n < n_end; ++r) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += reduce[w][r][col];
      out[(m0 + r) * p.n + n] = static_cast<T>(v);
    }
    return;
  }
  float* partials = reinterpret_cast<float*>(p.workspace);
  uint32_t* counters = p.workspace + split_k * p.m * p.n;
  for (int r = 0; r < rows && n < n_end; ++r) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += reduce[w][r][col];
    partials[(blockIdx.y * p.m + m0 + r) * p.n + n] = v;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t arrived = atomicAdd(counters + blockIdx.z * gridDim.x + blockIdx.x, 1u);
    last_block = arrived == static_cast<uint32_t>(split_k - 1);
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (n >= n_end) return;
  // Rows unrolled (predicated on `rows`): a split's loads for all rows are in flight together, where a loop
  // over rows waited for an L2 round trip per row and split.
  float sums[8 * MTiles] = {};
  for (int s = 0; s < split_k; ++s) {
#pragma unroll
    for (int r = 0; r < 8 * MTiles; ++r) {
      if (r < rows) sums[r] += __ldcg(partials + (s * p.m + m0 + r) * p.n + n);
    }
  }
#pragma unroll
  for (int r = 0; r < 8 * MTiles; ++r) {
    if (r < rows) out[(m0 + r) * p.n + n] = static_cast<T>(sums[r]);
  }
}

// ------------------------------------------------------------------------------- dequantize kernels

// AWQ: a thread per word: 8 columns of one row, one 16-byte store.
template <typename T>
__global__ void AwqDequantizeKernel(WeightOnlyParams p) {
  const int64_t words = p.n / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.k * words) return;
  const int64_t row = i / words, word = i % words;
  const int64_t group = row / (p.k / p.groups);
  const uint32_t q = __ldg(p.qweight + i);
  const uint32_t z = __ldg(p.qzeros + group * words + word);
  const uint4 s4 = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.scales) + group * p.n + 8 * word));
  const T* s = reinterpret_cast<const T*>(&s4);
  T out[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int nibble = c / 2 + 4 * (c % 2);  // column c sits at nibble AWQ_ORDER^-1[c]
    const int v = static_cast<int>((q >> (4 * nibble)) & 0xfu) - static_cast<int>((z >> (4 * nibble)) & 0xfu);
    out[c] = static_cast<T>(static_cast<float>(v) * static_cast<float>(s[c]));
  }
  *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * p.n + 8 * word) = *reinterpret_cast<uint4*>(out);
}

// GPTQ: a thread per 32-row block of two adjacent columns: reads Bits words of each, writes 32 rows of
// two-element stores.
template <typename T, int Bits, bool Exllama>
__global__ void GptqDequantizeKernel(WeightOnlyParams p) {
  const int64_t pairs = p.n / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.k / 32 * pairs) return;
  const int64_t block = i / pairs, n = 2 * (i % pairs);
  uint32_t w[2][Bits];
#pragma unroll
  for (int r = 0; r < Bits; ++r) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p.qweight + (block * Bits + r) * p.n + n));
    w[0][r] = v.x;
    w[1][r] = v.y;
  }
  const int64_t group_size = p.k / p.groups;
  const T* scales = static_cast<const T*>(p.scales);
  const uint32_t* zero_rows = p.qzeros;
  const int64_t zero_words = p.n * Bits / 32;
  // Without g_idx a 32-row block lies in one group (groups are multiples of 32 rows).
  const int64_t block_group = block * 32 / group_size;
  int64_t loaded = -1;
  float z[2] = {}, s[2] = {};
  using T2 = typename Half2Ops<T>::T2;
  T2* out = reinterpret_cast<T2*>(static_cast<T*>(p.out) + block * 32 * p.n + n);
#pragma unroll
  for (int v = 0; v < 32; ++v) {
    const int64_t row = block * 32 + v;
    // A corrupt checkpoint's g_idx is clamped to the groups, as the reference does (never read past the scales).
    const int64_t group = p.g_idx ? min(max(__ldg(p.g_idx + row), 0), static_cast<int>(p.groups) - 1) : block_group;
    if (group != loaded) {
      loaded = group;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t bit = (n + c) * Bits;
        const uint32_t* zr = zero_rows + group * zero_words;
        uint64_t window = __ldg(zr + bit / 32);
        if (bit % 32 + Bits > 32) window |= static_cast<uint64_t>(__ldg(zr + bit / 32 + 1)) << 32;
        z[c] = static_cast<float>((static_cast<uint32_t>(window >> (bit % 32)) & ((1u << Bits) - 1)) + p.zero_offset);
        s[c] = static_cast<float>(scales[group * p.n + n + c]);
      }
    }
    const float lo = (static_cast<float>(ValueOf<Bits, Exllama>(w[0], v)) - z[0]) * s[0];
    const float hi = (static_cast<float>(ValueOf<Bits, Exllama>(w[1], v)) - z[1]) * s[1];
    T2 pair;
    pair.x = static_cast<T>(lo);
    pair.y = static_cast<T>(hi);
    out[v * p.n / 2] = pair;
  }
}

template <typename T, WeightFormat Format, int Bits, int MTiles>
cudaError_t LaunchGemmKernel(const WeightOnlyParams& p, int split_k, ColumnBlocks columns, dim3 grid,
                             cudaStream_t stream) {
  using Layout = StageLayout<typename Traits<T, Format, Bits>::Tiles, MTiles>;
  constexpr int kPipelineBytes = kWarps * Layout::kBytesPerWarp;
  constexpr int kReduceBytes = kWarps * 8 * MTiles * (kWarpColumns + 1) * 4;
  constexpr int kBytes = kPipelineBytes > kReduceBytes ? kPipelineBytes : kReduceBytes;
  auto kernel = WeightOnlyGemmKernel<T, Format, Bits, MTiles>;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (configured != cudaSuccess) return configured;
  kernel<<<grid, kWarps * 32, kBytes, stream>>>(p, split_k, columns);
  return cudaGetLastError();
}

// Whole tiles, except for GPTQ in one row pass without a K split when the tiles outnumber the SMs by at most a
// 96-column block per SM: then the first `sms` blocks (which the block scheduler deals one per SM) take whole
// tiles and the rest 96 columns, so that the SMs holding two blocks read 224 columns of weights, not 256 (at
// N=28672 on the H100 all but nine SMs then hold two blocks; with whole tiles 92 hold two and 40 one). A narrow
// block issues as many instructions as a whole one (its idle lanes run along), so this evens out bytes only:
// 2-5% for GPTQ at K8192 N20480-28672, M1 and M16 (H100, benchmarks/history/2026-11-24-h100.md). 96 GPTQ
// columns are 384-byte row segments, whole 128-byte lines; AWQ's would be 48-byte segments, which lost 1-3% at
// M16, so AWQ keeps whole tiles.
template <WeightFormat Format>
ColumnBlocks ColumnBlocksFor(const WeightOnlyParams& p, int split_k) {
  constexpr int kTailColumns = 96;
  const ColumnBlocks whole{(p.n + kWarpColumns - 1) / kWarpColumns, kWarpColumns};
  if (Format == WeightFormat::kAwq || split_k > 1 || p.m > kRowsPerPass) return whole;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return whole;
  const int64_t sms = CachedSmCount(device);
  const int64_t tail = p.n - sms * kWarpColumns;
  return tail > 0 && tail <= sms * kTailColumns ? ColumnBlocks{sms, kTailColumns} : whole;
}

template <typename T, WeightFormat Format, int Bits>
cudaError_t LaunchGemmTyped(const WeightOnlyParams& p, int split_k, cudaStream_t stream) {
  const ColumnBlocks columns = ColumnBlocksFor<Format>(p, split_k);
  const dim3 grid(static_cast<unsigned>(columns.Count(p.n)), static_cast<unsigned>(split_k),
                  static_cast<unsigned>((p.m + kRowsPerPass - 1) / kRowsPerPass));
  return p.m <= 8 ? LaunchGemmKernel<T, Format, Bits, 1>(p, split_k, columns, grid, stream)
                  : LaunchGemmKernel<T, Format, Bits, 2>(p, split_k, columns, grid, stream);
}

template <typename T, WeightFormat Format>
cudaError_t LaunchGemmFormat(const WeightOnlyParams& p, int split_k, cudaStream_t stream) {
  if constexpr (Format == WeightFormat::kAwq) {
    return LaunchGemmTyped<T, Format, 4>(p, split_k, stream);
  } else {
    switch (p.bits) {
      case 2: return LaunchGemmTyped<T, Format, 2>(p, split_k, stream);
      case 3: return LaunchGemmTyped<T, Format, 3>(p, split_k, stream);
      case 4: return LaunchGemmTyped<T, Format, 4>(p, split_k, stream);
      case 8: return LaunchGemmTyped<T, Format, 8>(p, split_k, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <typename T>
cudaError_t LaunchGemmType(const WeightOnlyParams& p, int split_k, cudaStream_t stream) {
  switch (p.format) {
    case WeightFormat::kAwq: return LaunchGemmFormat<T, WeightFormat::kAwq>(p, split_k, stream);
    case WeightFormat::kGptq: return LaunchGemmFormat<T, WeightFormat::kGptq>(p, split_k, stream);
    case WeightFormat::kGptqExllama: return LaunchGemmFormat<T, WeightFormat::kGptqExllama>(p, split_k, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int Bits>
cudaError_t LaunchGptqDequantize(const WeightOnlyParams& p, cudaStream_t stream) {
  const int64_t threads = p.k / 32 * (p.n / 2);
  const auto blocks = static_cast<unsigned>((threads + 255) / 256);
  if (p.format == WeightFormat::kGptqExllama) {
    GptqDequantizeKernel<T, Bits, true><<<blocks, 256, 0, stream>>>(p);
  } else {
    GptqDequantizeKernel<T, Bits, false><<<blocks, 256, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchDequantizeType(const WeightOnlyParams& p, cudaStream_t stream) {
  if (p.format == WeightFormat::kAwq) {
    const int64_t threads = p.k * (p.n / 8);
    AwqDequantizeKernel<T><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p);
    return cudaGetLastError();
  }
  switch (p.bits) {
    case 2: return LaunchGptqDequantize<T, 2>(p, stream);
    case 3: return LaunchGptqDequantize<T, 3>(p, stream);
    case 4: return LaunchGptqDequantize<T, 4>(p, stream);
    case 8: return LaunchGptqDequantize<T, 8>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int WeightOnlySlabK(WeightFormat format, int bits) {
  if (format == WeightFormat::kAwq) return AwqTiles::kSlabK;
  return 4 * 32 * (bits == 3 ? 3 : 1) / bits;
}

int64_t WeightOnlyWorkspaceWords(int64_t m, int64_t n, int split_k) {
  const int64_t counters = (n + kWarpColumns - 1) / kWarpColumns * ((m + kRowsPerPass - 1) / kRowsPerPass);
  return (split_k > 1 ? split_k * m * n : 0) + counters;
}

bool WeightOnlyGemmSupports(const WeightOnlyParams& p) {
  const int slab = WeightOnlySlabK(p.format, p.bits);
  // A warp step must lie in one group (zeros and scales are applied per group after the MMAs).
  return p.n % 32 == 0 && p.groups > 0 && p.k % p.groups == 0 && (p.k / p.groups) % slab == 0 &&
         p.k * p.n / 8 < (int64_t{1} << 31) && (p.type == FloatType::kF16 || p.type == FloatType::kBF16);
}

cudaError_t LaunchWeightOnlyGemm(const WeightOnlyParams& p, int split_k, cudaStream_t stream) {
  if (!WeightOnlyGemmSupports(p) || split_k < 1) return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (split_k > 1) {  // only a split K uses the arrival counters
    const int64_t counters = WeightOnlyWorkspaceWords(p.m, p.n, 1);
    const cudaError_t err = cudaMemsetAsync(p.workspace + split_k * p.m * p.n, 0, counters * sizeof(uint32_t), stream);
    if (err != cudaSuccess) return err;
  }
  return p.type == FloatType::kF16 ? LaunchGemmType<__half>(p, split_k, stream)
                                   : LaunchGemmType<__nv_bfloat16>(p, split_k, stream);
}

cudaError_t LaunchWeightDequantize(const WeightOnlyParams& p, cudaStream_t stream) {
  if (p.k == 0 || p.n == 0) return cudaSuccess;
  if (p.k % 32 != 0 || p.n % 8 != 0) return cudaErrorInvalidValue;
  return p.type == FloatType::kF16 ? LaunchDequantizeType<__half>(p, stream)
                                   : LaunchDequantizeType<__nv_bfloat16>(p, stream);
}

}  // namespace jaxq
