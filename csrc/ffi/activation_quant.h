#pragma once
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqPerTokenGroupQuant);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqScaledFp4Quant);
