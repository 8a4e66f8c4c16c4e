#pragma once
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqWeightOnlyGemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqWeightDequantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqWeightDequantizeGIdx);
