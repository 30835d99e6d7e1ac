// Sparse labels outside [0, C): every caller (TF kernels, XLA FFI handlers,
// the NumPy module) reports the first one with the same message. The kernels
// themselves give such a row NaN without reading at the label, so callers can
// check in parallel shards while the rows are computed and fail afterwards.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>

#include "core/cpu_kernels.h"

namespace fused_xent {

// "Received a label value of V which is outside the valid range of [0, C)",
// naming ignore_index when one is set (C: the whole row's classes for a shard).
std::string invalid_label_message(int64_t value, int64_t classes, const Options& options);

// The lowest row with an invalid label among shards checked concurrently.
class FirstInvalidLabel {
 public:
  template <typename Label>
  void check(const Label* labels, int64_t begin, int64_t end, int64_t classes, const Options& options) {
    const int64_t bad = cpu::find_invalid_label(labels + begin, end - begin, classes, options);
    if (bad < 0) return;
    int64_t seen = row_.load();
    while (begin + bad < seen && !row_.compare_exchange_weak(seen, begin + bad)) {
    }
  }

  bool found() const { return row_.load() != kNone; }
  int64_t row() const { return row_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> row_{kNone};
};

}  // namespace fused_xent
