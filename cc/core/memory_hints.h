#pragma once

#include <cstddef>

namespace fused_xent {

// The size of a transparent huge page on x86-64 and most ARM64 Linux kernels.
constexpr size_t kHugePageBytes = size_t{2} << 20;

// Asks the OS to back [data, data + bytes) with transparent huge pages (Linux
// madvise; a no-op elsewhere or for small buffers). A freshly allocated
// gradient of 100+ MB otherwise costs tens of thousands of 4 KiB page faults,
// which take longer than the kernel that fills it. FUSED_XENT_HUGE_PAGES=0
// (read at each call) turns the hint off, for measurements.
void advise_huge_pages(void* data, size_t bytes);

}  // namespace fused_xent
