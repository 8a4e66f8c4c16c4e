// NVFP4 activation quantization (vLLM's scaled_fp4_quant, 128x4 swizzled e4m3 block scales).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/types.h"

namespace jaxq {

struct Nvfp4QuantParams {
  const void* x;               // [batch, rows, cols] fp16 / bf16, cols % 16 == 0
  const float* global_scale;   // [batch]
  uint8_t* q;                  // [batch, rows, cols / 2]: element 2i in the low nibble, 2i+1 in the high
  uint8_t* scales;             // [batch, padded_rows, padded_scale_cols] e4m3 bytes, swizzled
  int64_t batch, rows, cols;
  int64_t padded_rows;         // rows rounded up to 128
  int64_t padded_scale_cols;   // cols / 16 rounded up to 4
  FloatType in_type;
};

cudaError_t LaunchNvfp4Quant(const Nvfp4QuantParams& p, cudaStream_t stream);

}  // namespace jaxq
