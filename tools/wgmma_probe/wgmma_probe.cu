// A prototype of the Hopper tensor-core path for marlin_gemm at M >= 64 (wgmma, sm_90a), outside JAX: does a
// kernel that reads the Marlin layout as it is (one stored weight for decode and prefill) and feeds wgmma its
// A operand from registers reach the tensor cores' rate? uint4b8, bfloat16, scales grouped by 64 rows or more.
//
// out^T = W^T a^T: W^T [n, k] is wgmma's A operand (64 weight columns x 16 k per wgmma, from registers), a^T
// its B operand (16 k x the block's rows of a, K-major in shared memory). A lane's 16-byte vector of a 16 x 64
// Marlin tile holds, in its word w, the mma.m16n8k16 A fragments of columns 16w + g and 16w + 8 + g (marlin.cu's
// kernel uses them so), and wgmma's register A fragment is mma.m16n8k16's for each warp's 16 rows: warp w of a
// warpgroup takes word w of every lane's vector. A block is two warpgroups (128 weight columns: two Marlin tiles)
// x 64 or 128 rows of a (both are timed); a stage holds 64 of K (codes, a's rows in wgmma's core-matrix layout,
// the group's scales), copied with cp.async by all 256 threads, kStages - 2 stages ahead, so that a stage is
// rewritten only after the wgmmas that read it (two stages back) have completed; each stage's codes are
// dequantized into registers (W rounded to bfloat16, as marlin_gemm's reference does) while the previous stage's
// wgmmas run.
//
// Build here (tools/wgmma_probe/run.sh build), run on the device (run.sh run): checks the output against jaxq's
// marlin_gemm kernel in its W-rounded form (batch_invariant: the same W, float32 sums in another order) and times
// both (CUDA events, best of 5 x 30 calls over three weight copies) for several pipeline depths and blocks per SM.
// WGMMA_PROBE_DIAGNOSE=1 runs small cases against a host product instead, with a unit weight and unit
// activations besides random ones, so that a wrong activation path shows apart from a wrong weight path.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "kernels/marlin.cu"
#include "../weight_only_ab/timing.cuh"

namespace probe {

using jaxq::CommitAsync;
using jaxq::CopyAsync;
using jaxq::WaitAsync;

constexpr int kThreads = 256;       // two warpgroups
constexpr int kBlockCols = 128;     // weight columns per block: one 64-column Marlin tile per warpgroup
constexpr int kStageK = 64;         // K per stage: four wgmma k-steps
constexpr int kCodeBytes = kStageK / 16 * 2 * 512;           // 4 slabs x 2 tiles x 512 bytes
constexpr int kScaleBytes = kBlockCols * 2;

// A block's shared memory for kRows rows of a (wgmma's N: 64, 128 or 256) in a ring of kStages stages.
template <int kRows, int kStages>
struct Stage {
  static constexpr int kStepBytes = kRows * 16 * 2;  // one k-step of a: kRows x 16 bf16
  static constexpr int kABytes = 4 * kStepBytes;
  // Whole 1024-byte units: a's 128-byte swizzle repeats every 8 rows and needs its tile so aligned.
  static constexpr int kBytes = (kCodeBytes + kABytes + kScaleBytes + 1023) / 1024 * 1024;
  static constexpr int kSharedBytes = kStages * kBytes;
};

// d (64 x 128, float32, wgmma's register layout) += A (64 x 16 bf16, from registers) * B (16 x 128 bf16, K-major in
// shared memory, described by `desc`); with accumulate false, d = A * B (d's old values are not read).
__device__ __forceinline__ void Wgmma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(accumulate)));
}

// The same with B 16 x 64 (d 64 x 64).
__device__ __forceinline__ void Wgmma(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(accumulate)));
}

// The same with B 16 x 256 (d 64 x 256).
__device__ __forceinline__ void Wgmma(float (&d)[128], const uint32_t (&a)[4], uint64_t desc, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      " %0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      " %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      " %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      " %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      " %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(accumulate)));
}

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(Pending) : "memory");
}
// Keeps the compiler from moving reads or writes of `r` across the asynchronous wgmmas (CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void Pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void Pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Shared-memory matrix descriptor of k-step `step` (16 k) of a's K-major tile in a stage (at `tile`). Without
// swizzle the tile is one block per k-step of 8 x 8 core matrices (128 contiguous bytes each): 128 bytes between the
// two along K (the leading offset), 256 between 8-row groups. With the 128-byte swizzle a row's 64 k are 128
// contiguous bytes whose 16-byte pieces are permuted by the row's index mod 8: 1024 bytes between 8-row groups, a
// k-step 32 bytes into the row (the hardware applies the permutation to the address it is given).
template <int kRows, bool kSwizzle>
__device__ __forceinline__ uint64_t Descriptor(uint32_t tile, int step) {
  const uint32_t address = kSwizzle ? tile + step * 32 : tile + step * kRows * 32;
  const uint64_t leading = kSwizzle ? 1 : 128 >> 4, stride = (kSwizzle ? 1024 : 256) >> 4;
  return static_cast<uint64_t>((address & 0x3ffff) >> 4) | (leading << 16) | (stride << 32) |
         (static_cast<uint64_t>(kSwizzle ? 1 : 0) << 62);
}

// Byte offset of a's element (row r, k) in a stage's tile, laid out as Descriptor describes it.
template <int kRows, bool kSwizzle>
__device__ __forceinline__ uint32_t AOffset(int r, int k) {
  if constexpr (kSwizzle) return r * 128 + ((((k >> 3) ^ r) & 7) << 4) + (k & 7) * 2;
  return (k >> 4) * (kRows * 32) + (r >> 3) * 256 + ((k >> 3) & 1) * 128 + (r & 7) * 16 + (k & 7) * 2;
}

__device__ __forceinline__ uint32_t MaskOr(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "n"(0x000f000fu), "n"(0x43004300u));  // 128 + code
  return r;
}

__device__ __forceinline__ uint32_t Scaled(uint32_t raw, __nv_bfloat162 scale) {
  const __nv_bfloat162 offset = __floats2bfloat162_rn(-136.0f, -136.0f);  // 128 + the bias 8: exact
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&raw);
  v = __hmul2(__hadd2(v, offset), scale);
  return *reinterpret_cast<uint32_t*>(&v);
}

struct Params {
  const __nv_bfloat16* a;   // [m, k]
  const uint32_t* b_q;      // Marlin layout, uint4b8
  const __nv_bfloat16* scales;  // [groups, n], Marlin's grouped permutation
  __nv_bfloat16* out;       // [m, n]
  int m, k, n, group;       // group: rows per scale group, a multiple of 64
};

template <int kRows, int kStages, int kBlocksPerSm, bool kSwizzle>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) WgmmaMarlinKernel(Params p) {
  using S = Stage<kRows, kStages>;
  extern __shared__ __align__(1024) char shared[];
  const uint32_t shared_at = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, group_of_warps = tid >> 7;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kBlockCols, m0 = blockIdx.y * kRows;
  const int stages = p.k / kStageK;
  const size_t slab_bytes = static_cast<size_t>(p.n / 64) * 512;  // one k-slab of the whole weight

  auto issue = [&](int s) {
    if (s < stages) {
      const uint32_t stage = shared_at + (s % kStages) * S::kBytes;
      {  // codes: 4 slabs x 1 KB (the block's two tiles), one 16-byte piece per thread
        const int slab = tid >> 6, piece = tid & 63;
        const char* src = reinterpret_cast<const char*>(p.b_q) + (static_cast<size_t>(s) * 4 + slab) * slab_bytes +
                          static_cast<size_t>(n0 / 64) * 512 + piece * 16;
        CopyAsync<16, true>(stage + slab * 1024 + piece * 16, src, 16);
      }
#pragma unroll
      for (int i = 0; i < kRows * 8 / kThreads; ++i) {  // a: kRows rows x 8 pieces of 8 k
        const int c = tid + i * kThreads, r = c >> 3, q = c & 7;
        const bool valid = m0 + r < p.m;
        const __nv_bfloat16* src = p.a + static_cast<size_t>(valid ? m0 + r : 0) * p.k + s * kStageK + q * 8;
        CopyAsync<16, false>(stage + kCodeBytes + AOffset<kRows, kSwizzle>(r, q * 8), src, valid ? 16 : 0);
      }
      if (tid < kScaleBytes / 16) {
        const int group = s * kStageK / p.group;
        CopyAsync<16, false>(stage + kCodeBytes + S::kABytes + tid * 16,
                             p.scales + static_cast<size_t>(group) * p.n + n0 + tid * 8, 16);
      }
    }
    CommitAsync();
  };

  float acc[kRows / 2];  // written first by a wgmma that does not accumulate: a plain store here would serialize them
  // One wgmma per k-step, each its own commit group, at most three in flight: a k-step's A registers (frag[step])
  // are written after the wait that retires the wgmma which read them four k-steps earlier, and before the fence
  // that precedes their own wgmma (CUTLASS's RS mainloop does the same; ptxas serializes the wgmmas otherwise).
  uint32_t frag[4][4];
  __nv_bfloat162 scale_lo, scale_hi;
  const char* stage = shared;
  auto begin_stage = [&](int s) {  // the stage's copies have landed for every thread; the scales of this lane
    WaitAsync<kStages - 3>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, seen by wgmma
    __syncthreads();
    issue(s + kStages - 2);  // into the slot of stage s - 2, whose wgmmas every warpgroup has retired
    stage = shared + (s % kStages) * S::kBytes;
    // This lane's scales of columns 16w + g and 16w + 8 + g of its warpgroup's tile: entries 8g + 2w and + 1 of
    // the grouped permutation.
    const __nv_bfloat162 pair = *reinterpret_cast<const __nv_bfloat162*>(
        stage + kCodeBytes + S::kABytes + (group_of_warps * 64 + 8 * g + 2 * warp) * 2);
    scale_lo = __bfloat162bfloat162(pair.x);
    scale_hi = __bfloat162bfloat162(pair.y);
  };
  auto dequantize = [&](int step) {
    const uint32_t word =
        *reinterpret_cast<const uint32_t*>(stage + step * 1024 + group_of_warps * 512 + lane * 16 + warp * 4);
    const uint32_t high = word >> 8;  // column 16w + 8 + g
    frag[step][0] = Scaled(MaskOr(word), scale_lo);       // column 16w + g, k 2t, 2t + 1
    frag[step][1] = Scaled(MaskOr(high), scale_hi);       // column 16w + 8 + g
    frag[step][2] = Scaled(MaskOr(word >> 4), scale_lo);  // k 2t + 8, 2t + 9
    frag[step][3] = Scaled(MaskOr(high >> 4), scale_hi);
  };

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) issue(s);
  begin_stage(0);
  dequantize(0);
  for (int s = 0; s < stages; ++s) {
    const uint32_t stage_at = shared_at + (s % kStages) * S::kBytes;
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      WgmmaFence();
      Wgmma(acc, frag[step], Descriptor<kRows, kSwizzle>(stage_at + kCodeBytes, step), s > 0 || step > 0);
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
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i) Pin(acc[i]);

  // acc[4b + c]: D's row (a weight column) 16w + g (c < 2) or + 8, column (a row of a) 8b + 2t + (c & 1).
  const int col = n0 + group_of_warps * 64 + 16 * warp + g;
#pragma unroll
  for (int b = 0; b < kRows / 8; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = m0 + 8 * b + 2 * t + (c & 1);
      if (row < p.m) p.out[static_cast<size_t>(row) * p.n + col + 8 * (c >> 1)] = __float2bfloat16_rn(acc[4 * b + c]);
    }
}

using tool_timing::Upload;

std::vector<float> Download(const __nv_bfloat16* device, size_t count) {
  std::vector<__nv_bfloat16> host(count);
  CHECK(cudaMemcpy(host.data(), device, count * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = __bfloat162float(host[i]);
  return out;
}

// What a case fills its operands with: random, or a unit weight (codes 9, scales 1: out = a's row sums) or unit
// activations (out = W's column sums), which tell a wrong activation path from a wrong weight path.
enum class Fill { kRandom, kUnitWeight, kUnitA };

float BF16(uint16_t bits) {
  const uint32_t f = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &f, 4);
  return x;
}

// out = a @ W on the host, W read from the Marlin layout as the kernel reads it (word w of a lane's 16-byte vector:
// nibbles 0, 4, 1, 5 are column 16w + g at k 2t, 2t + 1, 2t + 8, 2t + 9; nibbles 2, 6, 3, 7 column 16w + 8 + g),
// the scale of column 16w + 8h + g at 8g + 2w + h of its tile's 64.
std::vector<float> HostReference(const std::vector<uint32_t>& codes, const std::vector<uint16_t>& scales,
                                 const std::vector<uint16_t>& a, int m, int k, int n, int group) {
  std::vector<float> w(static_cast<size_t>(k) * n);
  for (int ks = 0; ks < k / 16; ++ks)
    for (int tile = 0; tile < n / 64; ++tile)
      for (int lane = 0; lane < 32; ++lane)
        for (int word = 0; word < 4; ++word) {
          const uint32_t x = codes[(static_cast<size_t>(ks) * (n / 64) + tile) * 128 + lane * 4 + word];
          const int g = lane / 4, t = lane % 4;
          const int nibble_k[8] = {2 * t, 2 * t + 8, 2 * t, 2 * t + 8, 2 * t + 1, 2 * t + 9, 2 * t + 1, 2 * t + 9};
          for (int nib = 0; nib < 8; ++nib) {
            const int h = (nib >> 1) & 1, kk = ks * 16 + nibble_k[nib], col = 16 * word + 8 * h + g;
            const float s = BF16(scales[static_cast<size_t>(kk / group) * n + tile * 64 + 8 * g + 2 * word + h]);
            const float value = BF16(tool_timing::HalfBits((static_cast<int>((x >> (4 * nib)) & 0xf) - 8) * s, true));
            w[static_cast<size_t>(kk) * n + tile * 64 + col] = value;
          }
        }
  std::vector<float> out(static_cast<size_t>(m) * n, 0.0f);
  for (int r = 0; r < m; ++r)
    for (int kk = 0; kk < k; ++kk) {
      const float x = BF16(a[static_cast<size_t>(r) * k + kk]);
      for (int c = 0; c < n; ++c) out[static_cast<size_t>(r) * n + c] += x * w[static_cast<size_t>(kk) * n + c];
    }
  return out;
}

template <int kRows, int kStages = 5, int kBlocksPerSm = 1, bool kSwizzle = true>
void RunCase(int m, int k, int n, int group, Fill fill = Fill::kRandom) {
  constexpr int kShared = Stage<kRows, kStages>::kSharedBytes;
  const auto kernel = WgmmaMarlinKernel<kRows, kStages, kBlocksPerSm, kSwizzle>;
  std::mt19937 rng(1234 + m);
  std::vector<uint32_t> codes(static_cast<size_t>(k) * n / 8);
  for (auto& c : codes) c = fill == Fill::kUnitWeight ? 0x99999999u : rng();
  std::vector<uint16_t> scales(static_cast<size_t>(k / group) * n), a(static_cast<size_t>(m) * k);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (auto& s : scales) s = tool_timing::HalfBits(fill == Fill::kRandom ? 0.5f + 0.5f * std::fabs(unit(rng)) : 1.0f, true);
  for (auto& x : a) x = tool_timing::HalfBits(fill == Fill::kUnitA ? 1.0f : unit(rng), true);
  uint32_t* d_codes[tool_timing::kCopies];
  for (auto& c : d_codes) c = Upload(codes);
  auto* d_scales = reinterpret_cast<__nv_bfloat16*>(Upload(scales));
  auto* d_a = reinterpret_cast<__nv_bfloat16*>(Upload(a));
  __nv_bfloat16 *d_out, *d_ref;
  CHECK(cudaMalloc(&d_out, static_cast<size_t>(m) * n * 2));
  CHECK(cudaMalloc(&d_ref, static_cast<size_t>(m) * n * 2));
  CHECK(cudaMemset(d_out, 0xff, static_cast<size_t>(m) * n * 2));  // poison: every element must be written

  jaxq::MarlinParams ref;
  ref.type = jaxq::FloatType::kBF16;
  ref.weight = jaxq::MarlinType::kU4B8;
  ref.a = d_a;
  ref.scales = d_scales;
  ref.out = d_ref;
  ref.m = m;
  ref.k = k;
  ref.n = n;
  ref.groups = k / group;
  ref.batch_invariant = true;  // W rounded to bfloat16 for every m, as this kernel does
  auto marlin = [&](int copy) {
    ref.b_q = d_codes[copy];
    CHECK(jaxq::LaunchMarlinGemm(ref, nullptr));
  };
  Params p{d_a, d_codes[0], d_scales, d_out, m, k, n, group};
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(n / kBlockCols, (m + kRows - 1) / kRows);
  auto ours = [&](int copy) {
    p.b_q = d_codes[copy];
    kernel<<<grid, kThreads, kShared>>>(p);
    CHECK(cudaGetLastError());
  };
  ours(0);
  marlin(0);
  CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = Download(d_out, static_cast<size_t>(m) * n), want = Download(d_ref, got.size());
  double diff = 0, norm = 0;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) ++bad;
    diff += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  if (fill != Fill::kRandom || static_cast<size_t>(m) * k * n <= (size_t{1} << 24)) {
    const std::vector<float> host = HostReference(codes, scales, a, m, k, n, group);
    double ours_err = 0, marlin_err = 0;
    for (size_t i = 0; i < host.size(); ++i) {
      ours_err = std::fmax(ours_err, std::fabs(got[i] - host[i]));
      marlin_err = std::fmax(marlin_err, std::fabs(want[i] - host[i]));
    }
    std::printf("%s M%d K%d N%d, %d-row blocks%s: max |error| vs host: wgmma %.3g, marlin_gemm %.3g\n",
                fill == Fill::kRandom ? "random" : fill == Fill::kUnitWeight ? "unit weight" : "unit a", m, k, n, kRows,
                kSwizzle ? "" : " unswizzled",
                ours_err, marlin_err);
    for (int r : {0, 1, 8, m - 1})
      for (int c : {0, 1, 8, 16, 64}) {
        const size_t i = static_cast<size_t>(r) * n + c;
        std::printf("  out[%d][%d]: host %.4g wgmma %.4g marlin_gemm %.4g\n", r, c, host[i], got[i], want[i]);
      }
  } else {
    const float us = tool_timing::BestMicroseconds(ours), marlin_us = tool_timing::BestMicroseconds(marlin);
    const double tflops = 2.0 * m * k * n / us / 1e6;
    std::printf("%d rows x %d stages x %d blocks/SM%s, M%d K%d N%d G%d: rel. L2 vs marlin_gemm %.2e, non-finite %zu | "
                "wgmma %.1f us (%.0f TFLOP/s) | marlin_gemm kernel %.1f us | %.2fx\n",
                kRows, kStages, kBlocksPerSm, kSwizzle ? "" : " unswizzled", m, k, n, group, std::sqrt(diff / norm), bad, us, tflops, marlin_us,
                marlin_us / us);
  }
  for (auto* c : d_codes) CHECK(cudaFree(c));
  CHECK(cudaFree(d_scales));
  CHECK(cudaFree(d_a));
  CHECK(cudaFree(d_out));
  CHECK(cudaFree(d_ref));
}

}  // namespace probe

int main() {
  if (std::getenv("WGMMA_PROBE_DIAGNOSE") != nullptr) {
    for (auto fill : {probe::Fill::kUnitWeight, probe::Fill::kUnitA, probe::Fill::kRandom}) {
      probe::RunCase<64>(64, 1024, 128, 64, fill);
      probe::RunCase<128>(128, 1024, 128, 64, fill);
    }
    probe::RunCase<128, 5, 2>(100, 1024, 128, 128, probe::Fill::kRandom);
    probe::RunCase<128, 5, 2, false>(100, 1024, 128, 128, probe::Fill::kRandom);
    probe::RunCase<256, 4, 1>(200, 512, 128, 128, probe::Fill::kRandom);
    return 0;
  }
  // Rows per block, pipeline depth, blocks per SM and a's shared-memory layout: 224 blocks of 128 columns at
  // N28672 are 1.7 waves of one block per SM.
  for (int m : {128, 256}) {
    probe::RunCase<128, 5, 2, false>(m, 8192, 28672, 128);
    probe::RunCase<128, 5, 2>(m, 8192, 28672, 128);
    probe::RunCase<128, 4, 1>(m, 8192, 28672, 128);
    probe::RunCase<128, 8, 1>(m, 8192, 28672, 128);
    probe::RunCase<64, 8, 2>(m, 8192, 28672, 128);
    probe::RunCase<256, 4, 1>(m, 8192, 28672, 128);
  }
  for (int m : {64, 512, 4096}) {
    probe::RunCase<128, 5, 2>(m, 8192, 28672, 128);
    probe::RunCase<256, 4, 1>(m, 8192, 28672, 128);
  }
  for (int m : {128, 512}) {
    probe::RunCase<128, 5, 2>(m, 4096, 14336, 128);
    probe::RunCase<128, 5, 2>(m, 28672, 8192, 128);
  }
  return 0;
}
