// marlin_gemm on Hopper's tensor cores (wgmma, sm_90a) for the rows where the mma.sync kernel (marlin.cu) falls
// behind: 4-bit integer weights (uint4b8, uint4 with zero points) in the Marlin layout as it is stored, so that
// one copy of the weight serves decode and prefill.
//
// out^T = W^T a^T. A block is two warpgroups, one 64-column Marlin tile each, and 128 rows of a; W^T is wgmma's A
// operand from registers (warp w of a warpgroup takes word w of each lane's 16-byte vector: that word holds the
// lane's register A fragment, marlin_fragments.cuh), dequantized there and rounded to T as the reference does;
// a^T is the B operand, 128 rows x 64 k per stage in shared memory with the 128-byte swizzle (without it the
// wgmmas ran at half the rate on the H200). All 256 threads copy a stage (codes, a, the scales and zero points of
// its two 32-row halves, since group 32 changes within it) with cp.async into a ring of kStages, kStages - 2
// stages ahead. Each k-step's wgmma is its own commit group with at most three in flight, and a k-step's A
// registers are written after the wait that retires the wgmma that last read them (ptxas serializes the wgmmas
// otherwise). Each row is summed in the same order whatever m is: no K split, the same configuration for every m.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/device_utils.cuh"
#include "kernels/marlin.h"
#include "kernels/marlin_fragments.cuh"

namespace jaxq {
namespace {

constexpr int kThreads = 256;                         // two warpgroups
constexpr int kBlockCols = 2 * kTileN;                // one tile per warpgroup
constexpr int kRows = 128;                            // rows of a per block: wgmma's N
constexpr int kStageK = 64;                           // four k-steps of 16
constexpr int kStages = 5;                            // two blocks per SM
constexpr int kA = 0;                                 // 1024-aligned: the swizzle repeats every 8 rows of 128 bytes
constexpr int kCodes = kA + kRows * kStageK * 2;      // 4 slabs x 2 tiles x 512 bytes
constexpr int kScales = kCodes + kStageK / kTileK * 2 * 512;  // 2 halves x 128 scales
constexpr int kZeros = kScales + 2 * kBlockCols * 2;          // 2 halves x 16 words (uint4 only)
constexpr int kStageBytes = (kZeros + 2 * kBlockCols / 8 * 4 + 1023) / 1024 * 1024;
constexpr int kSharedBytes = kStages * kStageBytes;

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

// d (64 weight columns x 128 rows of a, float32, wgmma's layout) += A (64 x 16 in T, registers) * B (16 x 128
// in T, shared memory at `desc`); with accumulate false, d = A * B.
#define JAXQ_WGMMA_M64N128K16(TYPE)                                                                                  \
  asm volatile(                                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                               \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                       \
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                             \
      " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                             \
      " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                            \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                                  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),             \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),       \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),     \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),     \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),     \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),     \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),     \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(accumulate)))

template <typename T>
__device__ __forceinline__ void Wgmma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, bool accumulate) {
  if constexpr (std::is_same_v<T, half>) {
    JAXQ_WGMMA_M64N128K16("f16");
  } else {
    JAXQ_WGMMA_M64N128K16("bf16");
  }
}
#undef JAXQ_WGMMA_M64N128K16

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of `r` across the asynchronous wgmmas.
__device__ __forceinline__ void Pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <typename T, MarlinType kType>
__global__ void __launch_bounds__(kThreads, 2) MarlinHopperKernel(MarlinParams p) {
  constexpr bool kHasZeros = kType == MarlinType::kU4;
  extern __shared__ __align__(1024) char shared[];
  const uint32_t shared_at = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, half_block = tid >> 7;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kBlockCols;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int stages = p.k / kStageK;
  const int group_size = p.k / p.groups;
  const size_t slab_bytes = static_cast<size_t>(p.n / kTileN) * 512;  // one 16-row slab of the whole weight
  const T* a = static_cast<const T*>(p.a);
  const T* scales = static_cast<const T*>(p.scales);

  auto issue = [&](int s) {
    if (s < stages) {
      const uint32_t stage = shared_at + (s % kStages) * kStageBytes;
      {  // codes: 4 slabs x the block's two tiles, 16 bytes per thread
        const int slab = tid >> 6, piece = tid & 63;
        const char* src = reinterpret_cast<const char*>(p.b_q) + (static_cast<size_t>(s) * 4 + slab) * slab_bytes +
                          static_cast<size_t>(n0 / kTileN) * 512 + piece * 16;
        CopyAsync<16, true>(stage + kCodes + slab * 1024 + piece * 16, src, 16);
      }
#pragma unroll
      for (int i = 0; i < kRows * 8 / kThreads; ++i) {  // a: 128 rows x 8 pieces of 8 k; rows past m are zeros
        const int c = tid + i * kThreads, r = c >> 3, q = c & 7;
        const bool valid = m0 + r < p.m;
        const T* src = a + (valid ? m0 + r : 0) * p.k + s * kStageK + q * 8;
        CopyAsync<16, false>(stage + kA + AOffset(r, q * 8), src, valid ? 16 : 0);
      }
      const int half = (tid >> 4) & 1;  // the 32-row half of the stage whose group this thread copies
      const size_t group = (s * kStageK + half * 32) / group_size;
      if (tid < 32) {
        CopyAsync<16, false>(stage + kScales + tid * 16, scales + group * p.n + n0 + (tid & 15) * 8, 16);
      } else if (kHasZeros && tid < 40) {
        const int piece = tid - 32, zero_half = piece >> 2;
        const size_t zero_group = (s * kStageK + zero_half * 32) / group_size;
        CopyAsync<16, false>(stage + kZeros + piece * 16, p.zeros + zero_group * (p.n / 8) + n0 / 8 + (piece & 3) * 4,
                             16);
      }
    }
    CommitAsync();  // empty groups too, so that every wait counts the same stages
  };

  float acc[kRows / 2];  // written first by a wgmma that does not accumulate: a plain store here would serialize them
  // A k-step's A registers; scale and minus-offset pairs of the lane's columns 16w + g (h = 0) and 16w + 8 + g
  // (h = 1) for each 32-row half of the stage.
  uint32_t frag[4][4];
  T2<T> scale[2][2], neg[2][2];
  const char* stage = shared;
  auto begin_stage = [&](int s) {
    WaitAsync<kStages - 3>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, seen by wgmma
    __syncthreads();
    issue(s + kStages - 2);  // into the slot of stage s - 2, whose wgmmas both warpgroups have retired
    stage = shared + (s % kStages) * kStageBytes;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const T* row = reinterpret_cast<const T*>(stage + kScales) + half * kBlockCols + half_block * kTileN;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // vLLM's grouped permutation puts column 16w + 8h + g of a tile at 8g + 2w + h; its per-channel one
        // scatters them (LoadScales).
        const T s_value = p.per_channel ? row[32 * (warp >> 1) + 8 * ((g >> 1) & 3) + 4 * (warp & 1) + 2 * h + (g & 1)]
                                        : row[8 * g + 2 * warp + h];
        scale[half][h] = T2<T>{s_value, s_value};
        float offset = kType == MarlinType::kU4B8 ? 8.0f : 0.0f;
        if constexpr (kHasZeros) {
          const uint32_t word = reinterpret_cast<const uint32_t*>(stage + kZeros)[half * 16 + half_block * 8 + g];
          offset = static_cast<float>(ZeroNibble(word, 2 * warp + h));
        }
        T2<T> unused;
        Offsets<T, kType>(offset, offset, offset, offset, neg[half][h], unused);
      }
    }
  };
  auto dequantize = [&](int step) {
    uint4 codes;  // the warp's word of the lane's vector, where RawFragments reads word 0
    codes.x = *reinterpret_cast<const uint32_t*>(stage + kCodes + step * 1024 + half_block * 512 + lane * 16 + warp * 4);
    const int half = step >> 1;
    uint32_t b[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Dequantize<T, kType>(&codes, 0, h, neg[half][h], neg[half][h], scale[half][h], scale[half][h], b[h][0], b[h][1]);
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
    const uint32_t tile = shared_at + (s % kStages) * kStageBytes + kA;
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      WgmmaFence();
      Wgmma<T>(acc, frag[step], Descriptor(tile, step), s > 0 || step > 0);
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

  // acc[4b + c]: a weight column 16w + g (c < 2) or + 8 of the warpgroup's tile, a row 8b + 2t + (c & 1).
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int col = n0 + half_block * kTileN + 16 * warp + g;
  const float bias_lo = bias != nullptr ? ToFloat(bias[col]) : 0.0f;
  const float bias_hi = bias != nullptr ? ToFloat(bias[col + 8]) : 0.0f;
#pragma unroll
  for (int b = 0; b < kRows / 8; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t row = m0 + 8 * b + 2 * t + (c & 1);
      if (row < p.m) out[row * p.n + col + 8 * (c >> 1)] = FromFloat<T>(acc[4 * b + c] + (c < 2 ? bias_lo : bias_hi));
    }
}

template <typename T, MarlinType kType>
cudaError_t Launch(const MarlinParams& p, cudaStream_t stream) {
  auto kernel = MarlinHopperKernel<T, kType>;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (configured != cudaSuccess) return configured;
  const dim3 grid(p.n / kBlockCols, static_cast<unsigned>((p.m + kRows - 1) / kRows));
  kernel<<<grid, kThreads, kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t DispatchType(const MarlinParams& p, cudaStream_t stream) {
  if (p.weight == MarlinType::kU4B8) return Launch<T, MarlinType::kU4B8>(p, stream);
  return Launch<T, MarlinType::kU4>(p, stream);
}

}  // namespace

bool MarlinHopperSupports(const MarlinParams& p) {
  const bool type = p.weight == MarlinType::kU4B8 || p.weight == MarlinType::kU4;
  const bool groups = p.groups == 1 || (p.k % p.groups == 0 && (p.k / p.groups) % 32 == 0);
  return type && groups && p.g_idx == nullptr && p.n % kBlockCols == 0 && p.k % kStageK == 0 &&
         (p.type == FloatType::kF16 || p.type == FloatType::kBF16);
}

cudaError_t LaunchMarlinGemmHopper(const MarlinParams& p, cudaStream_t stream) {
  if (!MarlinHopperSupports(p)) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  if (p.type == FloatType::kF16) return DispatchType<half>(p, stream);
  return DispatchType<__nv_bfloat16>(p, stream);
}

}  // namespace jaxq
