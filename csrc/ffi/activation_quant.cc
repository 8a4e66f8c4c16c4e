// XLA FFI handlers for the activation-quantization ops: bind buffers and attributes, re-check what the
// Python layer already validated (cheaply, returning an error instead of crashing), launch.
#include "ffi/activation_quant.h"

#include "ffi/common.h"
#include "kernels/group_quant.h"
#include "kernels/nvfp4_quant.h"

namespace ffi = xla::ffi;
using namespace jaxq::ffi_util;

namespace jaxq {
namespace {

ffi::Error PerTokenGroupQuant(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                              ffi::Result<ffi::AnyBuffer> scales, int64_t group_size, float eps,
                              int32_t scale_layout, bool ue8m0) {
  const auto in_type = ToFloatType(x.element_type());
  if (!in_type) return ffi::Error::InvalidArgument("jaxq: x must be float16, bfloat16 or float32");
  if (!GroupQuantSupports(*in_type, group_size)) {
    return ffi::Error::InvalidArgument("jaxq: group_size * itemsize must be a positive multiple of 16 bytes");
  }
  if (q->element_type() != ffi::DataType::F8E4M3FN && q->element_type() != ffi::DataType::S8) {
    return ffi::Error::InvalidArgument("jaxq: q must be float8_e4m3fn or int8");
  }
  const auto layout = static_cast<ScaleLayout>(scale_layout);
  auto dims = x.dimensions();
  const size_t rank = dims.size();
  const bool row_major = layout == ScaleLayout::kRowMajor;
  if (rank < (row_major ? 1u : 2u) || dims[rank - 1] % group_size != 0) {
    return ffi::Error::InvalidArgument("jaxq: x " + DimsToString(dims) + " does not fit group_size " +
                                       std::to_string(group_size));
  }
  GroupQuantParams p{};
  p.cols = dims[rank - 1];
  p.rows = row_major ? Product(dims, 0, rank - 1) : dims[rank - 2];
  p.batch = row_major ? 1 : Product(dims, 0, rank - 2);
  p.group_size = group_size;
  const int64_t groups = p.cols / group_size;
  if (q->dimensions().size() != rank || Product(q->dimensions(), 0, rank) != Product(dims, 0, rank)) {
    return ffi::Error::InvalidArgument("jaxq: q shape " + DimsToString(q->dimensions()) + " != x shape");
  }
  const size_t lead = row_major ? rank - 1 : rank - 2;
  ffi::Error shape_ok = ffi::Error::Success();
  if (row_major) {
    shape_ok = ExpectShape("scales", *scales, ffi::DataType::F32, dims, lead, {groups});
  } else {
    p.padded_rows = scales->dimensions().back();
    if (p.padded_rows < p.rows) return ffi::Error::InvalidArgument("jaxq: scales have fewer rows than x");
    if (layout == ScaleLayout::kColumnMajor) {
      shape_ok = ExpectShape("scales", *scales, ffi::DataType::F32, dims, lead, {groups, p.padded_rows});
    } else {
      shape_ok = ExpectShape("scales", *scales, ffi::DataType::S32, dims, lead, {(groups + 3) / 4, p.padded_rows});
    }
  }
  if (shape_ok.failure()) return shape_ok;

  p.x = x.untyped_data();
  p.q = q->untyped_data();
  p.scales = scales->untyped_data();
  p.eps = eps;
  p.ue8m0 = ue8m0;
  p.in_type = *in_type;
  p.out_type = q->element_type() == ffi::DataType::S8 ? Quant8Type::kInt8 : Quant8Type::kFp8E4M3;
  p.layout = layout;
  PoisonIfRequested(stream, p.q, q->size_bytes());
  PoisonIfRequested(stream, p.scales, scales->size_bytes());
  return FromCuda(LaunchGroupQuant(p, stream), "per_token_group_quant launch");
}

ffi::Error ScaledFp4Quant(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> global_scale,
                          ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scales) {
  const auto in_type = ToFloatType(x.element_type());
  if (!in_type || *in_type == FloatType::kF32) {
    return ffi::Error::InvalidArgument("jaxq: scaled_fp4_quant needs float16 or bfloat16 x");
  }
  auto dims = x.dimensions();
  const size_t rank = dims.size();
  if (rank < 2 || dims[rank - 1] % 16 != 0) {
    return ffi::Error::InvalidArgument("jaxq: scaled_fp4_quant x " + DimsToString(dims) +
                                       " must be [..., M, K] with K % 16 == 0");
  }
  Nvfp4QuantParams p{};
  p.batch = Product(dims, 0, rank - 2);
  p.rows = dims[rank - 2];
  p.cols = dims[rank - 1];
  p.padded_rows = (p.rows + 127) / 128 * 128;
  p.padded_scale_cols = (p.cols / 16 + 3) / 4 * 4;
  for (auto check : {ExpectShape("q", *q, ffi::DataType::U8, dims, rank - 2, {p.rows, p.cols / 2}),
                     ExpectShape("scales", *scales, ffi::DataType::F8E4M3FN, dims, rank - 2,
                                 {p.padded_rows, p.padded_scale_cols})}) {
    if (check.failure()) return check;
  }
  if (global_scale.element_count() != static_cast<size_t>(p.batch)) {
    return ffi::Error::InvalidArgument("jaxq: global_scale needs one value per batch entry");
  }
  p.x = x.untyped_data();
  p.global_scale = global_scale.typed_data();
  p.q = static_cast<uint8_t*>(q->untyped_data());
  p.scales = static_cast<uint8_t*>(scales->untyped_data());
  p.in_type = *in_type;
  PoisonIfRequested(stream, p.q, q->size_bytes());
  PoisonIfRequested(stream, p.scales, scales->size_bytes());
  return FromCuda(LaunchNvfp4Quant(p, stream), "scaled_fp4_quant launch");
}

}  // namespace
}  // namespace jaxq

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqPerTokenGroupQuant, jaxq::PerTokenGroupQuant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group_size")
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("scale_layout")
                                  .Attr<bool>("ue8m0"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxqScaledFp4Quant, jaxq::ScaledFp4Quant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
