// Per-row formulas of softmax cross-entropy, written once for the CPU loops
// and the CUDA kernels (host + device). docs/derivation.md derives them.
//
// For a row of logits z with C classes, target distribution q and row weight w:
//   lse  = log(sum_j exp(z_j))                       (log-sum-exp)
//   p_j  = exp(z_j - lse)                            (softmax)
//   loss = w * (lse * sum(q) - sum_j q_j z_j + lambda * lse^2)
//   dloss/dz_j = w * ((sum(q) + 2 lambda lse) * p_j - q_j)
// Sparse labels: q = (1 - eps) onehot(y) + eps / C, so sum(q) = 1.
// Dense labels t: q = (1 - eps) t + eps / C.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/half_types.h"
#include "core/xent_params.h"

namespace fused_xent {

#if defined(__CUDA_ARCH__)
template <typename A> FX_HOST_DEVICE A fx_exp(A x) { return exp(x); }
template <typename A> FX_HOST_DEVICE A fx_log(A x) { return log(x); }
#else
template <typename A> FX_HOST_DEVICE A fx_exp(A x) { return std::exp(x); }
template <typename A> FX_HOST_DEVICE A fx_log(A x) { return std::log(x); }
#endif

template <typename A> FX_HOST_DEVICE A negative_infinity() {
  return -std::numeric_limits<A>::infinity();
}
template <typename A> FX_HOST_DEVICE A quiet_nan() { return std::numeric_limits<A>::quiet_NaN(); }

// Running max and sum of exp(z - max): the online softmax state of one row
// (or of one slice of a row; slices merge in a fixed order).
template <typename A>
struct RowStats {
  A max = negative_infinity<A>();
  A sum_exp = 0;
};

// A max that keeps NaN once seen, so a NaN anywhere makes the row NaN.
template <typename A> FX_HOST_DEVICE A nan_sticky_max(A running, A x) {
  return (x > running || x != x) ? x : running;
}

// Folds a block whose max is `block_max` and whose sum of exp(z - block_max)
// is `block_sum` into `stats`. A max of -inf means an all -inf block: nothing to add.
template <typename A>
FX_HOST_DEVICE void merge_stats(RowStats<A>& stats, A block_max, A block_sum) {
  if (block_max == negative_infinity<A>()) return;
  if (stats.max == negative_infinity<A>()) {
    stats.max = block_max;
    stats.sum_exp = block_sum;
  } else if (block_max > stats.max) {
    stats.sum_exp = stats.sum_exp * fx_exp(stats.max - block_max) + block_sum;
    stats.max = block_max;
  } else if (block_max != block_max) {
    stats.max = block_max;
    stats.sum_exp = block_max;
  } else {
    stats.sum_exp += block_sum * fx_exp(block_max - stats.max);
  }
}

template <typename A> FX_HOST_DEVICE A log_sum_exp(const RowStats<A>& stats) {
  if (stats.max == negative_infinity<A>()) return stats.max;  // all -inf row
  return stats.max + fx_log(stats.sum_exp);
}

// How a sparse label maps to a row weight.
enum class LabelKind { kValid, kIgnored, kOutOfRange };

template <typename Label>
FX_HOST_DEVICE LabelKind classify_label(Label label, int64_t classes, const Options& options) {
  const int64_t value = static_cast<int64_t>(label);
  if (options.has_ignore_index && value == options.ignore_index) return LabelKind::kIgnored;
  if (value < 0 || value >= classes) return LabelKind::kOutOfRange;
  return LabelKind::kValid;
}

// Weight of a row with a valid label: the class weight of its label, or 1.
FX_HOST_DEVICE float label_weight(int64_t label, const Options& options) {
  return options.class_weights ? options.class_weights[label] : 1.0f;
}

// Loss of a sparse row: w * (lse - (1 - eps) z_y - eps * mean(z) + lambda lse^2).
// mean_z is only read when eps > 0, so -inf logits do not turn 0 * -inf into NaN.
template <typename A>
FX_HOST_DEVICE A sparse_row_loss(A lse, A z_label, A mean_z, A weight, const Options& options) {
  const A eps = options.label_smoothing;
  A cross_entropy = lse - (1 - eps) * z_label;
  if (eps > 0) cross_entropy -= eps * mean_z;
  return weight * (cross_entropy + static_cast<A>(options.z_loss) * lse * lse);
}

// Loss of a dense row, given sum(t), sum over t_j != 0 of t_j z_j, and mean(z).
template <typename A>
FX_HOST_DEVICE A dense_row_loss(A lse, A label_sum, A label_dot_z, A mean_z, const Options& options) {
  const A eps = options.label_smoothing;
  const A target_sum = (1 - eps) * label_sum + eps;
  A cross_entropy = lse * target_sum - (1 - eps) * label_dot_z;
  if (eps > 0) cross_entropy -= eps * mean_z;
  return cross_entropy + static_cast<A>(options.z_loss) * lse * lse;
}

// The backward of a row is dz_j = softmax_scale * p_j - target_scale * t_j - uniform,
// with t the one-hot (sparse) or dense label and p_j = exp(z_j - lse).
template <typename A>
struct BackwardCoefficients {
  A softmax_scale;  // g * w * (sum(q) + 2 lambda lse)
  A target_scale;   // g * w * (1 - eps)
  A uniform;        // g * w * eps / C
};

template <typename A>
FX_HOST_DEVICE BackwardCoefficients<A> backward_coefficients(A grad, A weight, A lse, A target_sum,
                                                            int64_t classes, const Options& options) {
  const A eps = options.label_smoothing;
  const A scale = grad * weight;
  BackwardCoefficients<A> c;
  c.softmax_scale = scale * (target_sum + 2 * static_cast<A>(options.z_loss) * lse);
  c.target_scale = scale * (1 - eps);
  c.uniform = scale * eps / static_cast<A>(classes);
  return c;
}

}  // namespace fused_xent
