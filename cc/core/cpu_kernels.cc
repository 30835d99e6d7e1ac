// Run-time choice among the per-target copies of the CPU kernels.
#include "core/cpu_kernels.h"

#include <cstdlib>
#include <cstring>

#include "core/cpu_targets.h"
#include "core/label_check.h"
#include "core/row_math.h"
#include "core/simd_level.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fused_xent {
namespace cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// F16C from CPUID leaf 1: Clang's __builtin_cpu_supports does not know "f16c".
bool cpu_has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

Target best_supported_target() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(FX_HAVE_AVX512_TARGET)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Target::kAvx512;
#endif
#if defined(FX_HAVE_AVX2_TARGET)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) return Target::kAvx2;
#endif
#endif
  return Target::kBaseline;
}

Target choose_target() {
  const Target best = best_supported_target();
  const char* requested = std::getenv("FUSED_XENT_SIMD");
  if (!requested) return best;
  Target wanted = best;
  if (std::strcmp(requested, "baseline") == 0) wanted = Target::kBaseline;
  if (std::strcmp(requested, "avx2") == 0) wanted = Target::kAvx2;
  if (std::strcmp(requested, "avx512") == 0) wanted = Target::kAvx512;
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;  // never above what the CPU has
}

}  // namespace

Target active_target() {
  static const Target target = choose_target();
  return target;
}

const char* target_name(Target target) {
  switch (target) {
    case Target::kAvx512:
      return "avx512";
    case Target::kAvx2:
      return "avx2";
    default:
      break;
  }
#if defined(__aarch64__)
  return "baseline (neon)";
#elif defined(__x86_64__)
  return "baseline (sse2)";
#else
  return "baseline";
#endif
}

// Calls NAME<TEMPLATE_ARGS>(ARGS...) in the namespace of the active target.
#if defined(FX_HAVE_AVX512_TARGET)
#define FX_CASE_AVX512(CALL) \
  case Target::kAvx512:      \
    return avx512::CALL;
#else
#define FX_CASE_AVX512(CALL)
#endif
#if defined(FX_HAVE_AVX2_TARGET)
#define FX_CASE_AVX2(CALL) \
  case Target::kAvx2:      \
    return avx2::CALL;
#else
#define FX_CASE_AVX2(CALL)
#endif
#define FX_DISPATCH(CALL)    \
  switch (active_target()) { \
    FX_CASE_AVX512(CALL)     \
    FX_CASE_AVX2(CALL)       \
    default:                 \
      return baseline::CALL; \
  }

template <typename T, typename Label>
void sparse_forward(const SparseForwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  FX_DISPATCH(sparse_forward(args, row_begin, row_end))
}

template <typename T, typename Label>
void sparse_backward(const SparseBackwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  FX_DISPATCH(sparse_backward(args, row_begin, row_end))
}

template <typename T>
void dense_forward(const DenseForwardArgs<T>& args, int64_t row_begin, int64_t row_end) {
  FX_DISPATCH(dense_forward(args, row_begin, row_end))
}

template <typename T>
void dense_backward(const DenseBackwardArgs<T>& args, int64_t row_begin,
                    int64_t row_end){FX_DISPATCH(dense_backward(args, row_begin, row_end))}

int64_t row_granularity(const Layout& layout) {
  FX_DISPATCH(row_granularity(layout))
}

template <typename T> void add_in_place(T* dst, const T* src, int64_t count) {
  FX_DISPATCH(add_in_place(dst, src, count))
}

template <typename Label>
int64_t find_invalid_label(const Label* labels, int64_t count, int64_t classes, const Options& options) {
  for (int64_t i = 0; i < count; ++i) {
    if (classify_label(labels[i], classes, options) == LabelKind::kOutOfRange) return i;
  }
  return -1;
}

FX_INSTANTIATE_KERNELS

template int64_t find_invalid_label<int32_t>(const int32_t*, int64_t, int64_t, const Options&);
template int64_t find_invalid_label<int64_t>(const int64_t*, int64_t, int64_t, const Options&);

}  // namespace cpu

const char* simd_level() { return cpu::target_name(cpu::active_target()); }

std::string invalid_label_message(int64_t value, int64_t classes, const Options& options) {
  // A vocabulary-parallel shard's labels range over the whole row; its
  // ignore_index is the caller's stand-in, not the user's.
  const bool shard = options.total_classes > 0;
  std::string message = "Received a label value of " + std::to_string(value) +
                        " which is outside the valid range of [0, " +
                        std::to_string(shard ? options.total_classes : classes) + ")";
  if (options.has_ignore_index && !shard)
    message += " and is not ignore_index (" + std::to_string(options.ignore_index) + ")";
  return message;
}

}  // namespace fused_xent
