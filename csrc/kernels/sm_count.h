// The number of SMs of a device, queried once: kernels that deal work out per SM launch for it.
#pragma once

namespace jaxq {

int CachedSmCount(int device);

}  // namespace jaxq
