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
// both (CUDA events, best of 5 x 30 calls over three weight copies). WGMMA_PROBE_SWAP_OFFSETS=1 swaps the shared
// memory descriptor's two byte offsets (the one guess here that the device must confirm).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
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
constexpr int kStages = 5;
constexpr int kCodeBytes = kStageK / 16 * 2 * 512;           // 4 slabs x 2 tiles x 512 bytes
constexpr int kScaleBytes = kBlockCols * 2;

// A block's shared memory for kRows rows of a (wgmma's N: 64 or 128).
template <int kRows>
struct Stage {
  static constexpr int kStepBytes = kRows * 16 * 2;  // one k-step of a: kRows x 16 bf16
  static constexpr int kABytes = 4 * kStepBytes;
  static constexpr int kBytes = kCodeBytes + kABytes + kScaleBytes;
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

// Shared-memory matrix descriptor of a K-major 128-row x 16-k bf16 tile stored as 8 x 8 core matrices (128
// contiguous bytes each, no swizzle): `k_stride` bytes between the two core matrices along K, `row_stride` bytes
// between 8-row groups.
__device__ __forceinline__ uint64_t Descriptor(uint32_t address, uint32_t k_stride, uint32_t row_stride,
                                               bool swap) {
  const uint32_t leading = swap ? row_stride : k_stride, stride = swap ? k_stride : row_stride;
  return static_cast<uint64_t>((address & 0x3ffff) >> 4) | (static_cast<uint64_t>(leading >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32);
}

// Byte offset of a's element (row r, k) of a stage: one block per k-step (k / 16), 8-row groups of 256 bytes,
// the two 8-k halves 128 bytes apart, rows of 16 bytes.
template <int kRows>
__device__ __forceinline__ uint32_t AOffset(int r, int k) {
  return (k >> 4) * Stage<kRows>::kStepBytes + (r >> 3) * 256 + ((k >> 3) & 1) * 128 + (r & 7) * 16 + (k & 7) * 2;
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
  bool swap_offsets;
};

template <int kRows>
__global__ void __launch_bounds__(kThreads, 1) WgmmaMarlinKernel(Params p) {
  using S = Stage<kRows>;
  extern __shared__ __align__(128) char shared[];
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
        CopyAsync<16, false>(stage + kCodeBytes + AOffset<kRows>(r, q * 8), src, valid ? 16 : 0);
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
  uint32_t frag[2][4][4];  // [stage parity][k-step][A register]

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) issue(s);
  for (int s = 0; s < stages; ++s) {
    WgmmaWait<1>();  // the wgmmas of stage s - 2 are done: its shared memory and registers are free
    WaitAsync<kStages - 3>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, seen by wgmma
    __syncthreads();
    issue(s + kStages - 2);
    const char* stage = shared + (s % kStages) * S::kBytes;
    const uint32_t stage_at = shared_at + (s % kStages) * S::kBytes;
    // This lane's scales of columns 16w + g and 16w + 8 + g of its warpgroup's tile: entries 8g + 2w and + 1 of
    // the grouped permutation.
    const __nv_bfloat162 pair = *reinterpret_cast<const __nv_bfloat162*>(
        stage + kCodeBytes + S::kABytes + (group_of_warps * 64 + 8 * g + 2 * warp) * 2);
    const __nv_bfloat162 scale_lo = __bfloat162bfloat162(pair.x), scale_hi = __bfloat162bfloat162(pair.y);
    uint32_t (&a)[4][4] = frag[s & 1];
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const uint32_t word =
          *reinterpret_cast<const uint32_t*>(stage + step * 1024 + group_of_warps * 512 + lane * 16 + warp * 4);
      const uint32_t high = word >> 8;  // column 16w + 8 + g
      a[step][0] = Scaled(MaskOr(word), scale_lo);        // column 16w + g, k 2t, 2t + 1
      a[step][1] = Scaled(MaskOr(high), scale_hi);        // column 16w + 8 + g
      a[step][2] = Scaled(MaskOr(word >> 4), scale_lo);   // k 2t + 8, 2t + 9
      a[step][3] = Scaled(MaskOr(high >> 4), scale_hi);
#pragma unroll
      for (int r = 0; r < 4; ++r) Pin(a[step][r]);
    }
    WgmmaFence();
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const uint64_t desc = Descriptor(stage_at + kCodeBytes + step * S::kStepBytes, 128, 256, p.swap_offsets);
      Wgmma(acc, a[step], desc, s > 0 || step > 0);
    }
    WgmmaCommit();
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

template <int kRows>
void RunCase(int m, int k, int n, int group, bool swap) {
  constexpr int kShared = Stage<kRows>::kSharedBytes;
  std::mt19937 rng(1234 + m);
  std::vector<uint32_t> codes(static_cast<size_t>(k) * n / 8);
  for (auto& c : codes) c = rng();
  std::vector<uint16_t> scales(static_cast<size_t>(k / group) * n), a(static_cast<size_t>(m) * k);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (auto& s : scales) s = tool_timing::HalfBits(0.5f + 0.5f * std::fabs(unit(rng)), true);
  for (auto& x : a) x = tool_timing::HalfBits(unit(rng), true);
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
  Params p{d_a, d_codes[0], d_scales, d_out, m, k, n, group, swap};
  CHECK(cudaFuncSetAttribute(WgmmaMarlinKernel<kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
  const dim3 grid(n / kBlockCols, (m + kRows - 1) / kRows);
  auto ours = [&](int copy) {
    p.b_q = d_codes[copy];
    WgmmaMarlinKernel<kRows><<<grid, kThreads, kShared>>>(p);
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
  const float us = tool_timing::BestMicroseconds(ours), marlin_us = tool_timing::BestMicroseconds(marlin);
  const double tflops = 2.0 * m * k * n / us / 1e6;
  std::printf("%d-row blocks, M%d K%d N%d G%d%s: rel. L2 vs marlin_gemm %.2e, non-finite %zu | "
              "wgmma %.1f us (%.0f TFLOP/s) | marlin_gemm kernel %.1f us | %.2fx\n",
              kRows, m, k, n, group, swap ? " (offsets swapped)" : "", std::sqrt(diff / norm), bad, us, tflops, marlin_us,
              marlin_us / us);
  for (auto* c : d_codes) CHECK(cudaFree(c));
  CHECK(cudaFree(d_scales));
  CHECK(cudaFree(d_a));
  CHECK(cudaFree(d_out));
  CHECK(cudaFree(d_ref));
}

}  // namespace probe

int main() {
  const bool swap = std::getenv("WGMMA_PROBE_SWAP_OFFSETS") != nullptr;
  for (int m : {128, 64, 200, 256, 512, 4096}) probe::RunCase<128>(m, 8192, 28672, 128, swap);
  for (int m : {64, 128}) probe::RunCase<64>(m, 8192, 28672, 128, swap);
  for (int m : {64, 128}) {
    probe::RunCase<128>(m, 4096, 14336, 128, swap);
    probe::RunCase<128>(m, 28672, 8192, 128, swap);
  }
  return 0;
}
