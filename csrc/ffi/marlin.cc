// XLA FFI handlers for the Marlin layout: marlin_gemm binds a, the weight and scales, then the optional zero
// points, act-order group indices and bias (present as the attributes say); marlin_dequantize the same without
// a and bias. Both re-check the shapes, then launch.
#include "ffi/marlin.h"

#include <string>

#include "ffi/common.h"
#include "kernels/marlin.h"

namespace ffi = xla::ffi;
using namespace jaxq::ffi_util;

namespace jaxq {
namespace {

// Fills p's weight fields from b_q [k / 16, n * 16 * bits / 32], scales [groups, n] (of `type`) and the
// optional zero points and g_idx at the front of `optional` (followed by `more` operands of op `op`); `next`
// moves past them.
ffi::Error BindWeight(MarlinParams& p, const char* op, int32_t b_q_type, ffi::DataType type, ffi::AnyBuffer b_q,
                      ffi::AnyBuffer scales, ffi::RemainingArgs& optional, size_t& next, bool has_zeros,
                      bool has_g_idx, int more) {
  if (optional.size() != static_cast<size_t>(has_zeros + has_g_idx + more)) {
    return ffi::Error::InvalidArgument(std::string("jaxq: ") + op + " got " + std::to_string(optional.size()) +
                                       " optional operands; its attributes name another number");
  }
  if (b_q_type < 0 || b_q_type > 3) return ffi::Error::InvalidArgument("jaxq: unknown Marlin weight type");
  p.weight = static_cast<MarlinType>(b_q_type);
  const auto float_type = ToFloatType(type);
  if (!float_type || *float_type == FloatType::kF32 || scales.element_type() != type) {
    return ffi::Error::InvalidArgument("jaxq: the activations and b_scales must both be float16 or both bfloat16");
  }
  p.type = *float_type;
  auto qd = b_q.dimensions(), sd = scales.dimensions();
  const int bits = MarlinBits(p.weight);
  if (qd.size() != 2 || sd.size() != 2 || b_q.element_type() != ffi::DataType::S32 ||
      sd[1] * 16 * bits != qd[1] * 32 || sd[1] % 64 != 0 || sd[0] < 1) {
    return ffi::Error::InvalidArgument("jaxq: b_q_weight " + DimsToString(qd) + " and b_scales " + DimsToString(sd) +
                                       " are not a Marlin weight");
  }
  p.k = static_cast<int>(qd[0] * 16);
  p.n = static_cast<int>(sd[1]);
  p.groups = static_cast<int>(sd[0]);
  if (p.per_channel && p.groups != 1) {
    return ffi::Error::InvalidArgument("jaxq: per-channel b_scales must hold one group");
  }
  if (has_zeros) {
    auto zeros = optional.get<ffi::AnyBuffer>(next++);
    if (zeros.has_error()) return zeros.error();
    if (auto err = ExpectShape("b_zeros", *zeros, ffi::DataType::S32, {}, 0, {p.groups, p.n * bits / 32});
        err.failure()) {
      return err;
    }
    p.zeros = static_cast<const uint32_t*>(zeros->untyped_data());
  }
  if (has_g_idx) {
    auto g_idx = optional.get<ffi::AnyBuffer>(next++);
    if (g_idx.has_error()) return g_idx.error();
    if (auto err = ExpectShape("g_idx", *g_idx, ffi::DataType::S32, {}, 0, {p.k}); err.failure()) return err;
    p.g_idx = static_cast<const int32_t*>(g_idx->untyped_data());  // the kernels clamp entries to the groups
  } else if (p.k % p.groups != 0) {
    return ffi::Error::InvalidArgument("jaxq: b_scales' groups do not divide K");
  }
  if ((p.weight == MarlinType::kU4) != has_zeros || (p.weight == MarlinType::kFp8E4M3 && has_g_idx)) {
    return ffi::Error::InvalidArgument("jaxq: zero points go with uint4 weights only, act-order with integer ones");
  }
  p.b_q = static_cast<const uint32_t*>(b_q.untyped_data());
  p.scales = scales.untyped_data();
  return ffi::Error::Success();
}

ffi::Error MarlinGemm(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b_q, ffi::AnyBuffer scales,
                      ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out, int32_t b_q_type,
                      bool has_zeros, bool has_g_idx, bool has_bias, bool per_channel, bool batch_invariant) {
  MarlinParams p;
  p.per_channel = per_channel;
  p.batch_invariant = batch_invariant;
  size_t next = 0;
  if (auto err = BindWeight(p, "marlin_gemm", b_q_type, a.element_type(), b_q, scales, optional, next, has_zeros,
                            has_g_idx, has_bias);
      err.failure()) {
    return err;
  }
  auto ad = a.dimensions();
  if (ad.size() != 2 || ad[1] != p.k) {
    return ffi::Error::InvalidArgument("jaxq: a " + DimsToString(ad) + " does not end in the weight's K");
  }
  p.m = ad[0];
  if (has_bias) {
    auto bias = optional.get<ffi::AnyBuffer>(next++);
    if (bias.has_error()) return bias.error();
    if (auto err = ExpectShape("b_bias", *bias, a.element_type(), {}, 0, {p.n}); err.failure()) return err;
    p.bias = bias->untyped_data();
  }
  if (auto err = ExpectShape("out", *out, a.element_type(), {}, 0, {p.m, p.n}); err.failure()) return err;
  p.a = a.untyped_data();
  p.out = out->untyped_data();
  PoisonIfRequested(stream, p.out, out->size_bytes());
  return FromCuda(LaunchMarlinGemm(p, stream), "Marlin GEMM launch");
}

ffi::Error MarlinDequantize(cudaStream_t stream, ffi::AnyBuffer b_q, ffi::AnyBuffer scales,
                            ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out, int32_t b_q_type,
                            bool has_zeros, bool has_g_idx, bool per_channel) {
  MarlinParams p;
  p.per_channel = per_channel;
  size_t next = 0;
  if (auto err = BindWeight(p, "marlin_dequantize", b_q_type, scales.element_type(), b_q, scales, optional, next,
                            has_zeros, has_g_idx, 0);
      err.failure()) {
    return err;
  }
  if (auto err = ExpectShape("out", *out, scales.element_type(), {}, 0, {p.k, p.n}); err.failure()) return err;
  p.out = out->untyped_data();
  PoisonIfRequested(stream, p.out, out->size_bytes());
  return FromCuda(LaunchMarlinDequantize(p, stream), "Marlin dequantize launch");
}

}  // namespace
}  // namespace jaxq

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqMarlinGemm, jaxq::MarlinGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("b_q_type")
                                  .Attr<bool>("has_zeros")
                                  .Attr<bool>("has_g_idx")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("per_channel")
                                  .Attr<bool>("batch_invariant"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqMarlinDequantize, jaxq::MarlinDequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("b_q_type")
                                  .Attr<bool>("has_zeros")
                                  .Attr<bool>("has_g_idx")
                                  .Attr<bool>("per_channel"),
                              {ffi::Traits::kCmdBufferCompatible});
