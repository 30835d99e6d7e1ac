// Glue between TensorFlow tensors and the TF-free core: dtype mapping, the
// [outer, classes, inner] layout, attrs, and row sharding over TF's pool.
#pragma once

#include <cmath>

#include "core/class_weights_check.h"
#include "core/cpu_kernels.h"
#include "core/xent_params.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace fused_xent {

// Core element type with the same bits as TensorFlow's.
template <typename T> struct CoreTypeOf {
  using type = T;
};
template <> struct CoreTypeOf<Eigen::half> {
  using type = float16_t;
};
template <> struct CoreTypeOf<Eigen::bfloat16> {
  using type = bfloat16_t;
};
template <typename T> using CoreType = typename CoreTypeOf<T>::type;

template <typename T> const CoreType<T>* core_ptr(const tensorflow::Tensor& t) {
  return reinterpret_cast<const CoreType<T>*>(t.flat<T>().data());
}
template <typename T> CoreType<T>* core_mutable_ptr(tensorflow::Tensor* t) {
  return reinterpret_cast<CoreType<T>*>(t->flat<T>().data());
}

// Layout of `logits` around `axis` (negative counts from the end); also the
// shape without that axis, which is the shape of labels (sparse) and of the loss.
inline absl::Status LayoutOf(const tensorflow::TensorShape& logits, int64_t axis, Layout* layout,
                             tensorflow::TensorShape* reduced) {
  const int rank = logits.dims();
  if (rank < 1) return absl::InvalidArgumentError("logits must have rank >= 1, got a scalar");
  if (axis < -rank || axis >= rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("axis ", axis, " is out of range for logits of shape ", logits.DebugString()));
  }
  if (axis < 0) axis += rank;
  layout->outer = 1;
  layout->inner = 1;
  layout->classes = logits.dim_size(axis);
  reduced->Clear();
  for (int d = 0; d < rank; ++d) {
    if (d == axis) continue;
    (d < axis ? layout->outer : layout->inner) *= logits.dim_size(d);
    reduced->AddDim(logits.dim_size(d));
  }
  if (layout->classes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Must have at least one class, but got logits shape ", logits.DebugString()));
  }
  return absl::OkStatus();
}

// Attrs shared by every op of the project.
inline absl::Status ReadOptions(tensorflow::OpKernelConstruction* ctx, bool sparse, Options* options,
                                int64_t* axis) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("axis", axis));
  TF_RETURN_IF_ERROR(ctx->GetAttr("label_smoothing", &options->label_smoothing));
  TF_RETURN_IF_ERROR(ctx->GetAttr("z_loss", &options->z_loss));
  if (!(options->label_smoothing >= 0.0f && options->label_smoothing <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("label_smoothing must lie in [0, 1], got ", options->label_smoothing));
  }
  if (!std::isfinite(options->z_loss) || options->z_loss < 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat("z_loss must be finite and >= 0, got ", options->z_loss));
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("softcap", &options->softcap));
  if (!std::isfinite(options->softcap) || options->softcap < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("softcap must be finite and >= 0 (0: no cap), got ", options->softcap));
  }
  if (sparse) {
    TF_RETURN_IF_ERROR(ctx->GetAttr("has_ignore_index", &options->has_ignore_index));
    TF_RETURN_IF_ERROR(ctx->GetAttr("ignore_index", &options->ignore_index));
  }
  return absl::OkStatus();
}

inline absl::Status CheckSameShape(const tensorflow::Tensor& t, const tensorflow::TensorShape& expected,
                                   const char* name, const char* expected_name) {
  if (t.shape() == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " must have the shape of ", expected_name, " ",
                                                 expected.DebugString(), ", got ", t.shape().DebugString()));
}

// Class weights are a vector of size 0 (none) or one weight per class.
inline absl::Status ClassWeightsOf(const tensorflow::Tensor& weights, int64_t classes, Options* options) {
  if (weights.dims() != 1 || (weights.NumElements() != 0 && weights.NumElements() != classes)) {
    return absl::InvalidArgumentError(absl::StrCat("class_weights must be a vector of ", classes,
                                                   " weights (one per class), got shape ",
                                                   weights.shape().DebugString()));
  }
  options->class_weights = weights.NumElements() ? weights.flat<float>().data() : nullptr;
  return absl::OkStatus();
}

// Class weight values (NaN, inf, < 0 are refused). Only for kernels whose
// inputs are in host memory: on a GPU reading them would need a copy.
inline absl::Status CheckClassWeightValues(const Options& options, int64_t classes) {
  if (options.class_weights == nullptr) return absl::OkStatus();
  const int64_t bad = find_bad_class_weight(options.class_weights, classes);
  if (bad < 0) return absl::OkStatus();
  return absl::InvalidArgumentError(bad_class_weight_message(options.class_weights, bad));
}

// The Grad ops' last input, grad_lse, is kept only for graphs saved by earlier
// versions (cc/tf/ops.cc): new graphs pass it empty. An old graph's second-order
// gradient fed lse's gradient there, which the kernels no longer add: refuse it
// rather than return a silently different gradient. (The XLA lowering too.)
inline absl::Status CheckGradLseEmpty(int64_t elements) {
  if (elements == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "grad_lse must be empty, got ", elements,
      " elements: a non-empty grad_lse comes from a graph saved by an earlier fused-xent version with a "
      "second-order gradient; re-export it"));
}

// --- Argument builders shared by the CPU and GPU kernels: shape checks, outputs,
// pointers. Sparse label values are checked by the CPU kernels only (on the
// GPU that would need a device-to-host copy).

inline absl::Status SparseShapes(tensorflow::OpKernelContext* ctx, int64_t axis, Options* options,
                                 Layout* layout, tensorflow::TensorShape* reduced) {
  TF_RETURN_IF_ERROR(LayoutOf(ctx->input(0).shape(), axis, layout, reduced));
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(1), *reduced, "labels", "logits without the class axis"));
  return ClassWeightsOf(ctx->input(2), layout->classes, options);
}

// Allocates the (loss, lse) outputs and points the args at inputs and outputs.
template <typename T, typename Args> absl::Status FillForwardOutputs(tensorflow::OpKernelContext* ctx,
                                                                     const tensorflow::TensorShape& reduced,
                                                                     Args* args) {
  tensorflow::Tensor *loss, *lse;
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, reduced, &loss));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, reduced, &lse));
  args->logits = core_ptr<T>(ctx->input(0));
  args->loss = core_mutable_ptr<T>(loss);
  args->lse = lse->flat<double>().data();
  return absl::OkStatus();
}

template <typename T, typename Label>
absl::Status PrepareSparseForward(tensorflow::OpKernelContext* ctx, int64_t axis,
                                  SparseForwardArgs<CoreType<T>, Label>* args) {
  tensorflow::TensorShape reduced;
  TF_RETURN_IF_ERROR(SparseShapes(ctx, axis, &args->options, &args->layout, &reduced));
  args->labels = ctx->input(1).flat<Label>().data();
  return FillForwardOutputs<T>(ctx, reduced, args);
}

template <typename T> absl::Status PrepareDenseForward(tensorflow::OpKernelContext* ctx, int64_t axis,
                                                       DenseForwardArgs<CoreType<T>>* args) {
  tensorflow::TensorShape reduced;
  TF_RETURN_IF_ERROR(LayoutOf(ctx->input(0).shape(), axis, &args->layout, &reduced));
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(1), ctx->input(0).shape(), "labels", "logits"));
  args->labels = core_ptr<T>(ctx->input(1));
  return FillForwardOutputs<T>(ctx, reduced, args);
}

// How a backward kernel gets output 0, the gradient, shaped like input 0.
using GradientOutputFn = absl::Status (*)(tensorflow::OpKernelContext* ctx, tensorflow::Tensor** grad);

// The gradient overwrites the logits buffer when TensorFlow lets it (the
// logits are not needed elsewhere), so a training step needs no new N x C
// buffer. The CPU kernels pass ForwardOrPoolGradient (tf/pooled_output.h).
inline absl::Status ForwardOrAllocateGradient(tensorflow::OpKernelContext* ctx, tensorflow::Tensor** grad) {
  return ctx->forward_input_or_allocate_output({0}, 0, ctx->input(0).shape(), grad);
}

// Backward inputs from `first` on are lse, grad_loss and the legacy grad_lse (empty).
template <typename T, typename Args>
absl::Status FillBackward(tensorflow::OpKernelContext* ctx, const tensorflow::TensorShape& reduced, int first,
                          GradientOutputFn grad_output, Args* args) {
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(first), reduced, "lse", "logits without the class axis"));
  TF_RETURN_IF_ERROR(
      CheckSameShape(ctx->input(first + 1), reduced, "grad_loss", "logits without the class axis"));
  TF_RETURN_IF_ERROR(CheckGradLseEmpty(ctx->input(first + 2).NumElements()));
  args->logits = core_ptr<T>(ctx->input(0));
  args->lse = ctx->input(first).flat<double>().data();
  args->grad_loss = core_ptr<T>(ctx->input(first + 1));
  tensorflow::Tensor* grad_logits;
  TF_RETURN_IF_ERROR(grad_output(ctx, &grad_logits));
  args->grad_logits = core_mutable_ptr<T>(grad_logits);
  return absl::OkStatus();
}

template <typename T, typename Label>
absl::Status PrepareSparseBackward(tensorflow::OpKernelContext* ctx, int64_t axis,
                                   SparseBackwardArgs<CoreType<T>, Label>* args,
                                   GradientOutputFn grad_output = ForwardOrAllocateGradient) {
  tensorflow::TensorShape reduced;
  TF_RETURN_IF_ERROR(SparseShapes(ctx, axis, &args->options, &args->layout, &reduced));
  args->labels = ctx->input(1).flat<Label>().data();
  return FillBackward<T>(ctx, reduced, 3, grad_output, args);
}

template <typename T>
absl::Status PrepareDenseBackward(tensorflow::OpKernelContext* ctx, int64_t axis,
                                  DenseBackwardArgs<CoreType<T>>* args,
                                  GradientOutputFn grad_output = ForwardOrAllocateGradient) {
  tensorflow::TensorShape reduced;
  TF_RETURN_IF_ERROR(LayoutOf(ctx->input(0).shape(), axis, &args->layout, &reduced));
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(1), ctx->input(0).shape(), "labels", "logits"));
  args->labels = core_ptr<T>(ctx->input(1));
  return FillBackward<T>(ctx, reduced, 2, grad_output, args);
}

// Runs fn(begin, end) over the layout's rows on TensorFlow's intra-op pool,
// in shards of whole cpu::row_units (results then do not depend on the pool's
// size).
template <typename Fn>
void ShardRows(tensorflow::OpKernelContext* ctx, const Layout& layout, int64_t cost_per_row, const Fn& fn) {
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  const cpu::RowUnits units = cpu::row_units(layout);
  tensorflow::Shard(threads->num_threads, threads->workers, units.count(), cost_per_row * units.size,
                    [&](int64_t begin, int64_t end) { fn(units.row(begin), units.row(end)); });
}

}  // namespace fused_xent
