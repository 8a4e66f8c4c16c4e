// XLA FFI handler for cutlass_scaled_mm / cutlass_scaled_mm_azp: bind buffers, re-check shapes, launch.
// Operands: a [M, K], b [K, N] (column-major: XLA is asked for that layout), scale_a, scale_b, then the
// optional ones the attributes announce, in this order: azp_adj [N], azp [M], bias [N]. With block_scales,
// scale_a is [M, K/128] column-major (XLA is asked for that too) and scale_b [K/128, ceil(N/128)] row-major.
#include "ffi/scaled_mm.h"

#include <string>

#include "ffi/common.h"
#include "kernels/scaled_mm.h"

namespace ffi = xla::ffi;
using namespace jaxq::ffi_util;

namespace jaxq {
namespace {

// A scale is one value or one per row (per column); anything else is an error.
ffi::Error BindScale(const char* name, const ffi::AnyBuffer& scale, int64_t per, const float*& data, bool& vector) {
  const int64_t count = static_cast<int64_t>(scale.element_count());
  if (scale.element_type() != ffi::DataType::F32 || (count != 1 && count != per)) {
    return ffi::Error::InvalidArgument(std::string("jaxq: ") + name + " must be float32 with 1 or " +
                                       std::to_string(per) + " values; got " + DimsToString(scale.dimensions()));
  }
  data = static_cast<const float*>(scale.untyped_data());
  vector = count > 1;
  return ffi::Error::Success();
}

ffi::Error BindBlockScale(const char* name, const ffi::AnyBuffer& scale, int64_t rows, int64_t cols,
                          const float*& data) {
  if (auto err = ExpectShape(name, scale, ffi::DataType::F32, {}, 0, {rows, cols}); err.failure()) return err;
  data = static_cast<const float*>(scale.untyped_data());
  return ffi::Error::Success();
}

ffi::Error ScaledMm(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer scale_a,
                    ffi::AnyBuffer scale_b, ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out,
                    bool has_azp_adj, bool has_azp, bool has_bias, bool block_scales, bool fast_accum) {
  ScaledMmParams p;
  auto ad = a.dimensions(), bd = b.dimensions();
  const bool int8 = a.element_type() == ffi::DataType::S8;
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0] || a.element_type() != b.element_type() ||
      !(int8 || a.element_type() == ffi::DataType::F8E4M3FN)) {
    return ffi::Error::InvalidArgument("jaxq: a " + DimsToString(ad) + " and b " + DimsToString(bd) +
                                       " must be int8 or float8_e4m3fn [M, K] and [K, N]");
  }
  p.operand = int8 ? MmOperand::kInt8 : MmOperand::kFp8E4M3;
  p.m = ad[0];
  p.k = ad[1];
  p.n = bd[1];
  const auto out_type = ToFloatType(out->element_type());
  if (!out_type || *out_type == FloatType::kF32) return ffi::Error::InvalidArgument("jaxq: out must be f16 or bf16");
  p.out_type = *out_type;
  if (auto err = ExpectShape("out", *out, out->element_type(), {}, 0, {p.m, p.n}); err.failure()) return err;
  p.block_scales = block_scales;
  p.fast_accum = fast_accum;
  if (block_scales) {
    const int64_t k_blocks = p.k / 128, n_blocks = (p.n + 127) / 128;
    if (auto err = BindBlockScale("scale_a", scale_a, p.m, k_blocks, p.scale_a); err.failure()) return err;
    if (auto err = BindBlockScale("scale_b", scale_b, k_blocks, n_blocks, p.scale_b); err.failure()) return err;
  } else {
    if (auto err = BindScale("scale_a", scale_a, p.m, p.scale_a, p.scale_a_per_row); err.failure()) return err;
    if (auto err = BindScale("scale_b", scale_b, p.n, p.scale_b, p.scale_b_per_col); err.failure()) return err;
  }

  const size_t expected = size_t{has_azp_adj} + size_t{has_azp} + size_t{has_bias};
  if (optional.size() != expected || (has_azp && !has_azp_adj) || ((has_azp_adj || has_azp) && !int8)) {
    return ffi::Error::InvalidArgument("jaxq: optional operands do not match the attributes");
  }
  size_t next = 0;
  auto take = [&](const char* name, ffi::DataType type, int64_t size, const void*& data) -> ffi::Error {
    auto buffer = optional.get<ffi::AnyBuffer>(next++);
    if (buffer.has_error()) return buffer.error();
    if (auto err = ExpectShape(name, *buffer, type, {}, 0, {size}); err.failure()) return err;
    data = buffer->untyped_data();
    return ffi::Error::Success();
  };
  const void* azp_adj = nullptr;
  const void* azp = nullptr;
  if (has_azp_adj) {
    if (auto err = take("azp_adj", ffi::DataType::S32, p.n, azp_adj); err.failure()) return err;
  }
  if (has_azp) {
    if (auto err = take("azp", ffi::DataType::S32, p.m, azp); err.failure()) return err;
  }
  if (has_bias) {
    if (auto err = take("bias", out->element_type(), p.n, p.bias); err.failure()) return err;
  }
  p.azp_adj = static_cast<const int32_t*>(azp_adj);
  p.azp = static_cast<const int32_t*>(azp);
  if (!ScaledMmSupports(p)) {
    return ffi::Error::InvalidArgument(
        "jaxq: scaled_mm needs K % 16 == 0 and N % 8 == 0 (block-wise fp8 scales: also K % 128 == 0 and "
        "M % 4 == 0; fast accumulation: fp8 without block-wise scales); got M " + std::to_string(p.m) + ", K " + std::to_string(p.k) + ", N " + std::to_string(p.n));
  }
  p.a = a.untyped_data();
  p.b = b.untyped_data();
  p.d = out->untyped_data();
  PoisonIfRequested(stream, p.d, out->size_bytes());
  return FromCuda(LaunchScaledMm(p, stream), "scaled_mm launch");
}

}  // namespace
}  // namespace jaxq

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqScaledMm, jaxq::ScaledMm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("has_azp_adj")
                                  .Attr<bool>("has_azp")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("block_scales")
                                  .Attr<bool>("fast_accum"),
                              {ffi::Traits::kCmdBufferCompatible});
