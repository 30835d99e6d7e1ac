#include "core/simd_level.h"

namespace fused_xent {

// The kernels are plain C++ compiled for the baseline target; the compiler
// vectorizes what it can for that target.
const char* simd_level() {
#if defined(__AVX512F__)
  return "avx512 (compile-time)";
#elif defined(__AVX2__)
  return "avx2 (compile-time)";
#elif defined(__SSE2__)
  return "sse2 (baseline)";
#elif defined(__ARM_NEON)
  return "neon (baseline)";
#else
  return "scalar";
#endif
}

}  // namespace fused_xent
