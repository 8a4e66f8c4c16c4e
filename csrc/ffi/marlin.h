#pragma once
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqMarlinGemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxqMarlinDequantize);
