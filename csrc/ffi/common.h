// Helpers shared by the XLA FFI handlers: dtype mapping, shape checks, optional output poisoning.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "kernels/types.h"
#include "xla/ffi/api/ffi.h"

namespace jaxq::ffi_util {

namespace ffi = xla::ffi;

inline std::optional<FloatType> ToFloatType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return FloatType::kF16;
    case ffi::DataType::BF16: return FloatType::kBF16;
    case ffi::DataType::F32: return FloatType::kF32;
    default: return std::nullopt;
  }
}

inline int64_t Product(ffi::Span<const int64_t> dims, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= dims[i];
  return n;
}

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Checks that `buffer` has dtype `type` and shape `lead` (the first lead_rank dims of another buffer)
// followed by `tail`.
inline ffi::Error ExpectShape(const char* name, const ffi::AnyBuffer& buffer, ffi::DataType type,
                              ffi::Span<const int64_t> lead, size_t lead_rank,
                              std::initializer_list<int64_t> tail) {
  auto dims = buffer.dimensions();
  bool ok = buffer.element_type() == type && dims.size() == lead_rank + tail.size();
  for (size_t i = 0; ok && i < lead_rank; ++i) ok = dims[i] == lead[i];
  size_t i = lead_rank;
  for (int64_t d : tail) ok = ok && dims[i++] == d;
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jaxq: unexpected dtype or shape for ") + name + " " +
                                     DimsToString(dims));
}

// With JAXQ_POISON_OUTPUTS=1 every output is filled with 0xFF bytes before the kernel runs, so tests
// see any element a kernel forgot to write.
inline void PoisonIfRequested(cudaStream_t stream, void* data, size_t bytes) {
  static const bool enabled = [] {
    const char* v = std::getenv("JAXQ_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  if (enabled && bytes > 0) cudaMemsetAsync(data, 0xFF, bytes, stream);
}

inline ffi::Error FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jaxq: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace jaxq::ffi_util
