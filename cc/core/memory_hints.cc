#include "core/memory_hints.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_xent {

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = kHugePageBytes;
  if (bytes < 2 * kHugePage) return;
  const char* off = std::getenv("FUSED_XENT_HUGE_PAGES");  // "0": no hint (to measure what it saves)
  if (off != nullptr && std::strcmp(off, "0") == 0) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors are harmless
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fused_xent
