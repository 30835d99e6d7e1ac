// CPU loops of the fused softmax cross-entropy over a range of rows. Callers
// (the TF kernels, the pybind11 module) split rows over their own thread
// pools; every row is computed by one call in a fixed order, so results do not
// depend on how rows are split.
#pragma once

#include <cstdint>

#include "core/xent_params.h"

namespace fused_xent {
namespace cpu {

template <typename T, typename Label>
void sparse_forward(const SparseForwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end);

template <typename T, typename Label>
void sparse_backward(const SparseBackwardArgs<T, Label>& args, int64_t row_begin, int64_t row_end);

template <typename T> void dense_forward(const DenseForwardArgs<T>& args, int64_t row_begin, int64_t row_end);

template <typename T>
void dense_backward(const DenseBackwardArgs<T>& args, int64_t row_begin, int64_t row_end);

// dst[i] += src[i] for i in [0, count), in the accumulator type, rounded once:
// the fused linear head's weight gradient, added chunk by chunk.
template <typename T> void add_in_place(T* dst, const T* src, int64_t count);

// Index of the first label that is neither in [0, classes) nor ignore_index, or -1.
template <typename Label>
int64_t find_invalid_label(const Label* labels, int64_t count, int64_t classes, const Options& options);

// Rough cost of one row in CPU cycles, for thread-pool sharding.
inline int64_t row_cost_cycles(int64_t classes) { return 8 + 6 * classes; }

// How many consecutive rows the kernels compute together (short rows go in
// groups of one vector's lanes), counted from row 0. Callers split rows over
// threads on multiples of it, so that groups stay whole: a call's rows after
// its last full group are computed as a padded group, which gives the same
// bits but costs a copy.
int64_t row_granularity(const Layout& layout);

// The rows of a call in units of row_granularity() rows.
struct RowUnits {
  int64_t rows;
  int64_t size;
  int64_t count() const { return (rows + size - 1) / size; }
  int64_t row(int64_t unit) const { return unit * size < rows ? unit * size : rows; }
};
inline RowUnits row_units(const Layout& layout) { return RowUnits{layout.rows(), row_granularity(layout)}; }

}  // namespace cpu
}  // namespace fused_xent
