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
// With a softcap, every formula reads z_j = cap * tanh(x_j / cap) for the
// given logits x, and the backward multiplies dloss/dz_j by dz_j/dx_j.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/half_types.h"
#include "core/xent_params.h"

namespace fused_xent {

// How a sparse label maps to a row weight.
// kAbsent: a vocabulary-parallel row whose class is on another shard.
enum class LabelKind { kValid, kIgnored, kOutOfRange, kAbsent };

template <typename A> struct RowSums;

namespace {  // see half_types.h: one copy per instruction-set build

#if defined(__CUDA_ARCH__)
template <typename A> FX_HOST_DEVICE A fx_exp(A x) { return exp(x); }
template <typename A> FX_HOST_DEVICE A fx_log(A x) { return log(x); }
template <typename A> FX_HOST_DEVICE A fx_log1p(A x) { return log1p(x); }
template <typename A> FX_HOST_DEVICE A fx_expm1(A x) { return expm1(x); }
#else
template <typename A> FX_HOST_DEVICE A fx_exp(A x) { return std::exp(x); }
template <typename A> FX_HOST_DEVICE A fx_log(A x) { return std::log(x); }
template <typename A> FX_HOST_DEVICE A fx_log1p(A x) { return std::log1p(x); }
template <typename A> FX_HOST_DEVICE A fx_expm1(A x) { return std::expm1(x); }
#endif

template <typename A> FX_HOST_DEVICE A negative_infinity() { return -std::numeric_limits<A>::infinity(); }
template <typename A> FX_HOST_DEVICE A quiet_nan() { return std::numeric_limits<A>::quiet_NaN(); }

// Sums over a row (or a slice of it) kept relative to the slice's max m, so
// that every term is >= 0 and nothing cancels even for logits of +-1e4:
//   ties      = how many z_j equal m            (their exp(z_j - m) are exactly 1)
//   rest      = sum_j exp(z_j - m), z_j < m     (sum_exp = ties + rest)
//   gap       = sum_j (m - z_j) / C         (for label smoothing's mean(z))
//   count     = n / C                       (elements seen, over C)
//   label_sum = sum_j t_j                   (dense labels only)
//   label_gap = sum_j t_j (m - z_j), t_j != 0 (dense labels only)
// Keeping the max's own 1 apart from the rest lets a confidently right row,
// whose loss log(1 + rest) is tiny, keep its relative accuracy (log1p).
// A path that cannot tell the max's term apart leaves ties = 0 and the whole
// sum in rest. Slices merge in a fixed order; a NaN anywhere makes the row NaN.
}  // namespace

template <typename A> struct RowSums {
  A max = negative_infinity<A>();
  A ties = 0;
  A rest = 0;
  A gap = 0;
  A count = 0;
  double label_sum = 0;  // in double: summed over up to 1e5+ classes, it scales every p_j
  A label_gap = 0;
};

namespace {

// A max that keeps NaN once seen, so a NaN anywhere makes the row NaN.
template <typename A> FX_HOST_DEVICE A nan_sticky_max(A running, A x) {
  return (x > running || x != x) ? x : running;
}

// Adds `weight * shift` to `sum` unless the weight is 0, so an empty (or
// all -inf) prefix shifted by +inf stays finite instead of turning NaN.
template <typename A, typename W> FX_HOST_DEVICE A add_shifted(A sum, W weight, A shift) {
  return weight != 0 ? sum + static_cast<A>(weight) * shift : sum;
}

template <typename A> FX_HOST_DEVICE void merge_sums(RowSums<A>& run, const RowSums<A>& block) {
  if (block.max > run.max) {
    const A shift = block.max - run.max;  // +inf while run has seen only -inf
    run.rest = (run.rest + run.ties) * fx_exp(-shift) + block.rest;
    run.ties = block.ties;
    run.gap = add_shifted(run.gap, run.count, shift) + block.gap;
    run.label_gap = add_shifted(run.label_gap, run.label_sum, shift) + block.label_gap;
    run.max = block.max;
  } else if (block.max == negative_infinity<A>()) {
    // An all -inf block adds no probability; its gaps are already +inf where they count.
    run.gap += block.gap;
    run.label_gap += block.label_gap;
  } else {
    const A shift = run.max - block.max;  // NaN if either max is NaN: it spreads to every sum
    if (shift == 0) {
      run.ties += block.ties;
      run.rest += block.rest;
    } else {
      run.rest += (block.rest + block.ties) * fx_exp(-shift);
    }
    run.gap = add_shifted(run.gap + block.gap, block.count, shift);
    run.label_gap = add_shifted(run.label_gap + block.label_gap, block.label_sum, shift);
    if (shift != shift) run.max = shift;
  }
  run.count += block.count;
  run.label_sum += block.label_sum;
}

// log(sum_exp): with max, it gives lse = max + log_sum in double, which keeps
// the backward's exp(z - lse) exact to float precision even when |lse| is large.
// With the max's term apart, log1p keeps a small log_sum's relative accuracy.
template <typename A> FX_HOST_DEVICE A log_sum_of(A ties, A rest) {
  return ties >= 1 ? fx_log1p((ties - 1) + rest) : fx_log(rest);
}
template <typename A> FX_HOST_DEVICE A log_sum(const RowSums<A>& sums) {
  return log_sum_of(sums.ties, sums.rest);
}

FX_HOST_DEVICE double lse_of(double max, double log_sum) {
  return max == negative_infinity<double>() ? max : max + log_sum;
}

// z_j - lse evaluated as (z_j - hi) - lo with hi + lo = lse: z_j - hi is exact
// where it matters (z_j near lse), so p_j = exp(.) keeps full precision.
template <typename A> struct SplitLse {
  A hi;
  A lo;
};
template <typename A> FX_HOST_DEVICE SplitLse<A> split_lse(double lse) {
  const A hi = static_cast<A>(lse);
  const double rest = lse - static_cast<double>(hi);
  return SplitLse<A>{hi, rest == rest ? static_cast<A>(rest) : A(0)};  // inf - inf: no low part
}
template <typename A> FX_HOST_DEVICE A log_softmax_at(A z, const SplitLse<A>& lse) {
  return (z - lse.hi) - lse.lo;
}
template <typename A> FX_HOST_DEVICE A softmax_at(A z, const SplitLse<A>& lse) {
  return fx_exp(log_softmax_at(z, lse));
}

template <typename Label>
FX_HOST_DEVICE LabelKind classify_label(Label label, int64_t classes, const Options& options) {
  const int64_t value = static_cast<int64_t>(label);
  if (options.has_ignore_index && value == options.ignore_index) return LabelKind::kIgnored;
  if (options.total_classes > 0 && value == options.absent_label) return LabelKind::kAbsent;
  if (value < 0 || value >= classes) return LabelKind::kOutOfRange;
  return LabelKind::kValid;
}

// The classes of the whole row: a label's range, the C of the smoothing's eps / C.
FX_HOST_DEVICE int64_t row_classes(int64_t classes, const Options& options) {
  return options.total_classes > 0 ? options.total_classes : classes;
}

// The part of the smoothing's uniform target a call's classes hold: 1, or for a
// vocabulary-parallel shard, classes / total_classes.
template <typename A> FX_HOST_DEVICE A uniform_share(int64_t classes, const Options& options) {
  return options.total_classes > 0 ? static_cast<A>(static_cast<double>(classes) / options.total_classes)
                                   : A(1);
}

// Weight of a row with a valid label: the class weight of its label, or 1.
FX_HOST_DEVICE float label_weight(int64_t label, const Options& options) {
  return options.class_weights ? options.class_weights[label] : 1.0f;
}

// Cross-entropy part of a row, sum_j q_j (lse - z_j), written with
// nonnegative terms: log_sum * sum(q) + (1 - eps) * sum_j t_j (m - z_j) + eps * mean_j (m - z_j)
// (a shard's mean_gap comes scaled by its share of the classes).
// Each gap term is only read when its weight is nonzero: a gap is +inf when a
// logit it covers is -inf, and 0 * inf would make the row NaN instead of +inf.
template <typename A>
FX_HOST_DEVICE A cross_entropy(A log_sum, A target_sum, A label_gap, A mean_gap, const Options& options) {
  const A eps = options.label_smoothing;
  A ce = eps < 1 ? log_sum * target_sum + (1 - eps) * label_gap : log_sum * target_sum;
  if (eps > 0) ce += eps * mean_gap;
  return ce;
}

template <typename A> FX_HOST_DEVICE A z_loss_term(double lse, const Options& options) {
  return options.z_loss > 0 ? static_cast<A>(static_cast<double>(options.z_loss) * lse * lse) : A(0);
}

// Sparse row: t = onehot(y), so sum(t) = 1 and sum_j t_j (m - z_j) = m - z_y.
// A vocabulary-parallel shard (`share` < 1, uniform_share) holds its part of
// the uniform target, and the one-hot part only where the label is among its
// classes (has_label); sum(q) over its classes is then less than 1.
template <typename A> FX_HOST_DEVICE A sparse_row_loss(const RowSums<A>& sums, A log_sum, double lse,
                                                       bool has_label, A z_label, A weight,
                                                       const Options& options, A share = A(1)) {
  const A eps = options.label_smoothing;
  const A target_sum = options.total_classes > 0 ? (has_label ? 1 - eps : A(0)) + eps * share : A(1);
  const A label_gap = has_label ? sums.max - z_label : A(0);
  const A ce = cross_entropy(log_sum, target_sum, label_gap, share * sums.gap, options);
  return weight * (ce + z_loss_term<A>(lse, options));
}

// sum(q) for dense labels; a vocabulary-parallel shard holds `share` of the uniform part.
template <typename A> FX_HOST_DEVICE A dense_target_sum(A label_sum, const Options& options, A share = A(1)) {
  const A eps = options.label_smoothing;
  return (1 - eps) * label_sum + eps * share;
}

template <typename A> FX_HOST_DEVICE A dense_row_loss(const RowSums<A>& sums, A log_sum, double lse,
                                                      const Options& options, A share = A(1)) {
  const A target_sum = dense_target_sum(static_cast<A>(sums.label_sum), options, share);
  return cross_entropy(log_sum, target_sum, sums.label_gap, share * sums.gap, options) +
         z_loss_term<A>(lse, options);
}

// Final-logit softcap: z = cap * tanh(x / cap) and its slope dz/dx = 1 - tanh^2,
// both from e = exp(-2|x| / cap): tanh = (1 - e) / (1 + e) with 1 - e = -expm1
// (exact for small x), and slope = 4 e / (1 + e)^2, which keeps its relative
// accuracy where tanh nears 1 and 1 - tanh^2 would cancel. x = +-inf gives
// +-cap with slope 0; NaN stays NaN.
template <typename A> struct Softcapped {
  A value;
  A slope;
};
template <typename A> FX_HOST_DEVICE Softcapped<A> softcap_at(A x, A cap) {
  const A u = (x < 0 ? x : -x) * (A(2) / cap);  // -2|x| / cap
  const A e = fx_exp(u);
  const A one_minus_e = -fx_expm1(u);
  const A tanh = one_minus_e / (A(1) + e);
  const A value = cap * tanh;
  return Softcapped<A>{x < 0 ? -value : value, A(4) * e / ((A(1) + e) * (A(1) + e))};
}
// The logit a formula reads: capped when a cap is set.
template <typename A> FX_HOST_DEVICE A capped_logit(A x, const Options& options) {
  return options.softcap > 0 ? softcap_at<A>(x, static_cast<A>(options.softcap)).value : x;
}

// The backward of a row is dz_j = softmax_scale * p_j - target_scale * t_j - uniform,
// with t the one-hot (sparse) or dense label and p_j = exp(z_j - lse).
template <typename A> struct BackwardCoefficients {
  A softmax_scale;  // g * w * (sum(q) + 2 lambda lse)
  A target_scale;   // g * w * (1 - eps)
  A uniform;        // g * w * eps / C
};

template <typename A>
FX_HOST_DEVICE BackwardCoefficients<A> backward_coefficients(A grad, A weight, double lse, A target_sum,
                                                             int64_t classes, const Options& options) {
  const A eps = options.label_smoothing;
  const A scale = grad * weight;
  BackwardCoefficients<A> c;
  c.softmax_scale =
      scale * (target_sum + (options.z_loss > 0 ? static_cast<A>(2.0 * options.z_loss * lse) : A(0)));
  c.target_scale = scale * (1 - eps);
  c.uniform = scale * eps / static_cast<A>(classes);
  return c;
}

// One element of the backward, dz_j = a p_j - target with p_j = exp(d) and
// target = b t_j + u. Where p_j > 1/2 (one class at most) the two terms nearly
// cancel in a confidently right row; there a p_j - a = a expm1(d) keeps the
// small gradient's relative accuracy.
template <typename A> FX_HOST_DEVICE A gradient_from(A a, A target, A d, A p) {
  return p > A(0.5) ? a * fx_expm1(d) + (a - target) : a * p - target;
}
template <typename A> FX_HOST_DEVICE A gradient_at(A a, A target, A d) {
  return gradient_from(a, target, d, fx_exp(d));
}

}  // namespace
}  // namespace fused_xent
