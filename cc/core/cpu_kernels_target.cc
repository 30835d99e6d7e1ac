// The CPU kernels, compiled once per instruction-set target: CMake builds this
// file with FX_TARGET_NS (the namespace) and FX_LANES (floats per vector) set,
// plus the target's -m flags. cpu_kernels.cc picks one target at run time.
#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#ifndef FX_TARGET_NS
#define FX_TARGET_NS baseline
#endif

#include "core/cpu_targets.h"
#include "core/row_math.h"
#include "core/simd_vec.h"

namespace fused_xent {
namespace cpu {
namespace FX_TARGET_NS {
namespace {

namespace v = ::fused_xent::simd::FX_TARGET_NS;

template <typename T> constexpr bool kVectorized = std::is_same<Acc<T>, float>::value;

// bfloat16 rows are converted two vectors at a time where that saves work.
template <typename T> constexpr bool kPaired = std::is_same<T, bfloat16_t>::value && v::kPairsReorder;

// Rows are read in blocks small enough for L1 (8 KB of float), so that a block
// that must be read twice is read again from there, and large enough that the
// per-block reductions and merges cost little (the forward ran 12-20% faster
// than with blocks of 512).
constexpr int64_t kBlock = 2048;

// Streaming loops ask for the line kPrefetchBytes ahead, once per cache line:
// with the exponentials between loads, the hardware prefetcher alone leaves
// the loops 10-25% short of what they reach with it.
constexpr int64_t kPrefetchBytes = 4096;

// At element k of a loop over p that advances `step` elements at a time (at
// most a cache line): asks for the line `distance` bytes ahead, once per cache
// line whatever p's alignment, into L1 (kLocality 0) or L2 (kLocality 2).
template <int kLocality = 0, typename T>
FX_ALWAYS_INLINE void prefetch_ahead(const T* p, int64_t k, int64_t distance = kPrefetchBytes,
                                     int64_t step = v::kLanes) {
  const char* at = reinterpret_cast<const char*>(p + k);
  if (reinterpret_cast<uintptr_t>(at) % 64 < static_cast<uintptr_t>(step) * sizeof(T))
    __builtin_prefetch(at + distance, 0, kLocality);
}

// A row of the logits (or dense labels) tensor: `count` elements `stride` apart.
template <typename T> struct Row {
  const T* data;
  int64_t count;
  int64_t stride;
  Acc<T> operator[](int64_t j) const { return load_acc(data[j * stride]); }
};

template <typename T> Row<T> row_of(const T* base, const Layout& layout, int64_t row) {
  return Row<T>{base + layout.row_offset(row), layout.classes, layout.inner};
}

// Converts len contiguous elements to float in `out`, returning their NaN-sticky max.
// float input is not copied (out == nullptr): the block is read again from L1.
template <typename T> float load_block_vectorized(const T* p, int64_t len, float* out) {
  v::vfloat running = v::splat(negative_infinity<float>());
  int64_t k = 0;
  for (; k + v::kLanes <= len; k += v::kLanes) {
    const v::vfloat x = v::load(p + k);
    if (out) v::store(out + k, x);
    running = v::nan_sticky_max(running, x);
  }
  if (k < len) {
    const v::vfloat x = v::load_partial(p + k, len - k, negative_infinity<float>());
    if (out) v::store_partial(out + k, len - k, x);
    running = v::nan_sticky_max(running, x);
  }
  return v::reduce_nan_sticky_max(running);
}

// Where block [start, start + len) of a row is, as accumulator values: the
// row itself for contiguous float, else `buffer` after conversion.
template <typename T>
const Acc<T>* block_values(const Row<T>& row, int64_t start, int64_t len, Acc<T>* buffer, Acc<T>* block_max) {
  if constexpr (std::is_same<T, float>::value) {
    if (row.stride == 1) {
      *block_max = load_block_vectorized(row.data + start, len, static_cast<float*>(nullptr));
      return row.data + start;
    }
  }
  *block_max = load_block(row, start, len, buffer);
  return buffer;
}

// Loads block [start, start + len) into `out` in accumulator precision and
// returns its NaN-sticky max.
template <typename T> Acc<T> load_block(const Row<T>& row, int64_t start, int64_t len, Acc<T>* out) {
  using A = Acc<T>;
  A block_max = negative_infinity<A>();
  if constexpr (kVectorized<T>) {
    if (row.stride == 1) return load_block_vectorized(row.data + start, len, out);
  }
  if (row.stride == 1) {
    const T* p = row.data + start;
    for (int64_t k = 0; k < len; ++k) out[k] = load_acc(p[k]);
  } else {
    for (int64_t k = 0; k < len; ++k) out[k] = row[start + k];
  }
  for (int64_t k = 0; k < len; ++k) block_max = nan_sticky_max(block_max, out[k]);
  return block_max;
}

// Sums of one block (already loaded, with max `block_max`), relative to that max.
template <typename A>
RowSums<A> block_sums(const A* z, const A* labels, int64_t len, A block_max, bool want_mean, A inv_classes) {
  RowSums<A> sums;
  sums.max = block_max;
  const bool all_negative_infinity = block_max == negative_infinity<A>();
  if (want_mean) {
    sums.count = static_cast<A>(len) * inv_classes;
    A gap = 0;
    if (!all_negative_infinity)
      for (int64_t k = 0; k < len; ++k) gap += block_max - z[k];
    sums.gap = all_negative_infinity ? std::numeric_limits<A>::infinity() : gap * inv_classes;
  }
  if (labels) {
    double label_sum = 0;
    A label_gap = 0;
    for (int64_t k = 0; k < len; ++k) {
      // In an all -inf block, block_max - z[k] would be -inf - -inf: the gap is +inf, as in the float path.
      const A gap = all_negative_infinity ? std::numeric_limits<A>::infinity() : block_max - z[k];
      label_sum += labels[k];
      label_gap += labels[k] != 0 ? labels[k] * gap : A(0);
    }
    sums.label_sum = label_sum;
    sums.label_gap = label_gap;
  }
  if (!all_negative_infinity) {
    A ties = 0, rest = 0;
    for (int64_t k = 0; k < len; ++k) {
      const A d = z[k] - block_max;
      if (d == 0) {
        ties += 1;
      } else {
        rest += fx_exp(d);
      }
    }
    sums.ties = ties;
    sums.rest = rest;
  }
  return sums;
}

// The float version of block_sums, on vectors, specialised on which sums are
// wanted, with the terms taken relative to `ref`; reads T (converting 16-bit
// types in registers). Without kTrackMax, ref is an element's value (the
// block's max, or the row's) and terms equal to it are counted as ties. With
// kTrackMax, ref is the max of earlier elements and every term goes to rest
// (the caller reads the block again if it holds ref itself); the block's max
// comes back in *block_max (NaN handling unspecified: a NaN reaches rest anyway).
// Padding lanes use values that add nothing: z = -inf for exp and max, z = ref
// for the gaps, t = 0 for labels. Terms at ref itself count as ties.
template <bool kWantMean, bool kLabels, bool kTrackMax, typename T>
RowSums<float> block_sums_vectorized(const T* z, const T* labels, int64_t len, float ref, float inv_classes,
                                     float* block_max = nullptr) {
  RowSums<float> sums;
  sums.max = ref;
  const v::vfloat ref_v = v::splat(ref);
  v::vfloat top = v::splat(negative_infinity<float>());
  // Per-lane sums. gap and label_gap accumulate the negated terms, sum(z - ref)
  // and sum t (z - ref), sharing z - ref with the exponential.
  struct Lanes {
    v::vfloat rest = v::splat(0.0f), ties = v::splat(0.0f), gap = v::splat(0.0f), label_sum = v::splat(0.0f),
              label_gap = v::splat(0.0f);
  };
  Lanes total, part;
  double label_sum = 0;  // float lanes would lose 1e-6 of sum(t) over 1e5 classes
  auto accumulate = [&](v::vfloat x, v::vfloat x_for_gap, v::vfloat t) {
    if (kTrackMax) top = v::max_fast(top, x);
    const v::vfloat shifted = x - ref_v;
    const v::vfloat e = v::exp_bounded(shifted);
    if (kTrackMax) {
      part.rest += e;
    } else {
      part.rest += shifted == 0.0f ? 0.0f : e;  // vector ?: becomes a masked add
      part.ties += shifted == 0.0f ? 1.0f : 0.0f;
    }
    const v::vfloat d = x_for_gap - ref_v;
    if (kWantMean) part.gap += d;
    if (kLabels) {
      part.label_sum += t;
      part.label_gap += t * v::select(t != 0.0f, d, v::splat(0.0f));  // t = 0 adds 0 even where z = -inf
    }
  };
  // Rounding error grows with the terms each lane adds in sequence: the lanes'
  // sums are folded into the block's every 64 vectors.
  auto fold = [&] {
    total.rest += part.rest;
    total.ties += part.ties;
    if (kWantMean) total.gap += part.gap;
    if (kLabels) {
      label_sum += v::reduce_add(part.label_sum);
      total.label_gap += part.label_gap;
    }
    part = Lanes{};
  };
  constexpr int64_t kChunk = 64 * v::kLanes;
  const int64_t full = len - len % v::kLanes;
  for (int64_t chunk = 0; chunk < full; chunk += kChunk) {
    const int64_t chunk_end = std::min(full, chunk + kChunk);
    int64_t k = chunk;
    if constexpr (kPaired<T>) {
      for (; k + 2 * v::kLanes <= chunk_end; k += 2 * v::kLanes) {
        prefetch_ahead(z, k, kPrefetchBytes, 2 * v::kLanes);
        if (kLabels) prefetch_ahead(labels, k, kPrefetchBytes, 2 * v::kLanes);
        v::vfloat x0, x1, t0 = v::splat(0.0f), t1 = v::splat(0.0f);
        v::load_pair(z + k, &x0, &x1);
        if (kLabels) v::load_pair(labels + k, &t0, &t1);
        accumulate(x0, x0, t0);
        accumulate(x1, x1, t1);
      }
    }
    for (; k < chunk_end; k += v::kLanes) {
      prefetch_ahead(z, k);
      if (kLabels) prefetch_ahead(labels, k);
      const v::vfloat x = v::load(z + k);
      accumulate(x, x, kLabels ? v::load(labels + k) : v::splat(0.0f));
    }
    fold();
  }
  if (full < len) {
    const int64_t n = len - full;
    const v::vfloat x = v::load_partial(z + full, n, negative_infinity<float>());
    accumulate(x, kWantMean || kLabels ? v::load_partial(z + full, n, ref) : x,
               kLabels ? v::load_partial(labels + full, n, 0.0f) : v::splat(0.0f));
    fold();
  }
  if (kTrackMax) *block_max = v::reduce_nan_sticky_max(top);
  sums.rest = v::reduce_add(total.rest);
  sums.ties = v::reduce_add(total.ties);
  if (kWantMean) {
    sums.count = static_cast<float>(len) * inv_classes;
    sums.gap = -v::reduce_add(total.gap) * inv_classes;
  }
  if (kLabels) {
    sums.label_sum = label_sum;
    sums.label_gap = -v::reduce_add(total.label_gap);
  }
  return sums;
}

// block_sums_vectorized with its options chosen at run time.
template <bool kTrackMax, typename T>
RowSums<float> block_sums_dispatch(const T* z, const T* labels, int64_t len, float ref, bool want_mean,
                                   float inv_classes, float* block_max = nullptr) {
  if (labels) {
    return want_mean
               ? block_sums_vectorized<true, true, kTrackMax>(z, labels, len, ref, inv_classes, block_max)
               : block_sums_vectorized<false, true, kTrackMax>(z, labels, len, ref, inv_classes, block_max);
  }
  return want_mean
             ? block_sums_vectorized<true, false, kTrackMax>(z, labels, len, ref, inv_classes, block_max)
             : block_sums_vectorized<false, false, kTrackMax>(z, labels, len, ref, inv_classes, block_max);
}

// Sums of a loaded float block relative to its own max.
RowSums<float> block_sums(const float* z, const float* labels, int64_t len, float block_max, bool want_mean,
                          float inv_classes) {
  if (block_max == negative_infinity<float>()) {  // all -inf: gaps are +inf where they count
    RowSums<float> sums;
    if (want_mean) {
      sums.count = static_cast<float>(len) * inv_classes;
      sums.gap = std::numeric_limits<float>::infinity();
    }
    for (int64_t k = 0; labels && k < len; ++k) {
      sums.label_sum += labels[k];
      if (labels[k] != 0) sums.label_gap += labels[k] * std::numeric_limits<float>::infinity();
    }
    return sums;
  }
  return block_sums_dispatch<false>(z, labels, len, block_max, want_mean, inv_classes);
}

// Blocks after the first are read once: their terms are taken relative to the
// running max m of the blocks before, and the block's own max is found in the
// same loop, so memory streams while the exponentials are computed. Terms
// above 1 are harmless while the block's max stays within kMaxExcess of m
// (kBlock * e^64 is far inside float's range); a block that rises further, or
// whose max is NaN or +inf, returns false and is read again the two-pass way.
constexpr float kMaxExcess = 64.0f;

// The block where the row's max last rose on the one-read path: its terms were
// taken relative to the max before it, so the new max's own term sits in its
// rest, not exactly 1. Its sums wait apart until the row ends (finish_rising).
struct RisingBlock {
  RowSums<float> sums;
  int64_t start = 0;
  int64_t len = 0;  // 0: none
};

template <typename T> bool read_block_once(const Row<T>& row, const Row<T>* labels, int64_t start,
                                           int64_t len, bool want_mean, float inv_classes,
                                           RowSums<float>* sums, RisingBlock* rising) {
  const float ref = sums->max;
  if (!(ref > negative_infinity<float>() && ref < std::numeric_limits<float>::infinity())) return false;
  float top;
  const T* z = row.data + start;
  const T* t = labels ? labels->data + start : nullptr;
  RowSums<float> block = block_sums_dispatch<true>(z, t, len, ref, want_mean, inv_classes, &top);
  if (!(top <= ref + kMaxExcess)) return false;
  if (top == ref)
    block = block_sums_dispatch<false>(z, t, len, ref, want_mean, inv_classes);  // ties apart; from L1
  if (!(top > ref)) {
    merge_sums(*sums, block);  // same max: plain sums
    return true;
  }
  if (rising->len) merge_sums(*sums, rising->sums);  // no longer the max's block: its terms are all < max
  RowSums<float> rebase;                             // moves the reference up to the new max
  rebase.max = top;
  merge_sums(*sums, rebase);
  *rising = RisingBlock{block, start, len};
  return true;
}

// Merges the rising block's sums; where they hold the row's only max term and
// that max dominates (sum < 2, p_max > 1/2: a confidently right row's loss
// below log 2), the block is read again relative to the max, its ties apart,
// so that log1p keeps the small loss exact.
template <typename T> void finish_rising(const Row<T>& row, const Row<T>* labels, bool want_mean,
                                         float inv_classes, const RisingBlock& rising, RowSums<float>* sums) {
  RowSums<float> all = *sums;
  merge_sums(all, rising.sums);
  if (!(all.ties == 0 && all.rest < 2.0f)) {
    *sums = all;
    return;
  }
  merge_sums(*sums, block_sums_dispatch<false>(row.data + rising.start,
                                               labels ? labels->data + rising.start : nullptr, rising.len,
                                               sums->max, want_mean, inv_classes));
}

// Max of the first vector of a contiguous row (of its first len elements if fewer).
template <typename T> float leading_max(const T* p, int64_t len) {
  const v::vfloat x = len >= v::kLanes ? v::load(p) : v::load_partial(p, len, negative_infinity<float>());
  return v::reduce_nan_sticky_max(x);
}

// One read of a row of logits (and of dense labels when given), block by block.
template <typename T>
RowSums<Acc<T>> scan_row(const Row<T>& row, bool want_mean, const Row<T>* labels = nullptr) {
  using A = Acc<T>;
  A block[kBlock];
  A label_block[kBlock];
  RowSums<A> sums;
  RisingBlock rising;
  const A inv_classes = A(1) / static_cast<A>(row.count);
  for (int64_t start = 0; start < row.count; start += kBlock) {
    const int64_t len = std::min(kBlock, row.count - start);
    if constexpr (kVectorized<T>) {
      if (row.stride == 1) {
        // The first block too is read once, relative to the max of its first
        // vector, whose terms go in first (they hold that max: ties).
        int64_t from = start;
        if (start == 0) {
          sums.max = leading_max(row.data, len);
          from = std::min<int64_t>(len, v::kLanes);
          merge_sums(sums, block_sums_dispatch<false>(row.data, labels ? labels->data : nullptr, from,
                                                      sums.max, want_mean, inv_classes));
        }
        if (from == start + len ||
            read_block_once(row, labels, from, start + len - from, want_mean, inv_classes, &sums, &rising))
          continue;
        if (start == 0) sums = RowSums<A>{};
      }
    }
    A block_max, label_max;
    const A* z = block_values(row, start, len, block, &block_max);
    const A* t = labels ? block_values(*labels, start, len, label_block, &label_max) : nullptr;
    merge_sums(sums, block_sums(z, t, len, block_max, want_mean, inv_classes));
  }
  if constexpr (kVectorized<T>) {
    if (rising.len) finish_rising(row, labels, want_mean, inv_classes, rising, &sums);
  }
  return sums;
}

template <typename A> double sum_of(const A* values, int64_t len) {
  double sum = 0;
  for (int64_t k = 0; k < len; ++k) sum += values[k];
  return sum;
}

// Sum of a contiguous row, straight from memory (16-bit types convert in
// registers): float lanes over 64 vectors at a time, those partial sums in double.
template <typename T> double contiguous_sum(const T* values, int64_t len) {
  constexpr int64_t kChunk = 64 * v::kLanes;
  double total = 0;
  int64_t k = 0;
  while (k + v::kLanes <= len) {
    v::vfloat sum = v::splat(0.0f);
    for (const int64_t chunk_end = std::min(len - len % v::kLanes, k + kChunk); k < chunk_end;
         k += v::kLanes) {
      prefetch_ahead(values, k);
      sum += v::load(values + k);
    }
    total += v::reduce_add(sum);
  }
  if (k < len) total += v::reduce_add(v::load_partial(values + k, len - k, 0.0f));
  return total;
}

template <typename T> Acc<T> label_sum_of(const Row<T>& labels) {
  if constexpr (kVectorized<T>) {
    if (labels.stride == 1) return static_cast<float>(contiguous_sum(labels.data, labels.count));
  }
  using A = Acc<T>;
  A block[kBlock];
  double sum = 0;
  for (int64_t start = 0; start < labels.count; start += kBlock) {
    const int64_t len = std::min(kBlock, labels.count - start);
    A unused_max;
    sum += sum_of(block_values(labels, start, len, block, &unused_max), len);
  }
  return static_cast<A>(sum);
}

// Gradients bigger than this (bytes) bypass the caches on their way to memory.
constexpr int64_t kStreamingBytes = 8 << 20;

template <typename T> bool use_streaming_stores(const Layout& layout) {
  return kVectorized<T> && v::kHaveStreamingStores &&
         layout.rows() * layout.classes * static_cast<int64_t>(sizeof(T)) >= kStreamingBytes;
}

// row_math's gradient_from on vectors: a p - target with p = exp(d), the lanes
// where p > 1/2 (one per row at most, so rarely any) redone the scalar way.
// The lanes of `dominant` by the p > 1/2 branch of gradient_from. Out of line:
// the hot loops, which rarely take it, keep their registers.
[[gnu::noinline, gnu::cold]] v::vfloat dominant_lanes(v::vfloat g, v::vfloat a, v::vfloat target, v::vfloat d,
                                                      v::vint dominant) {
  return v::select(dominant, a * v::expm1_near_zero(d) + (a - target), g);
}

FX_ALWAYS_INLINE v::vfloat gradient_lanes(v::vfloat a, v::vfloat target, v::vfloat d) {
  const v::vfloat p = v::exp_bounded(d);
  const v::vfloat g = a * p - target;
  const v::vint dominant = p > 0.5f;
  return v::any_lane(dominant) ? dominant_lanes(g, a, target, d, dominant) : g;
}

// dz = a * exp(z - lse) - b * t - u on vectors, for contiguous rows; t is read
// from `labels` (dense labels), or is the one-hot of class `target` (sparse
// labels; -1 for none), built in the one vector that holds it so the row is
// written in one sweep (a plain store into a line being streamed would stall).
template <typename T> void write_gradient_vectorized(const T* logits, const T* labels, T* out, int64_t begin,
                                                     int64_t end, const SplitLse<float>& lse, float a,
                                                     float b, float u, bool stream = false,
                                                     int64_t target = -1, const T* next_labels = nullptr) {
  constexpr int64_t kStep = kPaired<T> ? 2 * v::kLanes : v::kLanes;  // elements per loop step
  // The pairs' stores want narrow NaNs: the only other NaNs that could reach
  // them are the row's scalars', made narrow here.
  auto narrow = [](float x) { return kPaired<T> && x != x ? quiet_nan<float>() : x; };
  const v::vfloat hi = v::splat(narrow(lse.hi)), lo = v::splat(narrow(lse.lo)), a_v = v::splat(narrow(a)),
                  b_v = v::splat(narrow(b)), u_v = v::splat(narrow(u));
  // Sparse labels: only the target's own term can cancel (a p_y - b - u with p_y
  // near 1), so only it is checked, once per row; it is written by row_math's
  // formula where its logit is near the lse.
  const float target_logit = target >= 0 ? load_acc(logits[target]) : 0.0f;
  const bool target_by_formula = target >= 0 && (target_logit - lse.hi) - lse.lo > -0.75f;
  const float target_value =
      target_by_formula ? gradient_at(a, b + u, (target_logit - lse.hi) - lse.lo) : 0.0f;
  auto targets = [&](int64_t j, int64_t n) {  // t for elements [j, j + n), n <= kLanes
    if (labels) return n == v::kLanes ? v::load(labels + j) : v::load_partial(labels + j, n, 0.0f);
    const v::vfloat zero = v::splat(0.0f);
    return static_cast<uint64_t>(target - j) < static_cast<uint64_t>(n) ? v::with_lane(zero, target - j, 1.0f)
                                                                        : zero;
  };
  auto gradient = [&](v::vfloat z, v::vfloat t) {
    const v::vfloat d = (z - hi) - lo;
    return labels ? gradient_lanes(a_v, b_v * t + u_v, d) : a_v * v::exp_bounded(d) - (b_v * t + u_v);
  };
  // The target's lane, when elements [j, j + n) hold it and it is written by formula.
  auto set_target = [&](v::vfloat g, int64_t j, int64_t n) {
    if (target_by_formula && static_cast<uint64_t>(target - j) < static_cast<uint64_t>(n))
      return v::with_lane(g, target - j, target_value);
    return g;
  };
  // Up to one vector from j, with plain stores.
  auto write_vector = [&](int64_t j, int64_t n) {
    if (n == v::kLanes) {
      v::store(out + j, set_target(gradient(v::load(logits + j), targets(j, n)), j, n));
    } else {
      v::store_partial(out + j, n,
                       set_target(gradient(v::load_partial(logits + j, n, 0.0f), targets(j, n)), j, n));
    }
  };
  // kStep elements from j.
  auto write_step = [&](int64_t j, bool streaming) {
    if constexpr (kPaired<T>) {
      v::vfloat z0, z1, t0 = v::splat(0.0f), t1 = v::splat(0.0f);
      v::load_pair(logits + j, &z0, &z1);
      int slot = -1;  // the target's lane in (z0, z1), or -1
      if (labels) {
        v::load_pair(labels + j, &t0, &t1);
      } else if (static_cast<uint64_t>(target - j) < static_cast<uint64_t>(kStep)) {
        slot = v::pair_slot(static_cast<int>(target - j));
        if (slot < v::kLanes) {
          t0 = v::with_lane(t0, slot, 1.0f);
        } else {
          t1 = v::with_lane(t1, slot - v::kLanes, 1.0f);
        }
      }
      v::vfloat g0 = gradient(z0, t0), g1 = gradient(z1, t1);
      if (target_by_formula && slot >= 0) {
        if (slot < v::kLanes) {
          g0 = v::with_lane(g0, slot, target_value);
        } else {
          g1 = v::with_lane(g1, slot - v::kLanes, target_value);
        }
      }
      if (streaming) {
        v::store_pair<true>(out + j, g0, g1);
      } else {
        v::store_pair<false>(out + j, g0, g1);
      }
    } else if (streaming) {
      v::store_stream(out + j,
                      set_target(gradient(v::load(logits + j), targets(j, v::kLanes)), j, v::kLanes));
    } else {
      v::store(out + j, set_target(gradient(v::load(logits + j), targets(j, v::kLanes)), j, v::kLanes));
    }
  };
  int64_t j = begin;
  if (stream) {
    // Streaming stores fill whole cache lines only, and the partial lines at
    // either end of the row get plain stores: a line only partly written by
    // streaming stores goes to memory as a partial write, which costs more than
    // a whole line (rows of 1000 classes, which end mid-line, ran 10-19% slower).
    constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
    auto line_offset = [&](int64_t k) {
      return static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + k) / sizeof(T) % kLine);
    };
    const int64_t head_end = std::min(end, j + (line_offset(j) ? kLine - line_offset(j) : 0));
    const int64_t stream_end = std::max(head_end, end - line_offset(end));
    for (; j < head_end; j += v::kLanes) write_vector(j, std::min<int64_t>(v::kLanes, head_end - j));
    j = head_end;
    for (; j < stream_end; j += kStep) {
      prefetch_ahead(logits, j, kPrefetchBytes, kStep);
      if (next_labels) prefetch_ahead<2>(next_labels, j, 0, kStep);
      write_step(j, true);
    }
  }
  for (; j + kStep <= end; j += kStep) write_step(j, false);
  for (; j < end; j += v::kLanes) write_vector(j, std::min<int64_t>(v::kLanes, end - j));
}

template <typename T> void write_softmax_gradient_vectorized(const T* logits, T* out, int64_t begin,
                                                             int64_t end, const SplitLse<float>& lse,
                                                             const BackwardCoefficients<float>& c,
                                                             bool stream) {
  write_gradient_vectorized<T>(logits, nullptr, out, begin, end, lse, c.softmax_scale, 0.0f, c.uniform,
                               stream);
}

// Writes dz_j = c.softmax_scale * exp(z_j - lse) - c.uniform for j in [begin, end).
template <typename T> void write_softmax_gradient(const T* logits, T* out, int64_t stride, int64_t begin,
                                                  int64_t end, const SplitLse<Acc<T>>& lse,
                                                  const BackwardCoefficients<Acc<T>>& c,
                                                  bool stream = false) {
  if constexpr (kVectorized<T>) {
    if (stride == 1) return write_softmax_gradient_vectorized(logits, out, begin, end, lse, c, stream);
  }
  for (int64_t j = begin; j < end; ++j)
    out[j * stride] = store_as<T>(
        gradient_at(c.softmax_scale, c.uniform, log_softmax_at(load_acc(logits[j * stride]), lse)));
}

template <typename T> void fill_row(T* out, int64_t count, int64_t stride, Acc<T> value) {
  const T v = store_as<T>(value);
  for (int64_t j = 0; j < count; ++j) out[j * stride] = v;
}

// Above this |lse|, lse's own float64 rounding (half an ulp, |lse| 2^-54) could
// show in p_j = exp(z_j - lse) at A's precision (float: 2^-28, where float
// logits are 32 apart; double: 2^-27, where p_j would be 1e-8 off; tied maxima
// of 1e17 would each get p = 1). Such rows are summed again in the backward.
template <typename A> constexpr double kRoundedLse = std::is_same<A, double>::value ? 0x1p26 : 0x1p28;

// lse for the backward's p_j = exp((z_j - hi) - lo): the float64 lse split in
// two, or for a row beyond kRoundedLse, its max and log_sum from a new sum.
template <typename T> SplitLse<Acc<T>> backward_lse(const Row<T>& row, double lse) {
  using A = Acc<T>;
  if (!(std::fabs(lse) >= kRoundedLse<A> && std::fabs(lse) < std::numeric_limits<double>::infinity()))
    return split_lse<A>(lse);
  const RowSums<A> sums = scan_row(row, false);
  return SplitLse<A>{sums.max, log_sum(sums)};
}

// Loss and lse of sparse row r from its sums; `row` holds its logits as read (capped or not).
template <typename T, typename Label, typename R>
void finish_sparse_row(const SparseForwardArgs<T, Label>& args, int64_t r, const RowSums<Acc<T>>& sums,
                       Acc<T> log_sum, const R& row) {
  using A = Acc<T>;
  const double lse = lse_of(sums.max, log_sum);
  args.lse[r] = lse;
  const LabelKind kind = classify_label(args.labels[r], args.layout.classes, args.options);
  A loss = 0;
  if (kind == LabelKind::kValid) {
    const int64_t y = static_cast<int64_t>(args.labels[r]);
    loss = sparse_row_loss<A>(sums, log_sum, lse, true, row[y], label_weight(y, args.options), args.options,
                              uniform_share<A>(args.layout.classes, args.options));
  } else if (kind == LabelKind::kAbsent) {
    loss = sparse_row_loss<A>(sums, log_sum, lse, false, A(0), A(1), args.options,
                              uniform_share<A>(args.layout.classes, args.options));
  } else if (kind == LabelKind::kOutOfRange) {
    loss = quiet_nan<A>();
  }
  args.loss[r] = store_as<T>(loss);
}

template <typename T> void finish_dense_row(const DenseForwardArgs<T>& args, int64_t r,
                                            const RowSums<Acc<T>>& sums, Acc<T> log_sum) {
  const double lse = lse_of(sums.max, log_sum);
  args.lse[r] = lse;
  args.loss[r] = store_as<T>(dense_row_loss<Acc<T>>(
      sums, log_sum, lse, args.options, uniform_share<Acc<T>>(args.layout.classes, args.options)));
  if (args.label_sums) args.label_sums[r] = sums.label_sum;
}

#include "core/cpu_row_groups.inc"
#include "core/cpu_inner_tiles.inc"
#include "core/cpu_softcap.inc"

}  // namespace

int64_t row_granularity(const Layout& layout) {
  return uses_row_groups(layout) || uses_inner_tiles(layout) ? v::kLanes : 1;
}

template <typename T, typename Label>
void sparse_forward(const SparseForwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  if (args.options.softcap > 0) return sparse_forward_capped(args, row_begin, row_end);
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const bool want_mean = args.options.label_smoothing > 0;
  if constexpr (kVectorized<T>) {
    if (uses_row_groups(layout) && !args.options.total_classes) {  // shards: rows one by one, below
      row_begin = sparse_forward_groups(args, row_begin, row_end);
      if (row_begin < row_end) sparse_forward_tail(args, row_begin, row_end);
      return;
    }
    if (uses_inner_tiles(layout) && !args.options.total_classes)
      return sparse_forward_tiles(args, row_begin, row_end);
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Row<T> row = row_of(args.logits, layout, r);
    const RowSums<A> sums = scan_row(row, want_mean);
    finish_sparse_row(args, r, sums, log_sum(sums), row);
  }
}

template <typename T, typename Label>
void sparse_backward(const SparseBackwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  if (args.options.softcap > 0) return sparse_backward_capped(args, row_begin, row_end);
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const int64_t classes = layout.classes;
  const int64_t stride = layout.inner;
  if constexpr (kVectorized<T>) {
    if (uses_row_groups(layout) && !args.options.total_classes) {  // shards: rows one by one, below
      row_begin = sparse_backward_groups(args, row_begin, row_end);
      if (row_begin < row_end) sparse_backward_tail(args, row_begin, row_end);
      return;
    }
    if (uses_inner_tiles(layout) && !args.options.total_classes)
      return sparse_backward_tiles(args, row_begin, row_end);
  }
  const bool stream = use_streaming_stores<T>(layout);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t offset = layout.row_offset(r);
    const T* logits = args.logits + offset;
    T* out = args.grad_logits + offset;
    const LabelKind kind = classify_label(args.labels[r], classes, args.options);
    if (kind == LabelKind::kOutOfRange) {
      fill_row(out, classes, stride, quiet_nan<A>());
      continue;
    }
    if (kind == LabelKind::kIgnored) {  // weight 0
      fill_row(out, classes, stride, A(0));
      continue;
    }
    const double lse = args.lse[r];
    const SplitLse<A> split = backward_lse(row_of(args.logits, layout, r), lse);
    const bool absent = kind == LabelKind::kAbsent;  // a shard's row without its target: p_j - eps / C only
    const int64_t y = absent ? -1 : static_cast<int64_t>(args.labels[r]);
    const auto c =
        backward_coefficients<A>(load_acc(args.grad_loss[r]), absent ? A(1) : label_weight(y, args.options),
                                 lse, A(1), row_classes(classes, args.options), args.options);
    if constexpr (kVectorized<T>) {
      if (stride == 1) {
        write_gradient_vectorized<T>(logits, nullptr, out, 0, classes, split, c.softmax_scale, c.target_scale,
                                     c.uniform, stream, y);
        continue;
      }
    }
    if (absent) {
      write_softmax_gradient(logits, out, stride, 0, classes, split, c, stream);
      continue;
    }
    const A d_label = log_softmax_at(load_acc(logits[y * stride]), split);
    write_softmax_gradient(logits, out, stride, 0, y, split, c, stream);
    write_softmax_gradient(logits, out, stride, y + 1, classes, split, c, stream);
    out[y * stride] = store_as<T>(gradient_at(c.softmax_scale, c.target_scale + c.uniform, d_label));
  }
  if (stream) v::stream_fence();
}

template <typename T>
void dense_forward(const DenseForwardArgs<T>& args, int64_t row_begin, int64_t row_end) {
  if (args.options.softcap > 0) return dense_forward_capped(args, row_begin, row_end);
  using A = Acc<T>;
  const bool want_mean = args.options.label_smoothing > 0;
  if constexpr (kVectorized<T>) {
    if (uses_row_groups(args.layout) && !args.options.total_classes) {  // shards: rows one by one, below
      row_begin = dense_forward_groups(args, row_begin, row_end);
      if (row_begin < row_end) dense_forward_tail(args, row_begin, row_end);
      return;
    }
    if (uses_inner_tiles(args.layout) && !args.options.total_classes)
      return dense_forward_tiles(args, row_begin, row_end);
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Row<T> logits = row_of(args.logits, args.layout, r);
    const Row<T> labels = row_of(args.labels, args.layout, r);
    const RowSums<A> sums = scan_row(logits, want_mean, &labels);
    finish_dense_row(args, r, sums, log_sum(sums));
  }
}

template <typename T>
void dense_backward(const DenseBackwardArgs<T>& args, int64_t row_begin, int64_t row_end) {
  if (args.options.softcap > 0) return dense_backward_capped(args, row_begin, row_end);
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const int64_t stride = layout.inner;
  const bool stream = use_streaming_stores<T>(layout);
  if constexpr (kVectorized<T>) {
    if (uses_row_groups(layout) && !args.options.total_classes) {  // shards: rows one by one, below
      row_begin = dense_backward_groups(args, row_begin, row_end);
      if (row_begin < row_end) dense_backward_tail(args, row_begin, row_end);
      return;
    }
    if (uses_inner_tiles(layout) && !args.options.total_classes)
      return dense_backward_tiles(args, row_begin, row_end);
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t offset = layout.row_offset(r);
    const Row<T> labels = row_of(args.labels, layout, r);
    const T* logits = args.logits + offset;
    T* out = args.grad_logits + offset;
    const double lse = args.lse[r];
    const SplitLse<A> split = backward_lse(row_of(args.logits, layout, r), lse);
    // A shard's label sum is the whole row's, given (the uniform part then is whole too).
    const A label_sum = args.label_sums ? static_cast<A>(args.label_sums[r]) : label_sum_of(labels);
    const A target_sum = dense_target_sum(label_sum, args.options);
    const auto c = backward_coefficients<A>(load_acc(args.grad_loss[r]), A(1), lse, target_sum,
                                            row_classes(layout.classes, args.options), args.options);
    if constexpr (kVectorized<T>) {
      if (stride == 1) {
        // The next row's labels are summed before its gradient is written: ask for
        // them while this row streams, so that sum reads from L2, not memory.
        const T* next_labels = r + 1 < row_end ? args.labels + layout.row_offset(r + 1) : nullptr;
        write_gradient_vectorized<T>(logits, labels.data, out, 0, layout.classes, split, c.softmax_scale,
                                     c.target_scale, c.uniform, stream, -1, next_labels);
        continue;
      }
    }
    for (int64_t j = 0; j < layout.classes; ++j) {
      const A d = log_softmax_at(load_acc(logits[j * stride]), split);
      out[j * stride] = store_as<T>(gradient_at(c.softmax_scale, c.target_scale * labels[j] + c.uniform, d));
    }
  }
  if (stream) v::stream_fence();
}

template <typename T> void add_in_place(T* dst, const T* src, int64_t count) {
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    for (; i + v::kLanes <= count; i += v::kLanes) v::store(dst + i, v::load(dst + i) + v::load(src + i));
  }
  for (; i < count; ++i) dst[i] = store_as<T>(load_acc(dst[i]) + load_acc(src[i]));
}

FX_INSTANTIATE_KERNELS

}  // namespace FX_TARGET_NS
}  // namespace cpu
}  // namespace fused_xent
