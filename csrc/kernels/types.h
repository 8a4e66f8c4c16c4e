// Plain types shared by the kernels' launch interfaces; no XLA, no Python.
#pragma once
#include <cstdint>

namespace jaxq {

enum class FloatType : int32_t { kF16 = 0, kBF16 = 1, kF32 = 2 };

inline int ByteWidth(FloatType t) { return t == FloatType::kF32 ? 4 : 2; }

}  // namespace jaxq
