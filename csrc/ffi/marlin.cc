// XLA FFI handlers for the Marlin layout: marlin_gemm binds a, the weight and scales, then the optional zero
// points, act-order group indices (present as the attributes say), NVFP4's float32 global scale (present for
// that type) and bias; marlin_dequantize the same without a, the global scale and bias. Both re-check the
// shapes, then launch.
#include "ffi/marlin.h"

#include <string>

#include "ffi/common.h"
#include "kernels/marlin.h"

namespace ffi = xla::ffi;
using namespace jaxq::ffi_util;

namespace jaxq {
namespace {

// The scales' element type for weight type `weight` and activations of `type`.
ffi::DataType ScaleType(MarlinType weight, ffi::DataType type) {
  if (weight == MarlinType::kNvFp4) return ffi::DataType::F8E4M3FN;
  if (weight == MarlinType::kMxFp4) return ffi::DataType::F8E8M0FNU;
  return type;
}

// Fills p's weight fields from b_q [k / 16, n * 16 * bits / 32], scales [groups, n] (of ScaleType) and the
// optional zero points, g_idx and (`with_global_scale`, NVFP4) global scale at the front of `optional` (followed
// by `more` operands of op `op`); `next` moves past them. `type` is the activations' and the output's.
ffi::Error BindWeight(MarlinParams& p, const char* op, int32_t b_q_type, ffi::DataType type, ffi::AnyBuffer b_q,
                      ffi::AnyBuffer scales, ffi::RemainingArgs& optional, size_t& next, bool has_zeros,
                      bool has_g_idx, bool with_global_scale, int more) {
  if (b_q_type < 0 || b_q_type > 5) return ffi::Error::InvalidArgument("jaxq: unknown Marlin weight type");
  p.weight = static_cast<MarlinType>(b_q_type);
  const bool has_global_scale = with_global_scale && p.weight == MarlinType::kNvFp4;
  if (optional.size() != static_cast<size_t>(has_zeros + has_g_idx + has_global_scale + more)) {
    return ffi::Error::InvalidArgument(std::string("jaxq: ") + op + " got " + std::to_string(optional.size()) +
                                       " optional operands; its attributes name another number");
  }
  const auto float_type = ToFloatType(type);
  if (!float_type || *float_type == FloatType::kF32) {
    return ffi::Error::InvalidArgument("jaxq: the activations must be float16 or bfloat16");
  }
  if (scales.element_type() != ScaleType(p.weight, type)) {
    return ffi::Error::InvalidArgument("jaxq: b_scales' dtype does not go with the weight type and activations");
  }
  if (p.weight == MarlinType::kMxFp4 && *float_type != FloatType::kBF16) {
    return ffi::Error::InvalidArgument("jaxq: MXFP4 weights take bfloat16 activations");
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
  const bool float_weight =
      p.weight == MarlinType::kFp8E4M3 || p.weight == MarlinType::kNvFp4 || p.weight == MarlinType::kMxFp4;
  if ((p.weight == MarlinType::kU4) != has_zeros || (float_weight && has_g_idx)) {
    return ffi::Error::InvalidArgument("jaxq: zero points go with uint4 weights only, act-order with integer ones");
  }
  if (float_weight && p.weight != MarlinType::kFp8E4M3) {
    const int group = p.weight == MarlinType::kNvFp4 ? 16 : 32;
    if (p.groups * group != p.k || p.per_channel) {
      return ffi::Error::InvalidArgument("jaxq: FP4 b_scales must hold one scale per " + std::to_string(group) +
                                         " rows of K, in the grouped order");
    }
  }
  if (has_global_scale) {
    auto global_scale = optional.get<ffi::AnyBuffer>(next++);
    if (global_scale.has_error()) return global_scale.error();
    if (auto err = ExpectShape("global_scale", *global_scale, ffi::DataType::F32, {}, 0, {1}); err.failure()) {
      return err;
    }
    p.global_scale = static_cast<const float*>(global_scale->untyped_data());
  }
  p.b_q = static_cast<const uint32_t*>(b_q.untyped_data());
  p.scales = scales.untyped_data();
  return ffi::Error::Success();
}

ffi::Error MarlinGemm(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b_q, ffi::AnyBuffer scales,
                      ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out, int32_t b_q_type,
                      bool has_zeros, bool has_g_idx, bool has_bias, bool per_channel, bool batch_invariant,
                      int64_t hopper_from_rows) {
  MarlinParams p;
  p.per_channel = per_channel;
  p.batch_invariant = batch_invariant;
  p.hopper_from_rows = hopper_from_rows;
  size_t next = 0;
  if (auto err = BindWeight(p, "marlin_gemm", b_q_type, a.element_type(), b_q, scales, optional, next, has_zeros,
                            has_g_idx, true, has_bias);
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
  if (auto err = BindWeight(p, "marlin_dequantize", b_q_type, out->element_type(), b_q, scales, optional, next,
                            has_zeros, has_g_idx, false, 0);
      err.failure()) {
    return err;
  }
  if (auto err = ExpectShape("out", *out, out->element_type(), {}, 0, {p.k, p.n}); err.failure()) return err;
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
                                  .Attr<bool>("batch_invariant")
                                  .Attr<int64_t>("hopper_from_rows"),
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
