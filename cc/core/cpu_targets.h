// The per-target copies of the CPU kernels (see cpu_kernels_target.cc), and
// the instruction-set targets the dispatcher may choose from.
#pragma once

#include <cstdint>

#include "core/xent_params.h"

namespace fused_xent {
namespace cpu {

#define FX_DECLARE_TARGET_KERNELS(NS)                                                                 \
  namespace NS {                                                                                      \
  template <typename T, typename Label>                                                               \
  void sparse_forward(const SparseForwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end);   \
  template <typename T, typename Label>                                                               \
  void sparse_backward(const SparseBackwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end); \
  template <typename T>                                                                               \
  void dense_forward(const DenseForwardArgs<T>& args, int64_t row_begin, int64_t row_end);            \
  template <typename T>                                                                               \
  void dense_backward(const DenseBackwardArgs<T>& args, int64_t row_begin, int64_t row_end);          \
  int64_t row_granularity(const Layout& layout);                                                      \
  template <typename T> void add_in_place(T* dst, const T* src, int64_t count);                       \
  }

FX_DECLARE_TARGET_KERNELS(baseline)
#if defined(FX_HAVE_AVX2_TARGET)
FX_DECLARE_TARGET_KERNELS(avx2)
#endif
#if defined(FX_HAVE_AVX512_TARGET)
FX_DECLARE_TARGET_KERNELS(avx512)
#endif

#undef FX_DECLARE_TARGET_KERNELS

// Explicit instantiations of the kernels of a namespace, for every
// logits type and label type.
#define FX_INSTANTIATE_KERNELS_FOR(T)                                                                 \
  template void sparse_forward<T, int32_t>(const SparseForwardArgs<T, int32_t>&, int64_t, int64_t);   \
  template void sparse_forward<T, int64_t>(const SparseForwardArgs<T, int64_t>&, int64_t, int64_t);   \
  template void sparse_backward<T, int32_t>(const SparseBackwardArgs<T, int32_t>&, int64_t, int64_t); \
  template void sparse_backward<T, int64_t>(const SparseBackwardArgs<T, int64_t>&, int64_t, int64_t); \
  template void dense_forward<T>(const DenseForwardArgs<T>&, int64_t, int64_t);                       \
  template void dense_backward<T>(const DenseBackwardArgs<T>&, int64_t, int64_t);                     \
  template void add_in_place<T>(T*, const T*, int64_t);
#define FX_INSTANTIATE_KERNELS          \
  FX_INSTANTIATE_KERNELS_FOR(float)     \
  FX_INSTANTIATE_KERNELS_FOR(double)    \
  FX_INSTANTIATE_KERNELS_FOR(float16_t) \
  FX_INSTANTIATE_KERNELS_FOR(bfloat16_t)

enum class Target { kBaseline, kAvx2, kAvx512 };

// The target used on this machine: the best one the CPU supports, unless the
// environment variable FUSED_XENT_SIMD (baseline, avx2, avx512) asks for a
// lower one.
Target active_target();
const char* target_name(Target target);

}  // namespace cpu
}  // namespace fused_xent
