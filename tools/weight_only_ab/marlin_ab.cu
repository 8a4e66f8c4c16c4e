// A/B timing of two versions of kernels/marlin.cu (with marlin_hopper.cu, the Hopper kernel it hands many rows to)
// outside JAX, as ab.cu does for weight_only.cu (run.sh builds one binary per version): LaunchMarlinGemm on the same fixed inputs for the cases below, each output written to
// TAG_CASE.bin for compare.py, its time (CUDA events, best of 5 x 30 calls on three rotated weight copies) and its
// share of the copy bandwidth measured in the same process (codes, scales and zero points read once).
// JAXQ_MARLIN_PLAN="tiles,splits" forces a launch plan, as in the package; MARLIN_AB_CASE="hopper" runs the cases
// whose name holds it (e.g. under ncu); MARLIN_AB_SANITIZE=1 runs every kernel variant once instead, =hopper the
// Hopper kernel's alone (Sanitize, below). BASE needs WeightLayout (jaxq from 2026-12-07 on).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/marlin.cu"
#include "timing.cuh"

namespace {

bool IsFp4(jaxq::MarlinType t) { return t == jaxq::MarlinType::kNvFp4 || t == jaxq::MarlinType::kMxFp4; }

// `count` scales of weight type `type` as bytes: FP4's one byte each (NVFP4: s * 2**7's float16 exponent 14..22
// and 3 mantissa bits; MXFP4: exponents 115..125), the others 16-bit values from `half`.
template <typename Half>
std::vector<uint8_t> ScaleBytes(jaxq::MarlinType type, size_t count, std::mt19937& rng, Half half) {
  if (IsFp4(type)) {
    std::vector<uint8_t> bytes(count);
    for (auto& b : bytes) {
      b = type == jaxq::MarlinType::kNvFp4 ? static_cast<uint8_t>(((14 + rng() % 9) << 3) | (rng() & 7))
                                           : static_cast<uint8_t>(115 + rng() % 11);
    }
    return bytes;
  }
  std::vector<uint8_t> bytes(count * 2);
  for (size_t i = 0; i < count; ++i) {
    const uint16_t v = half();
    std::memcpy(&bytes[2 * i], &v, 2);
  }
  return bytes;
}

using tool_timing::Upload;

struct Case {
  const char* name;
  jaxq::MarlinType type;
  bool bf16;
  int m, k, n, group;  // group -1: one group (FP4: 16 for NVFP4, 32 for MXFP4)
  int64_t hopper_from_rows = 0;  // as marlin_gemm sets it: from these rows the Hopper kernel runs where it applies
  // gptq_gemm's (exllama) or awq_gemm's layout: the Hopper kernel called directly, as their handler does (the
  // words are random either way; the layout decides how they are read).
  jaxq::WeightLayout layout = jaxq::WeightLayout::kMarlin;
};

// The launch a case times: marlin_gemm's dispatch, or for a checkpoint layout the Hopper kernel itself.
cudaError_t Launch(const jaxq::MarlinParams& p) {
  return p.layout == jaxq::WeightLayout::kMarlin ? jaxq::LaunchMarlinGemm(p, nullptr)
                                                 : jaxq::LaunchMarlinGemmHopper(p, nullptr);
}

// The Hopper rows of a version that names them by their first row, and of one that named the row before it
// (whose kernel took two rows or more).
template <typename Params>
auto SetHopperRows(Params& p, int64_t from_rows, int) -> decltype(p.hopper_from_rows, void()) {
  p.hopper_from_rows = from_rows;
}
template <typename Params>
void SetHopperRows(Params& p, int64_t from_rows, long) {
  p.hopper_above_rows = from_rows > 1 ? from_rows - 1 : from_rows;
}

void Run(const char* tag, const Case& c, double bandwidth) {
  std::mt19937 rng(7);
  const int bits = jaxq::MarlinBits(c.type);
  const int groups = c.group < 0 ? 1 : c.k / c.group;
  const size_t code_words = static_cast<size_t>(c.k) * c.n * bits / 32;
  const size_t zero_words = c.type == jaxq::MarlinType::kU4 ? static_cast<size_t>(groups) * c.n / 8 : 0;
  std::vector<uint32_t> h_codes(code_words), h_zeros(zero_words);
  for (auto& v : h_codes) v = rng();
  if (c.type == jaxq::MarlinType::kFp8E4M3) {
    for (auto& v : h_codes) v &= 0xf7f7f7f7u;  // no NaN codes
  }
  for (auto& v : h_zeros) v = rng();
  std::uniform_real_distribution<float> scale(0.5f, 1.5f), value(-2.f, 2.f);
  const std::vector<uint8_t> h_scales = ScaleBytes(c.type, static_cast<size_t>(groups) * c.n, rng,
                                                   [&] { return tool_timing::HalfBits(scale(rng) * 1e-2f, c.bf16); });
  std::vector<uint16_t> h_a(static_cast<size_t>(c.m) * c.k);
  for (auto& v : h_a) v = tool_timing::HalfBits(value(rng), c.bf16);

  uint32_t* codes[tool_timing::kCopies];
  for (auto& p : codes) {
    CHECK(cudaMalloc(&p, code_words * 4));
    CHECK(cudaMemcpy(p, h_codes.data(), code_words * 4, cudaMemcpyHostToDevice));
  }
  uint32_t* zeros = nullptr;
  if (zero_words) {
    CHECK(cudaMalloc(&zeros, zero_words * 4));
    CHECK(cudaMemcpy(zeros, h_zeros.data(), zero_words * 4, cudaMemcpyHostToDevice));
  }
  void* scales = Upload(h_scales);
  float* global_scale = c.type == jaxq::MarlinType::kNvFp4 ? Upload(std::vector<float>{3e-3f}) : nullptr;
  void *a, *out;
  CHECK(cudaMalloc(&a, h_a.size() * 2));
  CHECK(cudaMemcpy(a, h_a.data(), h_a.size() * 2, cudaMemcpyHostToDevice));
  const size_t out_elems = static_cast<size_t>(c.m) * c.n;
  CHECK(cudaMalloc(&out, out_elems * 2));
  CHECK(cudaMemset(out, 0xff, out_elems * 2));  // poisoned: a value never written shows as NaN

  jaxq::MarlinParams p;
  p.type = c.bf16 ? jaxq::FloatType::kBF16 : jaxq::FloatType::kF16;
  p.weight = c.type;
  p.a = a;
  p.scales = scales;
  p.zeros = zeros;
  p.global_scale = global_scale;
  p.out = out;
  p.m = c.m;
  p.k = c.k;
  p.n = c.n;
  p.groups = groups;
  p.per_channel = groups == 1;
  SetHopperRows(p, c.hopper_from_rows, 0);
  p.layout = c.layout;
  p.zero_offset = c.layout == jaxq::WeightLayout::kGptqExllama;  // GPTQ v1's stored zero - 1
  auto run = [&](int i) {
    p.b_q = codes[i];
    CHECK(Launch(p));
  };
  p.b_q = codes[0];
  if (Launch(p) == cudaErrorInvalidValue) {  // a version without this type or layout
    std::printf("[%s] %-34s unsupported\n", tag, c.name);
    return;
  }
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> h_out(out_elems);
  CHECK(cudaMemcpy(h_out.data(), out, out_elems * 2, cudaMemcpyDeviceToHost));
  char file[256];
  std::snprintf(file, sizeof file, "%s_%s.bin", tag, c.name);
  for (char* ch = file; *ch; ++ch) {
    if (*ch == ' ') *ch = '_';
  }
  FILE* f = std::fopen(file, "wb");
  std::fwrite(h_out.data(), 2, h_out.size(), f);
  std::fclose(f);

  const float us = tool_timing::BestMicroseconds(run);
  const double bytes = code_words * 4.0 + zero_words * 4.0 + h_scales.size();
  int device = 0;
  CHECK(cudaGetDevice(&device));
  const jaxq::MarlinPlan plan = jaxq::PlanMarlin(c.n, c.k, jaxq::CachedSmCount(device));
  std::printf("[%s] %-34s %7.1f us  %5.1f%% of copy  (plan %d,%d)\n", tag, c.name, us,
              100 * bytes / (us * 1e-6) / bandwidth, plan.tiles_per_block, plan.splits);
  for (auto* q : codes) CHECK(cudaFree(q));
  if (zeros) CHECK(cudaFree(zeros));
  CHECK(cudaFree(scales));
  if (global_scale) CHECK(cudaFree(global_scale));
  CHECK(cudaFree(a));
  CHECK(cudaFree(out));
}

// Every kernel variant once on small weights, for compute-sanitizer (no timing): each type and activation dtype,
// grouped and per-channel scales, act-order with corrupt group indices (the kernel clamps them), bias on every
// other row count, rows in every bucket and both forms of up to 8 rows, K split over a cluster (N = 64) and
// not, the dequantize kernel, and the Hopper kernel on gptq_gemm's and awq_gemm's layouts. Exact placements
// (cudaMalloc each buffer) so that memcheck sees overruns. `hopper_only`: the Hopper kernel's launches alone,
// bfloat16, one row count per row block, on a weight run whole and one split over a cluster of 8 (racecheck over
// every variant outlasts a device call).
void Sanitize(bool hopper_only) {
  using jaxq::MarlinType;
  using jaxq::WeightLayout;
  struct Variant {
    MarlinType type;
    WeightLayout layout;
  };
  std::mt19937 rng(11);
  for (bool bf16 : {true, false}) {
    if (hopper_only && !bf16) continue;
    for (const Variant variant :
         {Variant{MarlinType::kU4B8, WeightLayout::kMarlin}, Variant{MarlinType::kU4, WeightLayout::kMarlin},
          Variant{MarlinType::kU8B128, WeightLayout::kMarlin}, Variant{MarlinType::kFp8E4M3, WeightLayout::kMarlin},
          Variant{MarlinType::kNvFp4, WeightLayout::kMarlin}, Variant{MarlinType::kMxFp4, WeightLayout::kMarlin},
          Variant{MarlinType::kU4, WeightLayout::kGptqExllama}, Variant{MarlinType::kU4, WeightLayout::kAwq}}) {
      const MarlinType type = variant.type;
      const bool checkpoint_layout = variant.layout != WeightLayout::kMarlin;  // the Hopper kernel only
      if (type == MarlinType::kMxFp4 && !bf16) continue;
      // The last weight splits K over a cluster of 8 in the Hopper kernel.
      for (auto [k, n, groups] : {std::tuple{1024, 64, 8}, std::tuple{256, 4096, 1}, std::tuple{512, 8704, 4},
                                  std::tuple{4096, 128, 32}}) {
        if ((checkpoint_layout || hopper_only) && n % 128 != 0) continue;  // not the Hopper kernel's
        if (hopper_only && n == 8704) continue;
        if (IsFp4(type)) groups = k / (type == MarlinType::kNvFp4 ? 16 : 32);
        for (bool act_order : {false, true}) {
          if (act_order &&
              (type == MarlinType::kFp8E4M3 || IsFp4(type) || groups == 1 || checkpoint_layout || hopper_only)) {
            continue;
          }
          const int bits = jaxq::MarlinBits(type);
          auto upload = [&](size_t words) {
            std::vector<uint32_t> host(words);
            for (auto& v : host) v = rng() & (type == MarlinType::kFp8E4M3 ? 0xf7f7f7f7u : 0xffffffffu);
            void* device;
            CHECK(cudaMalloc(&device, words * 4));
            CHECK(cudaMemcpy(device, host.data(), words * 4, cudaMemcpyHostToDevice));
            return device;
          };
          // Random 16-bit patterns with the exponent kept small: finite scales and activations.
          auto halves = [&](size_t count) {
            std::vector<uint16_t> host(count);
            for (auto& v : host) {
              v = tool_timing::HalfBits(std::ldexp(static_cast<float>(rng() % 2001) - 1000.f, -10), bf16);
            }
            void* device;
            CHECK(cudaMalloc(&device, count * 2));
            CHECK(cudaMemcpy(device, host.data(), count * 2, cudaMemcpyHostToDevice));
            return device;
          };
          jaxq::MarlinParams p;
          p.type = bf16 ? jaxq::FloatType::kBF16 : jaxq::FloatType::kF16;
          p.weight = type;
          p.k = k;
          p.n = n;
          p.groups = groups;
          p.per_channel = groups == 1;
          p.layout = variant.layout;
          p.zero_offset = variant.layout == WeightLayout::kGptqExllama;
          p.b_q = static_cast<const uint32_t*>(upload(static_cast<size_t>(k) * n * bits / 32));
          p.scales = Upload(ScaleBytes(type, static_cast<size_t>(groups) * n, rng, [&] {
            return tool_timing::HalfBits(std::ldexp(static_cast<float>(rng() % 2001) - 1000.f, -10), bf16);
          }));
          p.global_scale = type == MarlinType::kNvFp4 ? Upload(std::vector<float>{3e-3f}) : nullptr;
          const size_t zero_words = static_cast<size_t>(groups) * n / 8;
          p.zeros = type == MarlinType::kU4 ? static_cast<const uint32_t*>(upload(zero_words)) : nullptr;
          int32_t* g_idx = nullptr;
          if (act_order) {
            std::vector<int32_t> host(k);
            for (int r = 0; r < k; ++r) {
              host[r] = r % 97 == 0 ? (r % 2 ? 1 << 20 : -(1 << 20)) : static_cast<int>(rng() % groups);
            }
            CHECK(cudaMalloc(&g_idx, k * 4));
            CHECK(cudaMemcpy(g_idx, host.data(), k * 4, cudaMemcpyHostToDevice));
          }
          p.g_idx = g_idx;
          // (rows, batch_invariant, the Hopper kernel from one row where it takes the weight)
          for (auto [m, invariant, hopper] :
               {std::tuple{1, false, false}, std::tuple{1, true, false}, std::tuple{7, false, false},
                std::tuple{12, false, false}, std::tuple{20, false, false}, std::tuple{40, false, false},
                std::tuple{64, false, false}, std::tuple{130, false, false}, std::tuple{1, false, true},
                std::tuple{16, false, true}, std::tuple{20, false, true}, std::tuple{40, false, true},
                std::tuple{64, false, true}, std::tuple{100, false, true}, std::tuple{130, false, true},
                std::tuple{256, false, true}}) {
            if ((hopper_only || checkpoint_layout) && !hopper) continue;
            if (hopper_only && (m == 1 || m == 40 || m == 256)) continue;  // 16, 20, 64, 100, 130: each row block
            p.m = m;
            p.batch_invariant = invariant;
            SetHopperRows(p, hopper ? 1 : 0, 0);
            p.a = halves(static_cast<size_t>(m) * k);
            p.bias = m % 2 == 0 ? halves(n) : nullptr;
            CHECK(cudaMalloc(&p.out, static_cast<size_t>(m) * n * 2));
            CHECK(Launch(p));
            CHECK(cudaDeviceSynchronize());
            CHECK(cudaFree(const_cast<void*>(p.a)));
            if (p.bias) CHECK(cudaFree(const_cast<void*>(p.bias)));
            CHECK(cudaFree(p.out));
          }
          if (!hopper_only && !checkpoint_layout) {
            CHECK(cudaMalloc(&p.out, static_cast<size_t>(k) * n * 2));
            CHECK(jaxq::LaunchMarlinDequantize(p, nullptr));
            CHECK(cudaDeviceSynchronize());
            CHECK(cudaFree(p.out));
          }
          CHECK(cudaFree(const_cast<uint32_t*>(p.b_q)));
          CHECK(cudaFree(const_cast<void*>(p.scales)));
          if (p.global_scale) CHECK(cudaFree(const_cast<float*>(p.global_scale)));
          if (p.zeros) CHECK(cudaFree(const_cast<uint32_t*>(p.zeros)));
          if (g_idx) CHECK(cudaFree(g_idx));
        }
      }
    }
  }
  std::printf("ran every marlin kernel variant\n");
}

}  // namespace

int main(int argc, char** argv) {
  using jaxq::MarlinType;
  if (const char* sanitize = std::getenv("MARLIN_AB_SANITIZE")) {
    Sanitize(std::strcmp(sanitize, "hopper") == 0);
    return 0;
  }
  const char* tag = argc > 1 ? argv[1] : "ab";
  const Case cases[] = {
      {"u4b8 M1", MarlinType::kU4B8, true, 1, 8192, 28672, 128},
      {"u4b8 M16", MarlinType::kU4B8, true, 16, 8192, 28672, 128},
      {"u4b8 M32", MarlinType::kU4B8, true, 32, 8192, 28672, 128},
      {"u4b8 M64", MarlinType::kU4B8, true, 64, 8192, 28672, 128},
      {"u4b8 M128", MarlinType::kU4B8, true, 128, 8192, 28672, 128},
      {"u4b8 M9 g32", MarlinType::kU4B8, true, 9, 8192, 28672, 32},
      {"u4b8 M1 channel", MarlinType::kU4B8, true, 1, 8192, 28672, -1},
      {"u4b8 M7 fp16", MarlinType::kU4B8, false, 7, 8192, 28672, 128},
      {"u4 M1", MarlinType::kU4, true, 1, 8192, 28672, 128},
      {"u4 M16", MarlinType::kU4, true, 16, 8192, 28672, 128},
      {"u8b128 M1", MarlinType::kU8B128, true, 1, 8192, 28672, 128},
      {"u8b128 M16 fp16", MarlinType::kU8B128, false, 16, 8192, 28672, 128},
      {"u4 M40 fp16 g64", MarlinType::kU4, false, 40, 8192, 28672, 64},
      {"fp8 M1 channel", MarlinType::kFp8E4M3, true, 1, 8192, 28672, -1},
      {"fp8 M16 channel", MarlinType::kFp8E4M3, true, 16, 8192, 28672, -1},
      {"nvfp4 M1", MarlinType::kNvFp4, true, 1, 8192, 28672, 16},
      {"nvfp4 M16", MarlinType::kNvFp4, true, 16, 8192, 28672, 16},
      {"nvfp4 M16 fp16", MarlinType::kNvFp4, false, 16, 8192, 28672, 16},
      {"mxfp4 M1", MarlinType::kMxFp4, true, 1, 8192, 28672, 32},
      {"mxfp4 M16", MarlinType::kMxFp4, true, 16, 8192, 28672, 32},
      {"u4b8 M1 K28672 N8192", MarlinType::kU4B8, true, 1, 28672, 8192, 128},
      {"u4b8 M16 K28672 N8192", MarlinType::kU4B8, true, 16, 28672, 8192, 128},
      {"u4b8 M1 K4096 N14336", MarlinType::kU4B8, true, 1, 4096, 14336, 128},
      {"u4b8 M16 K4096 N14336", MarlinType::kU4B8, true, 16, 4096, 14336, 128},
      {"u4b8 M1 K4096 N4096", MarlinType::kU4B8, true, 1, 4096, 4096, 128},
      {"u4b8 M16 K4096 N4096", MarlinType::kU4B8, true, 16, 4096, 4096, 128},
      {"u4b8 M1 K4096 N1024", MarlinType::kU4B8, true, 1, 4096, 1024, 128},
      {"u4b8 M16 K4096 N1024", MarlinType::kU4B8, true, 16, 4096, 1024, 128},
      // The Hopper kernel (marlin_hopper.cu) forced from one row (a version before its row tiles: from two; its
      // outputs equal the new ones where the new kernel splits no K, if a row's sums do not depend on the tile).
      {"hopper u4b8 M1", MarlinType::kU4B8, true, 1, 8192, 28672, 128, 1},
      {"hopper u4b8 M16", MarlinType::kU4B8, true, 16, 8192, 28672, 128, 1},
      {"hopper u4b8 M32", MarlinType::kU4B8, true, 32, 8192, 28672, 128, 1},
      {"hopper u4b8 M64", MarlinType::kU4B8, true, 64, 8192, 28672, 128, 1},
      {"hopper u4b8 M128", MarlinType::kU4B8, true, 128, 8192, 28672, 128, 1},
      {"hopper u4b8 M256", MarlinType::kU4B8, true, 256, 8192, 28672, 128, 1},
      {"hopper u4b8 M192", MarlinType::kU4B8, true, 192, 8192, 28672, 128, 1},
      {"hopper u4b8 M512", MarlinType::kU4B8, true, 512, 8192, 28672, 128, 1},
      {"hopper u4b8 M200 fp16 g32", MarlinType::kU4B8, false, 200, 8192, 28672, 32, 1},
      {"hopper u4 M16", MarlinType::kU4, true, 16, 8192, 28672, 128, 1},
      {"hopper u4 M128", MarlinType::kU4, true, 128, 8192, 28672, 128, 1},
      {"hopper u4b8 M16 K4096 N14336", MarlinType::kU4B8, true, 16, 4096, 14336, 128, 1},
      {"hopper u4b8 M64 K4096 N14336", MarlinType::kU4B8, true, 64, 4096, 14336, 128, 1},
      {"hopper u4b8 M128 K4096 N14336", MarlinType::kU4B8, true, 128, 4096, 14336, 128, 1},
      {"hopper u4b8 M16 K28672 N8192", MarlinType::kU4B8, true, 16, 28672, 8192, 128, 1},
      {"hopper u4b8 M128 K28672 N8192", MarlinType::kU4B8, true, 128, 28672, 8192, 128, 1},
      {"hopper u4b8 M256 K28672 N8192", MarlinType::kU4B8, true, 256, 28672, 8192, 128, 1},
      {"hopper u4b8 M1 K4096 N4096", MarlinType::kU4B8, true, 1, 4096, 4096, 128, 1},
      {"hopper u4b8 M16 K4096 N4096", MarlinType::kU4B8, true, 16, 4096, 4096, 128, 1},
      {"hopper u4b8 M128 K4096 N4096", MarlinType::kU4B8, true, 128, 4096, 4096, 128, 1},
      {"hopper u4b8 M16 K4096 N1024", MarlinType::kU4B8, true, 16, 4096, 1024, 128, 1},
      {"hopper u4b8 M16 K4096 N6144", MarlinType::kU4B8, true, 16, 4096, 6144, 128, 1},
      {"hopper u4b8 M16 K14336 N4096", MarlinType::kU4B8, true, 16, 14336, 4096, 128, 1},
      // Where the Hopper kernel should start for the other types (the decode kernel runs them up to 64 rows
      // here) and on gptq_gemm's and awq_gemm's layouts (their own kernel: up to 64 rows).
      {"u8b128 M32", MarlinType::kU8B128, true, 32, 8192, 28672, 128},
      {"u8b128 M64", MarlinType::kU8B128, true, 64, 8192, 28672, 128},
      {"fp8 M32 channel", MarlinType::kFp8E4M3, true, 32, 8192, 28672, -1},
      {"fp8 M64 channel", MarlinType::kFp8E4M3, true, 64, 8192, 28672, -1},
      {"nvfp4 M32", MarlinType::kNvFp4, true, 32, 8192, 28672, 16},
      {"nvfp4 M64", MarlinType::kNvFp4, true, 64, 8192, 28672, 16},
      {"hopper u8b128 M16", MarlinType::kU8B128, true, 16, 8192, 28672, 128, 1},
      {"hopper u8b128 M32", MarlinType::kU8B128, true, 32, 8192, 28672, 128, 1},
      {"hopper u8b128 M64", MarlinType::kU8B128, true, 64, 8192, 28672, 128, 1},
      {"hopper u8b128 M128", MarlinType::kU8B128, true, 128, 8192, 28672, 128, 1},
      {"hopper fp8 M16 channel", MarlinType::kFp8E4M3, true, 16, 8192, 28672, -1, 1},
      {"hopper fp8 M32 channel", MarlinType::kFp8E4M3, true, 32, 8192, 28672, -1, 1},
      {"hopper fp8 M64 channel", MarlinType::kFp8E4M3, true, 64, 8192, 28672, -1, 1},
      {"hopper fp8 M128 channel", MarlinType::kFp8E4M3, true, 128, 8192, 28672, -1, 1},
      {"hopper nvfp4 M16", MarlinType::kNvFp4, true, 16, 8192, 28672, 16, 1},
      {"hopper nvfp4 M32", MarlinType::kNvFp4, true, 32, 8192, 28672, 16, 1},
      {"hopper nvfp4 M64", MarlinType::kNvFp4, true, 64, 8192, 28672, 16, 1},
      {"hopper nvfp4 M128", MarlinType::kNvFp4, true, 128, 8192, 28672, 16, 1},
      {"hopper mxfp4 M128", MarlinType::kMxFp4, true, 128, 8192, 28672, 32, 1},
      {"hopper gptq M64", MarlinType::kU4, true, 64, 8192, 28672, 128, 1, jaxq::WeightLayout::kGptqExllama},
      {"hopper gptq M128", MarlinType::kU4, true, 128, 8192, 28672, 128, 1, jaxq::WeightLayout::kGptqExllama},
      {"hopper gptq M256", MarlinType::kU4, true, 256, 8192, 28672, 128, 1, jaxq::WeightLayout::kGptqExllama},
      {"hopper awq M64", MarlinType::kU4, true, 64, 8192, 28672, 128, 1, jaxq::WeightLayout::kAwq},
      {"hopper awq M128", MarlinType::kU4, true, 128, 8192, 28672, 128, 1, jaxq::WeightLayout::kAwq},
      {"hopper awq M256", MarlinType::kU4, true, 256, 8192, 28672, 128, 1, jaxq::WeightLayout::kAwq},
      {"hopper u4 M64", MarlinType::kU4, true, 64, 8192, 28672, 128, 1},
      {"hopper u4 M256", MarlinType::kU4, true, 256, 8192, 28672, 128, 1},
      // A Llama-3-8B layer's fused projections (q/k/v K4096 N6144, o K4096 N4096, gate/up K4096 N28672, down
      // K14336 N4096) on both kernels at decode rows: where marlin_gemm should start the Hopper kernel.
      {"layer u4b8 M16 K4096 N6144", MarlinType::kU4B8, true, 16, 4096, 6144, 128},
      {"layer u4b8 M16 K14336 N4096", MarlinType::kU4B8, true, 16, 14336, 4096, 128},
      {"layer u4b8 M16 K4096 N28672", MarlinType::kU4B8, true, 16, 4096, 28672, 128},
      {"layer hopper u4b8 M16 K4096 N28672", MarlinType::kU4B8, true, 16, 4096, 28672, 128, 1},
      {"layer u4b8 M1 K4096 N6144", MarlinType::kU4B8, true, 1, 4096, 6144, 128},
      {"layer hopper u4b8 M1 K4096 N6144", MarlinType::kU4B8, true, 1, 4096, 6144, 128, 1},
      {"layer u4b8 M1 K14336 N4096", MarlinType::kU4B8, true, 1, 14336, 4096, 128},
      {"layer hopper u4b8 M1 K14336 N4096", MarlinType::kU4B8, true, 1, 14336, 4096, 128, 1},
      {"layer u4b8 M1 K4096 N4096", MarlinType::kU4B8, true, 1, 4096, 4096, 128},
      {"layer hopper u4b8 M1 K4096 N4096", MarlinType::kU4B8, true, 1, 4096, 4096, 128, 1},
      {"layer u4b8 M1 K4096 N28672", MarlinType::kU4B8, true, 1, 4096, 28672, 128},
      {"layer hopper u4b8 M1 K4096 N28672", MarlinType::kU4B8, true, 1, 4096, 28672, 128, 1},
  };
  const double bandwidth = tool_timing::CopyBandwidth();
  std::printf("[%s] copy %.0f GB/s\n", tag, bandwidth / 1e9);
  const char* only = std::getenv("MARLIN_AB_CASE");
  for (const Case& c : cases) {
    if (only == nullptr || std::strstr(c.name, only) != nullptr) Run(tag, c, bandwidth);
  }
  return 0;
}
