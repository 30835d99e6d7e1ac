// Plain descriptions of one softmax cross-entropy call: layout, options and
// buffers. Free of any framework so the TF op, the pybind11 module and the
// CUDA launchers all fill the same structs.
#pragma once

#include <cstdint>

#include "core/half_types.h"

namespace fused_xent {

// The logits are viewed as [outer, classes, inner]: the class axis may be any
// axis of the original tensor. Row r = o * inner + i holds `classes` elements
// at offsets (o * classes * inner + i) + j * inner. inner == 1 is the common,
// contiguous case.
struct Layout {
  int64_t outer = 0;
  int64_t classes = 0;
  int64_t inner = 1;

  FX_HOST_DEVICE int64_t rows() const { return outer * inner; }
  FX_HOST_DEVICE int64_t row_offset(int64_t row) const {
    return (row / inner) * classes * inner + row % inner;
  }
};

struct Options {
  float label_smoothing = 0.0f;   // epsilon: target = (1 - eps) * onehot + eps / C
  float z_loss = 0.0f;            // lambda: adds lambda * lse^2 to each row's loss
  float softcap = 0.0f;           // cap: each logit is read as cap * tanh(z / cap); 0: not capped
  bool has_ignore_index = false;  // rows whose label equals ignore_index give 0
  int64_t ignore_index = 0;
  const float* class_weights = nullptr;  // length `classes`, or null for all ones
  // Vocabulary-parallel calls see one shard of each row's classes: `classes`
  // of total_classes (0: whole rows). Their labels are local class indices, or
  // absent_label for a row whose class is on another shard; the loss they give
  // is the shard's part against the shard's own lse (docs/distributed.md).
  int64_t total_classes = 0;
  int64_t absent_label = 0;
};

template <typename T, typename Label> struct SparseForwardArgs {
  Layout layout;
  Options options;
  const T* logits = nullptr;
  const Label* labels = nullptr;  // one per row
  T* loss = nullptr;              // one per row
  double* lse = nullptr;          // one per row: log-sum-exp, in double so the backward stays exact
};

template <typename T, typename Label> struct SparseBackwardArgs {
  Layout layout;
  Options options;
  const T* logits = nullptr;
  const Label* labels = nullptr;
  const double* lse = nullptr;
  const T* grad_loss = nullptr;  // upstream gradient, one per row
  T* grad_logits = nullptr;      // may alias `logits`: each element is read before it is written
};

template <typename T> struct DenseForwardArgs {
  Layout layout;    // shared by logits and labels
  Options options;  // class_weights and ignore_index are not used
  const T* logits = nullptr;
  const T* labels = nullptr;
  T* loss = nullptr;
  double* lse = nullptr;
  double* label_sums = nullptr;  // or null; a vocabulary-parallel shard's sum_j t_j per row, for its caller
};

template <typename T> struct DenseBackwardArgs {
  Layout layout;
  Options options;
  const T* logits = nullptr;
  const T* labels = nullptr;
  const double* lse = nullptr;
  const T* grad_loss = nullptr;
  T* grad_logits = nullptr;            // may alias `logits`
  const double* label_sums = nullptr;  // or null; for a vocabulary-parallel shard, sum_j t_j of whole rows
};

}  // namespace fused_xent
