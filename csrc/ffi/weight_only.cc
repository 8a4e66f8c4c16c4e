// XLA FFI handlers for the AWQ / GPTQ weight-only ops: bind buffers, re-check shapes against the format,
// launch.
#include "ffi/weight_only.h"

#include <string>

#include "ffi/common.h"
#include "kernels/marlin.h"
#include "kernels/weight_only.h"

namespace ffi = xla::ffi;
using namespace jaxq::ffi_util;

namespace jaxq {
namespace {

// Fills the weight part of `p` from the packed tensors; k and n come from their shapes.
ffi::Error BindWeights(WeightOnlyParams& p, int32_t format, int32_t bits, int32_t zero_offset,
                       const ffi::AnyBuffer& qweight, const ffi::AnyBuffer& qzeros, const ffi::AnyBuffer& scales) {
  if (format < 0 || format > 2 || (bits != 2 && bits != 3 && bits != 4 && bits != 8) ||
      (format == 0 && bits != 4)) {
    return ffi::Error::InvalidArgument("jaxq: unsupported weight format " + std::to_string(format) + " / bits " +
                                       std::to_string(bits));
  }
  const auto type = ToFloatType(scales.element_type());
  if (!type || *type == FloatType::kF32) return ffi::Error::InvalidArgument("jaxq: scales must be float16 or bfloat16");
  auto q = qweight.dimensions(), z = qzeros.dimensions(), s = scales.dimensions();
  if (q.size() != 2 || z.size() != 2 || s.size() != 2 || qweight.element_type() != ffi::DataType::S32 ||
      qzeros.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("jaxq: qweight and qzeros must be 2-d int32, scales 2-d");
  }
  p.format = static_cast<WeightFormat>(format);
  p.bits = bits;
  p.zero_offset = zero_offset;
  p.type = *type;
  p.groups = s[0];
  p.n = s[1];
  const bool awq = p.format == WeightFormat::kAwq;
  p.k = awq ? q[0] : q[0] * 32 / bits;
  const bool ok = p.groups > 0 && p.k % p.groups == 0 && p.k % 32 == 0 && z[0] == p.groups &&
                  (awq ? q[1] * 8 == p.n && z[1] * 8 == p.n : q[1] == p.n && z[1] * 32 == p.n * bits);
  if (!ok) {
    return ffi::Error::InvalidArgument("jaxq: qweight " + DimsToString(q) + ", qzeros " + DimsToString(z) +
                                       " and scales " + DimsToString(s) + " do not form a weight");
  }
  p.qweight = static_cast<const uint32_t*>(qweight.untyped_data());
  p.qzeros = static_cast<const uint32_t*>(qzeros.untyped_data());
  p.scales = scales.untyped_data();
  return ffi::Error::Success();
}

// A 4-bit AWQ weight, or GPTQ's in exllama's layout, on marlin_gemm's Hopper kernel (the rows gptq_gemm and
// awq_gemm give it).
ffi::Error WeightOnlyGemmHopper(cudaStream_t stream, const WeightOnlyParams& w) {
  MarlinParams p;
  p.type = w.type;
  p.weight = MarlinType::kU4;
  p.layout = w.format == WeightFormat::kAwq ? WeightLayout::kAwq : WeightLayout::kGptqExllama;
  p.zero_offset = w.zero_offset;
  p.a = w.x;
  p.b_q = w.qweight;
  p.scales = w.scales;
  p.zeros = w.qzeros;
  p.out = w.out;
  p.m = w.m;
  p.k = static_cast<int>(w.k);
  p.n = static_cast<int>(w.n);
  p.groups = static_cast<int>(w.groups);
  if (w.format == WeightFormat::kGptq || w.bits != 4 || !MarlinHopperSupports(p)) {
    return ffi::Error::InvalidArgument("jaxq: the Hopper kernel does not take this weight");
  }
  return FromCuda(LaunchMarlinGemmHopper(p, stream), "weight-only GEMM (Hopper kernel) launch");
}

ffi::Error WeightOnlyGemm(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer qweight, ffi::AnyBuffer qzeros,
                          ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::U32>> workspace, int32_t format, int32_t bits,
                          int32_t zero_offset, int64_t hopper_from_rows) {
  WeightOnlyParams p;
  if (auto err = BindWeights(p, format, bits, zero_offset, qweight, qzeros, scales); err.failure()) return err;
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != p.k || x.element_type() != scales.element_type()) {
    return ffi::Error::InvalidArgument("jaxq: x " + DimsToString(xd) + " must be [M, K] in the scales' dtype");
  }
  p.m = xd[0];
  if (auto err = ExpectShape("out", *out, x.element_type(), {}, 0, {p.m, p.n}); err.failure()) return err;
  if (hopper_from_rows > 0 && p.m >= hopper_from_rows) {
    p.x = x.untyped_data();
    p.out = out->untyped_data();
    PoisonIfRequested(stream, p.out, out->size_bytes());
    return WeightOnlyGemmHopper(stream, p);
  }
  if (!WeightOnlyGemmSupports(p)) return ffi::Error::InvalidArgument("jaxq: the GEMM kernel does not tile this weight");
  // The split is chosen in Python (jaxq/ops/_weight_only.py) and sized into the workspace.
  const int64_t words = static_cast<int64_t>(workspace->element_count());
  const int64_t counters = WeightOnlyWorkspaceWords(p.m, p.n, 1);
  const int64_t partials = words - counters;
  const int split_k = partials > 0 && p.m * p.n > 0 ? static_cast<int>(partials / (p.m * p.n)) : 1;
  if (partials < 0 || (split_k > 1 && WeightOnlyWorkspaceWords(p.m, p.n, split_k) != words) || split_k == 0) {
    return ffi::Error::InvalidArgument("jaxq: workspace size does not match a K split");
  }
  p.x = x.untyped_data();
  p.out = out->untyped_data();
  p.workspace = workspace->typed_data();
  PoisonIfRequested(stream, p.out, out->size_bytes());
  return FromCuda(LaunchWeightOnlyGemm(p, split_k, stream), "weight-only GEMM launch");
}

ffi::Error Dequantize(cudaStream_t stream, WeightOnlyParams& p, ffi::Result<ffi::AnyBuffer>& out) {
  if (auto err = ExpectShape("out", *out, out->element_type(), {}, 0, {p.k, p.n}); err.failure()) return err;
  p.out = out->untyped_data();
  PoisonIfRequested(stream, p.out, out->size_bytes());
  return FromCuda(LaunchWeightDequantize(p, stream), "weight dequantization launch");
}

ffi::Error WeightDequantize(cudaStream_t stream, ffi::AnyBuffer qweight, ffi::AnyBuffer qzeros, ffi::AnyBuffer scales,
                            ffi::Result<ffi::AnyBuffer> out, int32_t format, int32_t bits, int32_t zero_offset) {
  WeightOnlyParams p;
  if (auto err = BindWeights(p, format, bits, zero_offset, qweight, qzeros, scales); err.failure()) return err;
  return Dequantize(stream, p, out);
}

ffi::Error WeightDequantizeGIdx(cudaStream_t stream, ffi::AnyBuffer qweight, ffi::AnyBuffer qzeros,
                                ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> g_idx, ffi::Result<ffi::AnyBuffer> out,
                                int32_t format, int32_t bits, int32_t zero_offset, bool act_order) {
  WeightOnlyParams p;
  if (auto err = BindWeights(p, format, bits, zero_offset, qweight, qzeros, scales); err.failure()) return err;
  if (g_idx.element_count() != static_cast<size_t>(p.k)) return ffi::Error::InvalidArgument("jaxq: g_idx must have K entries");
  // Act-order group indices come from the checkpoint: the kernel trusts them to be < groups.
  p.g_idx = act_order ? g_idx.typed_data() : nullptr;
  return Dequantize(stream, p, out);
}

}  // namespace
}  // namespace jaxq

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqWeightOnlyGemm, jaxq::WeightOnlyGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Attr<int32_t>("format")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("zero_offset")
                                  .Attr<int64_t>("hopper_from_rows"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqWeightDequantize, jaxq::WeightDequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("format")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("zero_offset"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqWeightDequantizeGIdx, jaxq::WeightDequantizeGIdx,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("format")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("zero_offset")
                                  .Attr<bool>("act_order"),
                              {ffi::Traits::kCmdBufferCompatible});
