// The SM count the sm90 scaled GEMMs and the weight-only GEMM launch for, in a translation unit of its own so
// that tools linking only some instantiations (tools/scaled_mm_sweep) share it.
#include "kernels/sm_count.h"

#include <cuda_runtime.h>

namespace jaxq {

// CUTLASS would query the SM count on every launch; it never changes for a device.
int CachedSmCount(int device) {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count;
  }
  if (counts[device] == 0) cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
  return counts[device];
}

}  // namespace jaxq
