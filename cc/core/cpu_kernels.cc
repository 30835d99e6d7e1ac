#include "core/cpu_kernels.h"

#include <algorithm>
#include <limits>

#include "core/row_math.h"

namespace fused_xent {
namespace cpu {
namespace {

// Rows are read in blocks that fit in L1: one pass over memory per row, with
// the block's max taken before its exponentials so the exp loop stays simple.
constexpr int64_t kBlock = 512;

// A row of the logits (or dense labels) tensor: `count` elements `stride` apart.
template <typename T>
struct Row {
  const T* data;
  int64_t count;
  int64_t stride;
  Acc<T> operator[](int64_t j) const { return load_acc(data[j * stride]); }
};

template <typename T>
Row<T> row_of(const T* base, const Layout& layout, int64_t row) {
  return Row<T>{base + layout.row_offset(row), layout.classes, layout.inner};
}

// Loads block [start, start + len) into `out` in accumulator precision and
// returns its NaN-sticky max.
template <typename T>
Acc<T> load_block(const Row<T>& row, int64_t start, int64_t len, Acc<T>* out) {
  using A = Acc<T>;
  A block_max = negative_infinity<A>();
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
    A label_sum = 0, label_gap = 0;
    for (int64_t k = 0; k < len; ++k) {
      label_sum += labels[k];
      label_gap += labels[k] != 0 ? labels[k] * (block_max - z[k]) : A(0);
    }
    sums.label_sum = label_sum;
    sums.label_gap = label_gap;  // +inf (or NaN) for an all -inf block with a nonzero label
  }
  if (!all_negative_infinity) {
    A sum_exp = 0;
    for (int64_t k = 0; k < len; ++k) sum_exp += fx_exp(z[k] - block_max);
    sums.sum_exp = sum_exp;
  }
  return sums;
}

// One read of a row of logits (and of dense labels when given), block by block.
template <typename T>
RowSums<Acc<T>> scan_row(const Row<T>& row, bool want_mean, const Row<T>* labels = nullptr) {
  using A = Acc<T>;
  A block[kBlock];
  A label_block[kBlock];
  RowSums<A> sums;
  const A inv_classes = A(1) / static_cast<A>(row.count);
  for (int64_t start = 0; start < row.count; start += kBlock) {
    const int64_t len = std::min(kBlock, row.count - start);
    const A block_max = load_block(row, start, len, block);
    if (labels) load_block(*labels, start, len, label_block);
    merge_sums(sums, block_sums(block, labels ? label_block : nullptr, len, block_max, want_mean, inv_classes));
  }
  return sums;
}

template <typename T>
Acc<T> label_sum_of(const Row<T>& labels) {
  using A = Acc<T>;
  A block[kBlock];
  A sum = 0;
  for (int64_t start = 0; start < labels.count; start += kBlock) {
    const int64_t len = std::min(kBlock, labels.count - start);
    load_block(labels, start, len, block);
    A block_sum = 0;
    for (int64_t k = 0; k < len; ++k) block_sum += block[k];
    sum += block_sum;
  }
  return sum;
}

// Writes dz_j = c.softmax_scale * exp(z_j - lse) - c.uniform for j in [begin, end).
template <typename T>
void write_softmax_gradient(const T* logits, T* out, int64_t stride, int64_t begin, int64_t end,
                            const SplitLse<Acc<T>>& lse, const BackwardCoefficients<Acc<T>>& c) {
  for (int64_t j = begin; j < end; ++j) {
    const Acc<T> p = softmax_at(load_acc(logits[j * stride]), lse);
    out[j * stride] = store_as<T>(c.softmax_scale * p - c.uniform);
  }
}

template <typename T>
void fill_row(T* out, int64_t count, int64_t stride, Acc<T> value) {
  const T v = store_as<T>(value);
  for (int64_t j = 0; j < count; ++j) out[j * stride] = v;
}

}  // namespace

template <typename T, typename Label>
void sparse_forward(const SparseForwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const bool want_mean = args.options.label_smoothing > 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Row<T> row = row_of(args.logits, layout, r);
    const RowSums<A> sums = scan_row(row, want_mean);
    const double lse = lse_of(sums.max, log_sum(sums));
    args.lse[r] = lse;
    const LabelKind kind = classify_label(args.labels[r], layout.classes, args.options);
    A loss = 0;
    if (kind == LabelKind::kValid) {
      const int64_t y = static_cast<int64_t>(args.labels[r]);
      loss = sparse_row_loss<A>(sums, lse, row[y], label_weight(y, args.options), args.options);
    } else if (kind == LabelKind::kOutOfRange) {
      loss = quiet_nan<A>();
    }
    args.loss[r] = store_as<T>(loss);
  }
}

template <typename T, typename Label>
void sparse_backward(const SparseBackwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end) {
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const int64_t classes = layout.classes;
  const int64_t stride = layout.inner;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t offset = layout.row_offset(r);
    const T* logits = args.logits + offset;
    T* out = args.grad_logits + offset;
    const LabelKind kind = classify_label(args.labels[r], classes, args.options);
    if (kind == LabelKind::kIgnored) {
      fill_row(out, classes, stride, A(0));
      continue;
    }
    if (kind == LabelKind::kOutOfRange) {
      fill_row(out, classes, stride, quiet_nan<A>());
      continue;
    }
    const int64_t y = static_cast<int64_t>(args.labels[r]);
    const double lse = args.lse[r];
    const SplitLse<A> split = split_lse<A>(lse);
    const auto c = backward_coefficients<A>(load_acc(args.grad_loss[r]), label_weight(y, args.options),
                                            lse, A(1), classes, args.options);
    // The target column is written apart so the two long loops stay branch-free.
    const A p_label = softmax_at(load_acc(logits[y * stride]), split);
    write_softmax_gradient(logits, out, stride, 0, y, split, c);
    write_softmax_gradient(logits, out, stride, y + 1, classes, split, c);
    out[y * stride] = store_as<T>(c.softmax_scale * p_label - c.uniform - c.target_scale);
  }
}

template <typename T>
void dense_forward(const DenseForwardArgs<T>& args, int64_t row_begin, int64_t row_end) {
  using A = Acc<T>;
  const bool want_mean = args.options.label_smoothing > 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Row<T> logits = row_of(args.logits, args.layout, r);
    const Row<T> labels = row_of(args.labels, args.layout, r);
    const RowSums<A> sums = scan_row(logits, want_mean, &labels);
    const double lse = lse_of(sums.max, log_sum(sums));
    args.lse[r] = lse;
    args.loss[r] = store_as<T>(dense_row_loss<A>(sums, lse, args.options));
  }
}

template <typename T>
void dense_backward(const DenseBackwardArgs<T>& args, int64_t row_begin, int64_t row_end) {
  using A = Acc<T>;
  const Layout& layout = args.layout;
  const int64_t stride = layout.inner;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t offset = layout.row_offset(r);
    const Row<T> labels = row_of(args.labels, layout, r);
    const T* logits = args.logits + offset;
    T* out = args.grad_logits + offset;
    const double lse = args.lse[r];
    const SplitLse<A> split = split_lse<A>(lse);
    const A target_sum = dense_target_sum(label_sum_of(labels), args.options);
    const auto c = backward_coefficients<A>(load_acc(args.grad_loss[r]), A(1), lse, target_sum,
                                            layout.classes, args.options);
    for (int64_t j = 0; j < layout.classes; ++j) {
      const A p = softmax_at(load_acc(logits[j * stride]), split);
      out[j * stride] = store_as<T>(c.softmax_scale * p - c.target_scale * labels[j] - c.uniform);
    }
  }
}

template <typename Label>
int64_t find_invalid_label(const Label* labels, int64_t count, int64_t classes, const Options& options) {
  for (int64_t i = 0; i < count; ++i) {
    if (classify_label(labels[i], classes, options) == LabelKind::kOutOfRange) return i;
  }
  return -1;
}

#define FX_INSTANTIATE_SPARSE(T, Label)                                                          \
  template void sparse_forward<T, Label>(const SparseForwardArgs<T, Label>&, int64_t, int64_t); \
  template void sparse_backward<T, Label>(const SparseBackwardArgs<T, Label>&, int64_t, int64_t);
#define FX_INSTANTIATE_DENSE(T)                                                   \
  template void dense_forward<T>(const DenseForwardArgs<T>&, int64_t, int64_t); \
  template void dense_backward<T>(const DenseBackwardArgs<T>&, int64_t, int64_t);
#define FX_INSTANTIATE_ALL_LABELS(T) \
  FX_INSTANTIATE_SPARSE(T, int32_t)  \
  FX_INSTANTIATE_SPARSE(T, int64_t)  \
  FX_INSTANTIATE_DENSE(T)

FX_INSTANTIATE_ALL_LABELS(float)
FX_INSTANTIATE_ALL_LABELS(double)
FX_INSTANTIATE_ALL_LABELS(float16_t)
FX_INSTANTIATE_ALL_LABELS(bfloat16_t)

template int64_t find_invalid_label<int32_t>(const int32_t*, int64_t, int64_t, const Options&);
template int64_t find_invalid_label<int64_t>(const int64_t*, int64_t, int64_t, const Options&);

}  // namespace cpu
}  // namespace fused_xent
