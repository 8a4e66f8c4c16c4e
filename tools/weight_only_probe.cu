// A weight-only GEMM candidate measured against jaxq's kernel outside JAX, in seconds of device time instead of a
// package build: it includes kernels/weight_only.cu (so it shares its helpers and links its launcher), checks the
// candidate's output against LaunchWeightOnlyGemm's and times both with CUDA events on rotated weights.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Icsrc tools/weight_only_probe.cu \
//        csrc/kernels/sm_count.cu -o weight_only_probe && ./weight_only_probe [M [VARIANT]]
//
// With VARIANT the probe runs that variant and jaxq's kernel once each (for ncu).
//
// The candidate (GPTQ exllama 4-bit, bf16, 9..16 rows, K8192 N28672): warps split a 128-column tile (32 columns
// each) instead of its K range, so each holds a quarter of the accumulators (about 115 registers instead of 255);
// x is copied once per block into shared memory and read by every warp; blocks of 2-4 K parts of 4 warps give
// 12-16 warps per SM instead of 7. Lane t holds word row t of each 32-k block (k 8t..8t+7) of its four columns,
// and x of those k, so no two lanes read the same shared memory. Per-group sums of x come from a small kernel
// first. Results and what limits it: benchmarks/history/2026-11-30-h200.md (this version, with copy and
// shared-memory addresses precomputed as in the main kernel, ties jaxq's kernel on the H200, before the x sums).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/weight_only.cu"
#include "weight_only_ab/timing.cuh"

namespace probe {

constexpr int kTileN = 128;
constexpr int kRowBytes = kTileN * 4 + 32;  // padded: lane (g, t) reads row t at column 4g, bank group g + 2t
// Parts K ranges of 4 warps per block; Stages pipeline stages of StageK rows of K per part.
template <int Parts, int Stages, int StageK>
struct Cfg {
  static constexpr int kParts = Parts, kStages = Stages, kStageK = StageK;
  static constexpr int kThreads = kParts * 128;
  static constexpr int kWordRows = kStageK / 8;
  static constexpr int kWeightBytes = kWordRows * kRowBytes;
  static constexpr int kXStride = kStageK * 2 + 64;  // padded: lane (g, t) reads row g at k 8t, bank group 4g + t
  static constexpr int kXBytes = 16 * kXStride;
  static constexpr int kStageBytes = kWeightBytes + kXBytes;
  static constexpr int kPartBytes = kStages * kStageBytes;
  static constexpr int kReduceBytes = (kParts - 1) * 16 * 128 * 4;  // the other parts' sums, after the loop
  static constexpr int kSmem = kParts * kPartBytes > kReduceBytes ? kParts * kPartBytes : kReduceBytes;
};

using Codes = jaxq::Codes<__nv_bfloat16, 4>;

// Each K part's four warps share its pipeline stages: named barrier 1 + part.
__device__ __forceinline__ void PartBarrier(int part) { asm volatile("bar.sync %0, 128;" ::"r"(part + 1)); }

// A warp per (row, group of 128).
__global__ void XGroupSums(const __nv_bfloat16* x, float* xs, int m, int k) {
  const int groups = k / 128;
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (i >= m * groups) return;
  const int row = i / groups, grp = i % groups;
  const uint2 v = *reinterpret_cast<const uint2*>(x + static_cast<int64_t>(row) * k + grp * 128 + 4 * lane);
  const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&v.x);
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&v.y);
  float s = __low2float(a) + __high2float(a) + __low2float(b) + __high2float(b);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) xs[row * groups + grp] = s;
}

// x [m <= 16, k] bf16; qw [k / 8, n] exllama 4-bit; qz [groups, n / 8]; scales [groups, n]; xs [16, groups] (rows
// past m zero); out [m, n].
template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kThreads <= 256 ? 256 / C::kThreads : 1)
    Gptq4M16(const __nv_bfloat16* x, const uint32_t* qw, const uint32_t* qz, const __nv_bfloat16* scales,
             const float* xs, __nv_bfloat16* out, int m, int n, int k, int group_size, int zero_offset) {
  constexpr int kParts = C::kParts, kStages = C::kStages, kStageK = C::kStageK, kWeightBytes = C::kWeightBytes;
  constexpr int kXStride = C::kXStride, kStageBytes = C::kStageBytes, kPartBytes = C::kPartBytes;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, part = tid / 128, ptid = tid % 128, warp = ptid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kTileN;
  const int k_part = k / kParts, k_begin = part * k_part;
  const int stages_total = k_part / kStageK;
  const int groups = k / group_size, stages_per_group = group_size / kStageK;
  uint8_t* part_smem = smem + part * kPartBytes;
  const uint32_t part_base = static_cast<uint32_t>(__cvta_generic_to_shared(part_smem));

  // Copy sources advance by fixed steps; shared addresses rotate through the ring (32-bit).
  constexpr int kWCopies = C::kWordRows / 4, kXCopies = kStageK / 64;
  const uint32_t* w_src[kWCopies];
  uint32_t w_dst[kWCopies];
#pragma unroll
  for (int i = 0; i < kWCopies; ++i) {
    const int c = ptid + 128 * i, r = c / 32, cc = c % 32;
    w_src[i] = qw + static_cast<int64_t>(k_begin / 8 + r) * n + n0 + cc * 4;
    w_dst[i] = r * kRowBytes + cc * 16;
  }
  const int64_t w_step = static_cast<int64_t>(kStageK / 8) * n;
  const __nv_bfloat16* x_src[kXCopies];
  uint32_t x_dst[kXCopies];
  int x_bytes[kXCopies], x_step[kXCopies];
#pragma unroll
  for (int i = 0; i < kXCopies; ++i) {
    const int c = ptid + 128 * i, row = c / (kStageK / 8), kc = c % (kStageK / 8);
    const bool valid = row < m;
    x_src[i] = x + static_cast<int64_t>(valid ? row : 0) * k + k_begin + kc * 8;
    x_dst[i] = kWeightBytes + row * kXStride + kc * 16;
    x_bytes[i] = valid ? 16 : 0;
    x_step[i] = valid ? kStageK : 0;
  }
  const uint32_t ring_end = part_base + kStages * kStageBytes;
  uint32_t issue_at = part_base;
  auto issue = [&]() {
#pragma unroll
    for (int i = 0; i < kWCopies; ++i) {
      jaxq::CopyAsync<16, true>(issue_at + w_dst[i], w_src[i], 16);
      w_src[i] += w_step;
    }
#pragma unroll
    for (int i = 0; i < kXCopies; ++i) {
      jaxq::CopyAsync<16, true>(issue_at + x_dst[i], x_src[i], x_bytes[i]);
      x_src[i] += x_step[i];
    }
    issue_at += kStageBytes;
    if (issue_at == ring_end) issue_at = part_base;
  };

  const int col0 = n0 + 32 * warp + 4 * g;  // the lane's four columns: col0 + 2 tau + (0, 1)
  float acc[2][2][4] = {}, gacc[2][2][4] = {};
  uint2 scale_words = {};
  uint32_t zero_word = 0;
  float xsv[2][2] = {};
  auto load_group = [&](int grp) {
    scale_words = __ldg(reinterpret_cast<const uint2*>(scales + static_cast<int64_t>(grp) * n + col0));
    zero_word = __ldg(qz + static_cast<int64_t>(grp) * (n / 8) + col0 / 8);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) xsv[mt][h] = __ldg(xs + (mt * 8 + 2 * t + h) * groups + grp);
    }
  };
  auto fold = [&]() {
    const uint32_t sw[2] = {scale_words.x, scale_words.y};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float s = __uint_as_float(((sw[j / 2] >> (16 * (j % 2))) & 0xffffu) << 16);
      const float zb = 128.f + static_cast<float>(((zero_word >> (16 * (g % 2) + 4 * j)) & 0xfu) + zero_offset);
      const int tau = j / 2, r0 = 2 * (j % 2);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& sum = gacc[mt][tau][r0 + h];
          acc[mt][tau][r0 + h] = fmaf(s, fmaf(-zb, xsv[mt][h], sum), acc[mt][tau][r0 + h]);
          sum = 0.f;
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < stages_total) issue();
    jaxq::CommitAsync();
  }
  int grp = k_begin / group_size;
  load_group(grp);
  // The lane's shared addresses within a stage: its weight word row t at its four columns, its x row g at k 8t.
  const uint32_t w_lane = t * kRowBytes + (32 * warp + 4 * g) * 4;
  const uint32_t x_lane = kWeightBytes + g * kXStride + 16 * t;
  uint32_t read_at = part_base;
  int group_stages_left = stages_per_group;
  for (int s = 0; s < stages_total; ++s) {
    jaxq::WaitAsync<kStages - 2>();
    PartBarrier(part);
    if (s + kStages - 1 < stages_total) issue();
    jaxq::CommitAsync();
#pragma unroll
    for (int blk = 0; blk < kStageK / 32; ++blk) {
      // Lane t holds word row 4 blk + t (k 8t..8t+7 of this 32-k block) of its four columns, and the x of those k.
      uint32_t w[4], xv[2][4];
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                   : "r"(read_at + w_lane + 4 * blk * kRowBytes));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(xv[mt][0]), "=r"(xv[mt][1]), "=r"(xv[mt][2]), "=r"(xv[mt][3])
                     : "r"(read_at + x_lane + 8 * mt * kXStride + 64 * blk));
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j0 = 2 * h, j1 = 2 * h + 1;
#pragma unroll
        for (int tau = 0; tau < 2; ++tau) {
          const uint32_t a[4] = {Codes::Operand(w[2 * tau] >> (4 * j0)), Codes::Operand(w[2 * tau + 1] >> (4 * j0)),
                                 Codes::Operand(w[2 * tau] >> (4 * j1)), Codes::Operand(w[2 * tau + 1] >> (4 * j1))};
          jaxq::Mma<__nv_bfloat16>(gacc[0][tau], a, xv[0][j0], xv[0][j1]);
          jaxq::Mma<__nv_bfloat16>(gacc[1][tau], a, xv[1][j0], xv[1][j1]);
        }
      }
    }
    read_at += kStageBytes;
    if (read_at == ring_end) read_at = part_base;
    if (--group_stages_left == 0) {
      group_stages_left = stages_per_group;
      fold();
      if (s + 1 < stages_total) load_group(++grp);
    }
  }
  jaxq::WaitAsync<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  if (part > 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) red[((part - 1) * 16 + i) * 128 + ptid] = acc[i / 8][i / 4 % 2][i % 4];
  }
  __syncthreads();
  if (part > 0) return;
  for (int q = 0; q < kParts - 1; ++q) {
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i / 8][i / 4 % 2][i % 4] += red[(q * 16 + i) * 128 + ptid];
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = mt * 8 + 2 * t + h;
      if (row >= m) continue;
      __nv_bfloat162 v01 = __floats2bfloat162_rn(acc[mt][0][h], acc[mt][0][2 + h]);
      __nv_bfloat162 v23 = __floats2bfloat162_rn(acc[mt][1][h], acc[mt][1][2 + h]);
      uint2 packed = {*reinterpret_cast<uint32_t*>(&v01), *reinterpret_cast<uint32_t*>(&v23)};
      *reinterpret_cast<uint2*>(out + static_cast<int64_t>(row) * n + col0) = packed;
    }
  }
}

}  // namespace probe

int main(int argc, char** argv) {
  const int m = argc > 1 ? std::atoi(argv[1]) : 16, k = 8192, n = 28672, group = 128, groups = k / group;
  constexpr int kCopies = tool_timing::kCopies;
  std::mt19937 rng(1);
  std::vector<uint32_t> h_qw(static_cast<size_t>(k / 8) * n), h_qz(static_cast<size_t>(groups) * n / 8);
  std::vector<__nv_bfloat16> h_sc(static_cast<size_t>(groups) * n), h_x(static_cast<size_t>(m) * k);
  for (auto& v : h_qw) v = rng();
  for (auto& v : h_qz) v = rng();
  std::uniform_real_distribution<float> u(0.5f, 1.5f), nrm(-2.f, 2.f);
  for (auto& v : h_sc) v = __float2bfloat16(u(rng) * 1e-2f);
  for (auto& v : h_x) v = __float2bfloat16(nrm(rng));
  uint32_t *qw[kCopies], *qz;
  __nv_bfloat16 *sc, *x, *out_ref, *out_new;
  float* xs;
  for (auto& p : qw) {
    CHECK(cudaMalloc(&p, h_qw.size() * 4));
    CHECK(cudaMemcpy(p, h_qw.data(), h_qw.size() * 4, cudaMemcpyHostToDevice));
  }
  CHECK(cudaMalloc(&qz, h_qz.size() * 4));
  CHECK(cudaMalloc(&sc, h_sc.size() * 2));
  CHECK(cudaMalloc(&x, h_x.size() * 2));
  CHECK(cudaMalloc(&out_ref, static_cast<size_t>(m) * n * 2));
  CHECK(cudaMalloc(&out_new, static_cast<size_t>(m) * n * 2));
  CHECK(cudaMalloc(&xs, 16 * groups * 4));
  CHECK(cudaMemcpy(qz, h_qz.data(), h_qz.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(sc, h_sc.data(), h_sc.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x, h_x.data(), h_x.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(xs, 0, 16 * groups * 4));
  CHECK(cudaMemset(out_new, 0xff, static_cast<size_t>(m) * n * 2));

  jaxq::WeightOnlyParams p;
  p.type = jaxq::FloatType::kBF16;
  p.format = jaxq::WeightFormat::kGptqExllama;
  p.bits = 4;
  p.zero_offset = 1;
  p.x = x, p.qzeros = qz, p.scales = sc, p.out = out_ref;  // no K split: no workspace
  p.m = m, p.n = n, p.k = k, p.groups = groups;
  auto run_ref = [&](int c) {
    p.qweight = qw[c];
    CHECK(jaxq::LaunchWeightOnlyGemm(p, 1, nullptr));
  };
  auto run_sums = [&](int) { probe::XGroupSums<<<(m * groups * 32 + 255) / 256, 256>>>(x, xs, m, k); };
  const double copy_bw = tool_timing::CopyBandwidth();
  const double bytes = static_cast<double>(k) * n / 2 + groups * n * 2.5;
  run_ref(0);
  CHECK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> a(static_cast<size_t>(m) * n), b(a.size());
  CHECK(cudaMemcpy(a.data(), out_ref, a.size() * 2, cudaMemcpyDeviceToHost));
  if (argc <= 2) std::printf("M%d K%d N%d, copy %.0f GB/s, x sums %.1f us\n", m, k, n, copy_bw / 1e9, tool_timing::BestMicroseconds(run_sums));
  const int only = argc > 2 ? std::atoi(argv[2]) : -1;  // profile mode: run one variant (and jaxq's kernel) once
  int index = 0;
  auto variant = [&](const char* name, auto cfg) {
    using C = decltype(cfg);
    if (only >= 0 && index++ != only) return;
    CHECK(cudaFuncSetAttribute(probe::Gptq4M16<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
    auto run_new = [&](int c) {
      probe::Gptq4M16<C><<<n / probe::kTileN, C::kThreads, C::kSmem>>>(x, qw[c], qz, sc, xs, out_new, m, n, k, group,
                                                                        1);
    };
    CHECK(cudaMemset(out_new, 0xff, static_cast<size_t>(m) * n * 2));
    run_sums(0);
    run_new(0);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(b.data(), out_new, b.size() * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      const double ra = __bfloat162float(a[i]), rb = __bfloat162float(b[i]);
      num += (ra - rb) * (ra - rb), den += ra * ra;
    }
    if (only >= 0) return;  // jaxq's kernel has run once already, for the reference output
    const float ref_us = tool_timing::BestMicroseconds(run_ref), new_us = tool_timing::BestMicroseconds(run_new);
    std::printf("%-28s rel L2 %.1e | jaxq %.1f us (%.1f%%) | prototype kernel %.1f us (%.1f%%)\n", name,
                std::sqrt(num / den), ref_us, 100 * bytes / (ref_us * 1e-6) / copy_bw, new_us,
                100 * bytes / (new_us * 1e-6) / copy_bw);
  };
  variant("parts 1 stages 4 k64", probe::Cfg<1, 4, 64>{});
  variant("parts 2 stages 4 k64", probe::Cfg<2, 4, 64>{});
  variant("parts 2 stages 3 k128", probe::Cfg<2, 3, 128>{});
  variant("parts 2 stages 4 k128", probe::Cfg<2, 4, 128>{});
  variant("parts 4 stages 3 k128", probe::Cfg<4, 3, 128>{});
  variant("parts 1 stages 4 k128", probe::Cfg<1, 4, 128>{});
  return 0;
}
