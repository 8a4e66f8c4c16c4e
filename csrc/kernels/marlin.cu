// Weight-only GEMM on the Marlin layout. One block (4 warps) owns one 64-column tile of the output for up to 64
// rows of a and one K range; the 4 warps take every 4th 16-row slab of that range. A lane's 16-byte load of a
// slab holds exactly its B fragments of mma.m16n8k16 for all 64 columns (that is what the layout is for), so the
// codes are turned into a's type in registers, scaled there, and multiplied on the tensor cores with float32
// sums. The warps' sums meet in shared memory, in warp order; when K is split over several blocks (few column
// tiles), those blocks form a thread-block cluster and the first adds the others' sums from their shared memory,
// in rank order. No atomics and no workspace: deterministic, and each row is summed the same way whatever m is.
#include "kernels/marlin.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/sm_count.h"

namespace jaxq {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 4;
constexpr int kTileK = 16;
constexpr int kTileN = 64;
constexpr int kRowsPerBlock = 64;  // rows of a per block: 4 mma row blocks
constexpr int kMaxSplits = 8;      // the portable cluster size

template <typename T>
struct Pair;
template <>
struct Pair<half> {
  using Type = half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in each half: 1024 + a 4-bit code is exact
  static constexpr float kMagicValue = 1024.0f;
};
template <>
struct Pair<__nv_bfloat16> {
  using Type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in each half: 128 + a 4-bit code is exact
  static constexpr float kMagicValue = 128.0f;
};

template <typename T>
using T2 = typename Pair<T>::Type;

template <typename T>
__device__ __forceinline__ T2<T> AsPair(uint32_t bits) {
  return *reinterpret_cast<T2<T>*>(&bits);
}

template <typename T>
__device__ __forceinline__ uint32_t Bits(T2<T> v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T2<T> MakePair(float lo, float hi) {
  if constexpr (std::is_same_v<T, half>) {
    return __floats2half2_rn(lo, hi);
  } else {
    return __floats2bfloat162_rn(lo, hi);
  }
}

template <typename T>
__device__ __forceinline__ float ToFloat(T v) {
  if constexpr (std::is_same_v<T, half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v) {
  if constexpr (std::is_same_v<T, half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// Codes of rows (r, r + 1) of one column -> a pair in T, exact: `word` holds them as the low and high 16 bits
// (4-bit codes in bits 0..3 of each half; 8-bit codes in bits 0..7). Integer types come out as code - offset
// with `offset` a pair (per row) of the subtracted bias or zero point; fp8 as its value times 2**-bias (the
// scales carry 2**bias, as in vLLM).
template <typename T, MarlinType kType>
__device__ __forceinline__ T2<T> Codes(uint32_t word, T2<T> offset) {
  if constexpr (kType == MarlinType::kFp8E4M3) {
    constexpr int kShift = std::is_same_v<T, half> ? 7 : 4;  // e4m3's exponent and mantissa under T's
    return AsPair<T>(((word & 0x007f007fu) << kShift) | ((word & 0x00800080u) << 8));
  } else if constexpr (kType == MarlinType::kU8B128 && std::is_same_v<T, half>) {
    return __hsub2(AsPair<T>(word | 0x64006400u), offset);
  } else if constexpr (kType == MarlinType::kU8B128) {
    // bfloat16 has 8 significant bits: go through float32 (exact for 0..255 - 128).
    return MakePair<T>(static_cast<float>(word & 0xffu) - 128.0f, static_cast<float>(word >> 16) - 128.0f);
  } else {
    return __hsub2(AsPair<T>(word | Pair<T>::kMagic), offset);
  }
}

// The 8 scales (or zero points) one lane needs for its columns 16 * w + 8 * h + lane / 4 of the tile, in order
// j = 2 * w + h: with several groups one 16-byte vector (vLLM's grouped permutation puts them side by side);
// with one group vLLM's other permutation scatters them.
template <typename T>
__device__ __forceinline__ void LoadScales(const T* row, int lane_col, bool single, T (&s)[8]) {
  if (!single) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + 8 * lane_col));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = e[j];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int w = j >> 1, h = j & 1;
      s[j] = row[32 * (w >> 1) + 8 * ((lane_col >> 1) & 3) + 4 * (w & 1) + 2 * h + (lane_col & 1)];
    }
  }
}

// Zero point of column j (= 2 * w + h) from the lane's packed word: nibble w for h = 0, 4 + w for h = 1.
__device__ __forceinline__ uint32_t ZeroNibble(uint32_t word, int j) {
  return (word >> (4 * ((j & 1) * 4 + (j >> 1)))) & 0xfu;
}

template <typename T, MarlinType kType, int kMBlocks, bool kActOrder>
__global__ void __launch_bounds__(kWarps * 32) MarlinGemmKernel(MarlinParams p, int k_tiles_per_split) {
  constexpr int kBits = kType == MarlinType::kU4B8 || kType == MarlinType::kU4 ? 4 : 8;
  constexpr int kVectors = kBits / 4;                  // 16-byte vectors per lane per 16 x 64 tile
  constexpr int kUnroll = (kMBlocks <= 1 ? 8 : kMBlocks == 2 ? 4 : 2) / kVectors;
  constexpr bool kHasZeros = kType == MarlinType::kU4;
  const T* a = static_cast<const T*>(p.a);
  const T* scales = static_cast<const T*>(p.scales);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment row / column group
  const int n_tiles = p.n / kTileN;
  const int nt = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int k_tiles = p.k / kTileK;
  const int kt_begin = blockIdx.z * k_tiles_per_split;
  const int kt_end = min(kt_begin + k_tiles_per_split, k_tiles);
  const bool single = p.groups == 1;
  const int group_rows = p.k / p.groups;  // rows per group without act-order

  float acc[kMBlocks][8][4];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mb][j][c] = 0.0f;

  // Rows of a this lane feeds into the mma (g and g + 8 of each row block); rows past m read as zeros.
  const T* a_rows[kMBlocks][2];
  bool a_valid[kMBlocks][2];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + mb * 16 + g + 8 * r;
      a_valid[mb][r] = row < p.m;
      a_rows[mb][r] = a + (a_valid[mb][r] ? row : 0) * p.k + 2 * t;
    }

  const size_t words_per_tile = kTileK * kTileN * kBits / 32;
  const uint4* b_lane = reinterpret_cast<const uint4*>(p.b_q + static_cast<size_t>(nt) * words_per_tile) +
                        lane * kVectors;
  const size_t b_stride = static_cast<size_t>(n_tiles) * words_per_tile / 4;  // uint4s per 16-row slab
  const T* scale_tile = scales + static_cast<size_t>(nt) * kTileN;
  const uint32_t* zero_tile = kHasZeros ? p.zeros + static_cast<size_t>(nt) * (kTileN / 8) + g : nullptr;
  const size_t zero_stride = p.n / 8;

  for (int kt0 = kt_begin + warp; kt0 < kt_end; kt0 += kWarps * kUnroll) {
    // Everything the next kUnroll slabs need is requested before any is used: the weight codes, their scales
    // and the A fragments (a's rows are read by every block, so they mostly come from L2; waiting for them
    // slab by slab left the loads of the codes idle).
    uint4 codes[kUnroll][kVectors];
    T s[kUnroll][8];
    uint32_t frag_a[kUnroll][kMBlocks][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kt = kt0 + kWarps * u;
      if (kt < kt_end) {
#pragma unroll
        for (int v = 0; v < kVectors; ++v) codes[u][v] = __ldcs(b_lane + kt * b_stride + v);
        if constexpr (!kActOrder) {
          const int group = single ? 0 : kt * kTileK / group_rows;
          LoadScales(scale_tile + static_cast<size_t>(group) * p.n, g, single, s[u]);
        }
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb) {
          const int col = kt * kTileK;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            frag_a[u][mb][r] = a_valid[mb][r] ? __ldg(reinterpret_cast<const uint32_t*>(a_rows[mb][r] + col)) : 0u;
            frag_a[u][mb][2 + r] =
                a_valid[mb][r] ? __ldg(reinterpret_cast<const uint32_t*>(a_rows[mb][r] + col + 8)) : 0u;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kt = kt0 + kWarps * u;
      if (kt >= kt_end) continue;
      // Per column j and row pair (2t, 2t+1) / (2t+8, 2t+9): the scale and the subtracted offset.
      T2<T> scale01[8], scale89[8], offset01[8], offset89[8];
      if constexpr (kActOrder) {
        T sr[4][8];
        uint32_t zr[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = kt * kTileK + 2 * t + (r & 1) + 8 * (r >> 1);
          const int group = min(max(__ldg(p.g_idx + row), 0), p.groups - 1);
          LoadScales(scale_tile + static_cast<size_t>(group) * p.n, g, single, sr[r]);
          if constexpr (kHasZeros) zr[r] = __ldg(zero_tile + group * zero_stride);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          scale01[j] = T2<T>{sr[0][j], sr[1][j]};
          scale89[j] = T2<T>{sr[2][j], sr[3][j]};
          if constexpr (kHasZeros) {
            const float base = Pair<T>::kMagicValue;
            offset01[j] = MakePair<T>(base + ZeroNibble(zr[0], j), base + ZeroNibble(zr[1], j));
            offset89[j] = MakePair<T>(base + ZeroNibble(zr[2], j), base + ZeroNibble(zr[3], j));
          }
        }
      } else {
        uint32_t z = 0;
        if constexpr (kHasZeros) z = __ldg(zero_tile + (single ? 0 : kt * kTileK / group_rows) * zero_stride);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          scale01[j] = scale89[j] = T2<T>{s[u][j], s[u][j]};
          if constexpr (kHasZeros) {
            const float zero = Pair<T>::kMagicValue + ZeroNibble(z, j);
            offset01[j] = offset89[j] = MakePair<T>(zero, zero);
          }
        }
      }
      if constexpr (!kHasZeros) {
        const float bias = kType == MarlinType::kU4B8    ? Pair<T>::kMagicValue + 8.0f
                           : kType == MarlinType::kU8B128 ? 1024.0f + 128.0f  // used by float16 only
                                                          : 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) offset01[j] = offset89[j] = MakePair<T>(bias, bias);
      }

#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * w + h;
          uint32_t lo, hi;  // codes of rows (2t, 2t+1) and (2t+8, 2t+9) of column j, one per 16 bits
          if constexpr (kBits == 4) {
            const uint32_t word = w == 0 ? codes[u][0].x : w == 1 ? codes[u][0].y : w == 2 ? codes[u][0].z
                                                                                        : codes[u][0].w;
            lo = (word >> (8 * h)) & 0x000f000fu;
            hi = (word >> (8 * h + 4)) & 0x000f000fu;
          } else {
            const uint4& v = codes[u][w >> 1];
            const uint32_t word = (2 * (w & 1) + h) == 0   ? v.x
                                  : (2 * (w & 1) + h) == 1 ? v.y
                                  : (2 * (w & 1) + h) == 2 ? v.z
                                                           : v.w;
            lo = __byte_perm(word, 0u, 0x4240);  // bytes 0 and 2: rows 2t and 2t+1
            hi = __byte_perm(word, 0u, 0x4341);  // bytes 1 and 3: rows 2t+8 and 2t+9
          }
          const uint32_t b0 = Bits<T>(__hmul2(Codes<T, kType>(lo, offset01[j]), scale01[j]));
          const uint32_t b1 = Bits<T>(__hmul2(Codes<T, kType>(hi, offset89[j]), scale89[j]));
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb) Mma<T>(acc[mb][j], frag_a[u][mb], b0, b1);
        }
      }
    }
  }

  // The warps' sums, then (with a K split) the cluster's, added in a fixed order.
  extern __shared__ float4 shared_raw[];
  float* partial = reinterpret_cast<float*>(shared_raw);
  constexpr int kTileFloats = kMBlocks * 16 * kTileN;
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = mb * 16 + g + 8 * r, col = 16 * (j >> 1) + 8 * (j & 1) + 2 * t;
        *reinterpret_cast<float2*>(partial + warp * kTileFloats + row * kTileN + col) =
            make_float2(acc[mb][j][2 * r], acc[mb][j][2 * r + 1]);
      }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileFloats; i += kWarps * 32) {
    float sum = partial[i];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += partial[w * kTileFloats + i];
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
  for (int i = threadIdx.x; i < kTileFloats; i += kWarps * 32) {
    float sum = partial[i];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int rank = 1; rank < splits; ++rank) sum += cluster.map_shared_rank(partial, rank)[i];
#endif
    const int64_t row = m0 + i / kTileN;
    const int col = nt * kTileN + i % kTileN;
    if (row < p.m) {
      if (bias != nullptr) sum += ToFloat(bias[col]);
      out[row * p.n + col] = FromFloat<T>(sum);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (splits > 1) cluster.sync();
#endif
}

template <typename T, MarlinType kType, int kMBlocks, bool kActOrder>
cudaError_t Launch(const MarlinParams& p, int splits, cudaStream_t stream) {
  auto kernel = MarlinGemmKernel<T, kType, kMBlocks, kActOrder>;
  const int shared = kWarps * kMBlocks * 16 * kTileN * sizeof(float);
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
  if (configured != cudaSuccess) return configured;
  const int k_tiles = p.k / kTileK;
  const int per_split = (k_tiles + splits - 1) / splits;
  const int64_t row_blocks = (p.m + kRowsPerBlock - 1) / kRowsPerBlock;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(row_blocks), p.n / kTileN, splits);
  config.blockDim = dim3(kWarps * 32);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 1;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = splits;
  config.attrs = cluster;
  config.numAttrs = splits > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p, per_split);
}

template <typename T, MarlinType kType, bool kActOrder>
cudaError_t DispatchRows(const MarlinParams& p, int splits, cudaStream_t stream) {
  if (p.m <= 16) return Launch<T, kType, 1, kActOrder>(p, splits, stream);
  if (p.m <= 32) return Launch<T, kType, 2, kActOrder>(p, splits, stream);
  if (p.m <= 48) return Launch<T, kType, 3, kActOrder>(p, splits, stream);
  return Launch<T, kType, 4, kActOrder>(p, splits, stream);
}

template <typename T, MarlinType kType>
cudaError_t DispatchActOrder(const MarlinParams& p, int splits, cudaStream_t stream) {
  if constexpr (kType == MarlinType::kFp8E4M3) {
    if (p.g_idx != nullptr) return cudaErrorInvalidValue;  // vLLM has no act-order fp8 weights either
    return DispatchRows<T, kType, false>(p, splits, stream);
  } else {
    if (p.g_idx != nullptr) return DispatchRows<T, kType, true>(p, splits, stream);
    return DispatchRows<T, kType, false>(p, splits, stream);
  }
}

template <typename T>
cudaError_t DispatchType(const MarlinParams& p, int splits, cudaStream_t stream) {
  switch (p.weight) {
    case MarlinType::kU4B8: return DispatchActOrder<T, MarlinType::kU4B8>(p, splits, stream);
    case MarlinType::kU4: return DispatchActOrder<T, MarlinType::kU4>(p, splits, stream);
    case MarlinType::kU8B128: return DispatchActOrder<T, MarlinType::kU8B128>(p, splits, stream);
    case MarlinType::kFp8E4M3: return DispatchActOrder<T, MarlinType::kFp8E4M3>(p, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int MarlinBits(MarlinType t) { return t == MarlinType::kU4B8 || t == MarlinType::kU4 ? 4 : 8; }

int MarlinKSplits(int n, int k, int sm_count) {
  // Enough blocks for two per SM, while each warp keeps at least 4 slabs of K (fewer and the cluster's
  // reduction costs more than the parallelism gains).
  const int tiles = n / kTileN, k_tiles = k / kTileK;
  int splits = 1;
  while (splits < kMaxSplits && tiles * splits < 2 * sm_count && k_tiles / (2 * splits) >= 4 * kWarps) splits *= 2;
  return splits;
}

cudaError_t LaunchMarlinGemm(const MarlinParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (p.k % kTileK || p.n % kTileN || p.groups < 1 || (p.g_idx == nullptr && p.k % p.groups) ||
      (p.weight == MarlinType::kU4) != (p.zeros != nullptr)) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  const int splits = major >= 9 ? MarlinKSplits(p.n, p.k, CachedSmCount(device)) : 1;
  if (p.type == FloatType::kF16) return DispatchType<half>(p, splits, stream);
  if (p.type == FloatType::kBF16) return DispatchType<__nv_bfloat16>(p, splits, stream);
  return cudaErrorInvalidValue;
}

}  // namespace jaxq
