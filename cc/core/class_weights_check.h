// Class weight values: a NaN, infinite or negative weight would silently turn
// its rows' loss into NaN or reward the wrong class, so every caller that can
// read the weights on the host (TF CPU kernels, XLA CPU handlers, the NumPy
// module) refuses them with the same message. On a GPU they are device memory
// and are not read.
#pragma once

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

namespace fused_xent {

// Index of the first weight that is NaN, infinite or negative, or -1.
inline int64_t find_bad_class_weight(const float* weights, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float w = weights[i];
    if (!(w >= 0.0f && w <= std::numeric_limits<float>::max())) return i;  // NaN fails both
  }
  return -1;
}

inline std::string bad_class_weight_message(const float* weights, int64_t index) {
  char value[32];
  std::snprintf(value, sizeof(value), "%g", static_cast<double>(weights[index]));
  return "class_weights must be finite and >= 0, got " + std::string(value) + " for class " +
         std::to_string(index);
}

}  // namespace fused_xent
