// Host check of the division in csrc/kernels/group_quant.cu (ReciprocalDivide): the reciprocal refined once
// from a seed (the GPU's rcp.approx, here the correctly rounded reciprocal moved up to two ulps either way),
// then per dividend the product, its exact residual and one correction, against IEEE division. Divisors in
// [2^-80, 2^80]; dividends random or within three ulps of m * divisor for fp8 values, fp8 midpoints and
// integers m (the ties fp8 and int8 encoding turn on). Normal dividends must all match; denormal ones are
// counted apart (their quotients, below 2^-46, encode as zero either way).
//   g++ -O2 -ffp-contract=off -o /tmp/division_check tools/reciprocal_division_check.cc && /tmp/division_check
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float Divide(float x, float divisor, float seed) {
  const float reciprocal = std::fmaf(seed, std::fmaf(seed, -divisor, 1.f), seed);
  const float q = x * reciprocal;
  return std::copysign(std::fmaf(std::fmaf(-q, divisor, x), reciprocal, q), x);
}

}  // namespace

int main() {
  std::mt19937_64 rng(1);
  auto significand = [&] { return 1.f + static_cast<float>(rng() & 0x7fffff) / static_cast<float>(1 << 23); };
  long checked = 0, mismatched = 0, denormal_mismatched = 0;
  for (long t = 0; t < 200000000L; ++t) {
    const int exponent = static_cast<int>(rng() % 161) - 80;
    const float divisor = std::ldexp(significand(), exponent);
    const float seed = FromBits(Bits(1.f / divisor) + static_cast<int>(rng() % 5) - 2);
    float x;
    if (t % 2) {
      float m = std::ldexp(1.f + static_cast<float>(rng() % 16) / 16.f, static_cast<int>(rng() % 20) - 11);
      if (rng() % 2) m = static_cast<float>(rng() % 448);
      x = FromBits(Bits(m * divisor) + static_cast<int>(rng() % 7) - 3);
    } else {
      x = std::ldexp(significand(), exponent + static_cast<int>(rng() % 30) - 20);
    }
    if (rng() % 2) x = -x;
    if (!std::isfinite(x) || x == 0) continue;
    ++checked;
    if (Bits(Divide(x, divisor, seed)) != Bits(x / divisor)) {
      if (std::fabs(x) < 0x1p-126f) {
        ++denormal_mismatched;
      } else if (++mismatched <= 10) {
        std::printf("x=%a divisor=%a seed=%a: %a, IEEE %a\n", x, divisor, seed, Divide(x, divisor, seed), x / divisor);
      }
    }
  }
  const bool zeros_signed = std::signbit(Divide(-0.f, 3.f, 1.f / 3.f)) && !std::signbit(Divide(0.f, 3.f, 1.f / 3.f));
  std::printf("checked %ld: %ld normal dividends differ, %ld denormal ones; -0 / d = -0: %s\n", checked, mismatched,
              denormal_mismatched, zeros_signed ? "yes" : "no");
  return mismatched == 0 && zeros_signed ? 0 : 1;
}
