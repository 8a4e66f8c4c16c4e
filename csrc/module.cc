// The Python extension: hands the FFI handler symbols to jaxq._ffi, which registers them with XLA.
#include <nanobind/nanobind.h>

#include "ffi/activation_quant.h"
#include "ffi/marlin.h"
#include "ffi/scaled_mm.h"
#include "ffi/weight_only.h"

namespace nb = nanobind;

namespace {
template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_jaxq_cuda, m) {
  m.def("ffi_targets", []() {
    nb::dict targets;
    targets["jaxq_per_token_group_quant"] = Capsule(JaxqPerTokenGroupQuant);
    targets["jaxq_marlin_dequantize"] = Capsule(JaxqMarlinDequantize);
    targets["jaxq_marlin_gemm"] = Capsule(JaxqMarlinGemm);
    targets["jaxq_scaled_fp4_quant"] = Capsule(JaxqScaledFp4Quant);
    targets["jaxq_scaled_mm"] = Capsule(JaxqScaledMm);
    targets["jaxq_weight_only_gemm"] = Capsule(JaxqWeightOnlyGemm);
    targets["jaxq_weight_dequantize"] = Capsule(JaxqWeightDequantize);
    targets["jaxq_weight_dequantize_g_idx"] = Capsule(JaxqWeightDequantizeGIdx);
    return targets;
  });
}
