// Per-token-group 8-bit quantization (vLLM's per_token_group_quant_8bit, fp8 e4m3fn or int8 output).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/types.h"

namespace jaxq {

enum class Quant8Type : int32_t { kFp8E4M3 = 0, kInt8 = 1 };

// Where the per-group scales go. x is viewed as [batch, rows, cols]; G = cols / group_size.
enum class ScaleLayout : int32_t {
  kRowMajor = 0,     // float32 [batch, rows, G]
  kColumnMajor = 1,  // float32 [batch, G, padded_rows]; rows >= `rows` are zero
  kPackedUe8m0 = 2,  // int32 [batch, ceil(G/4), padded_rows]: exponent byte of group g at byte g % 4 of
                     // word g / 4; padding bytes and rows are zero
};

struct GroupQuantParams {
  const void* x;
  void* q;       // [batch, rows, cols] of 1-byte values
  void* scales;  // see ScaleLayout
  int64_t batch, rows, cols, group_size;
  int64_t padded_rows;  // column-major and packed layouts only
  float eps;
  bool ue8m0;  // round scales up to powers of two (always on for kPackedUe8m0)
  FloatType in_type;
  Quant8Type out_type;
  ScaleLayout layout;
};

// Group sizes need group_size * sizeof(x) to be a multiple of 16 bytes.
bool GroupQuantSupports(FloatType in_type, int64_t group_size);
cudaError_t LaunchGroupQuant(const GroupQuantParams& p, cudaStream_t stream);

}  // namespace jaxq
