// A/B timing of two versions of kernels/weight_only.cu outside JAX (run.sh builds one binary per version, the -I
// path picking the file): each binary runs LaunchWeightOnlyGemm on the same fixed inputs for the cases below,
// writes each output to TAG_CASE.bin (compare.py compares two tags) and prints its time (CUDA events, best of 5 x
// 30 calls on three rotated weight copies, so that no call finds the last one's weights in L2) and its share of
// the copy bandwidth measured in the same process. Results: benchmarks/RESULTS.md (2026-11-30, "what limits the M16 weight-only kernel").
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "kernels/weight_only.cu"
#include "timing.cuh"

struct Case { const char* name; jaxq::WeightFormat f; int bits; bool bf16; int m, k, n, split; };

int main(int argc, char** argv) {
  const char* tag = argc > 1 ? argv[1] : "ab";
  const Case cases[] = {
      {"gptq4 M16", jaxq::WeightFormat::kGptqExllama, 4, true, 16, 8192, 28672, 1},
      {"awq M16", jaxq::WeightFormat::kAwq, 4, true, 16, 8192, 28672, 1},
      {"gptq4 M9", jaxq::WeightFormat::kGptqExllama, 4, true, 9, 8192, 28672, 1},
      {"gptq4 M1", jaxq::WeightFormat::kGptqExllama, 4, true, 1, 8192, 28672, 1},
      {"awq M1", jaxq::WeightFormat::kAwq, 4, true, 1, 8192, 28672, 1},
      {"gptq8 M16", jaxq::WeightFormat::kGptqExllama, 8, true, 16, 8192, 28672, 1},
      {"gptq3 M16", jaxq::WeightFormat::kGptqExllama, 3, true, 16, 8192, 28672, 1},
      {"gptq2 M16", jaxq::WeightFormat::kGptqExllama, 2, true, 16, 8192, 28672, 1},
      {"gptq4 plain fp16 M13", jaxq::WeightFormat::kGptq, 4, false, 13, 8192, 28672, 1},
      {"awq fp16 M16", jaxq::WeightFormat::kAwq, 4, false, 16, 8192, 28672, 1},
      {"gptq4 M16 K28672 N8192 s4", jaxq::WeightFormat::kGptqExllama, 4, true, 16, 28672, 8192, 4},
      {"awq M16 K4096 N14336 s2", jaxq::WeightFormat::kAwq, 4, true, 16, 4096, 14336, 2},
      {"gptq4 M33", jaxq::WeightFormat::kGptqExllama, 4, true, 33, 8192, 28672, 1},
  };
  const double bw = tool_timing::CopyBandwidth();
  printf("[%s] copy %.0f GB/s\n", tag, bw / 1e9);
  for (const Case& c : cases) {
    std::mt19937 rng(7);
    const int groups = c.k / 128;
    const size_t qw_words = static_cast<size_t>(c.k) * c.bits / 32 * c.n;
    const size_t qz_words = static_cast<size_t>(groups) * c.n * c.bits / 32;
    std::vector<uint32_t> h_qw(qw_words), h_qz(qz_words);
    for (auto& v : h_qw) v = rng();
    for (auto& v : h_qz) v = rng();
    std::uniform_real_distribution<float> u(0.5f, 1.5f), nrm(-2.f, 2.f);
    std::vector<uint16_t> h_sc(static_cast<size_t>(groups) * c.n), h_x(static_cast<size_t>(c.m) * c.k);
    for (auto& v : h_sc) v = tool_timing::HalfBits(u(rng) * 1e-2f, c.bf16);
    for (auto& v : h_x) v = tool_timing::HalfBits(nrm(rng), c.bf16);
    uint32_t *qw[tool_timing::kCopies], *qz, *ws;
    void *sc, *x, *out;
    for (auto& p : qw) { CHECK(cudaMalloc(&p, qw_words * 4)); CHECK(cudaMemcpy(p, h_qw.data(), qw_words * 4, cudaMemcpyHostToDevice)); }
    CHECK(cudaMalloc(&qz, qz_words * 4)); CHECK(cudaMemcpy(qz, h_qz.data(), qz_words * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMalloc(&sc, h_sc.size() * 2)); CHECK(cudaMemcpy(sc, h_sc.data(), h_sc.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMalloc(&x, h_x.size() * 2)); CHECK(cudaMemcpy(x, h_x.data(), h_x.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMalloc(&out, static_cast<size_t>(c.m) * c.n * 2));
    CHECK(cudaMemset(out, 0xff, static_cast<size_t>(c.m) * c.n * 2));
    const int64_t ws_words = jaxq::WeightOnlyWorkspaceWords(c.m, c.n, c.split);
    CHECK(cudaMalloc(&ws, ws_words * 4));
    jaxq::WeightOnlyParams p;
    p.type = c.bf16 ? jaxq::FloatType::kBF16 : jaxq::FloatType::kF16;
    p.format = c.f; p.bits = c.bits; p.zero_offset = c.f == jaxq::WeightFormat::kAwq ? 0 : 1;
    p.x = x; p.qzeros = qz; p.scales = sc; p.out = out; p.workspace = ws;
    p.m = c.m; p.n = c.n; p.k = c.k; p.groups = groups;
    auto run = [&](int i) { p.qweight = qw[i]; CHECK(jaxq::LaunchWeightOnlyGemm(p, c.split, nullptr)); };
    run(0);
    CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> h_out(static_cast<size_t>(c.m) * c.n);
    CHECK(cudaMemcpy(h_out.data(), out, h_out.size() * 2, cudaMemcpyDeviceToHost));
    char fname[256];
    snprintf(fname, sizeof fname, "%s_%s.bin", tag, c.name);
    for (char* ch = fname; *ch; ++ch) if (*ch == ' ') *ch = '_';
    FILE* fp = fopen(fname, "wb"); fwrite(h_out.data(), 2, h_out.size(), fp); fclose(fp);
    const float us = tool_timing::BestMicroseconds(run);
    const double bytes = qw_words * 4.0 + qz_words * 4.0 + h_sc.size() * 2.0;
    printf("[%s] %-28s %7.1f us  %5.1f%% of copy\n", tag, c.name, us, 100 * bytes / (us * 1e-6) / bw);
    for (auto& pp : qw) CHECK(cudaFree(pp));
    CHECK(cudaFree(qz)); CHECK(cudaFree(sc)); CHECK(cudaFree(x)); CHECK(cudaFree(out)); CHECK(cudaFree(ws));
  }
  return 0;
}
