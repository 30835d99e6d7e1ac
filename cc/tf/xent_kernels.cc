// CPU OpKernels: validate inputs, fill the core's argument structs, shard rows.
#include <string>

#include "tf/kernel_support.h"
#include "core/cpu_kernels.h"
#include "core/memory_hints.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace fused_xent {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

template <typename Label>
absl::Status CheckLabels(const Tensor& labels, int64_t classes, const Options& options) {
  const Label* data = labels.flat<Label>().data();
  const int64_t bad = cpu::find_invalid_label(data, labels.NumElements(), classes, options);
  if (bad < 0) return absl::OkStatus();
  std::string message = absl::StrCat("Received a label value of ", static_cast<int64_t>(data[bad]),
                                     " which is outside the valid range of [0, ", classes, ")");
  if (options.has_ignore_index) absl::StrAppend(&message, " and is not ignore_index (", options.ignore_index, ")");
  return absl::InvalidArgumentError(message);
}

// Validation shared by the sparse forward and backward kernels.
template <typename Label>
absl::Status PrepareSparse(OpKernelContext* ctx, int64_t axis, Options* options, Layout* layout,
                           TensorShape* reduced) {
  TF_RETURN_IF_ERROR(LayoutOf(ctx->input(0).shape(), axis, layout, reduced));
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(1), *reduced, "labels", "logits without the class axis"));
  TF_RETURN_IF_ERROR(ClassWeightsOf(ctx->input(2), layout->classes, options));
  return CheckLabels<Label>(ctx->input(1), layout->classes, *options);
}

template <typename T, typename Label>
class SparseForwardOp : public OpKernel {
 public:
  explicit SparseForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseForwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    TensorShape reduced;
    OP_REQUIRES_OK(ctx, PrepareSparse<Label>(ctx, axis_, &args.options, &args.layout, &reduced));
    Tensor *loss, *lse;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, reduced, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, reduced, &lse));
    args.logits = core_ptr<T>(ctx->input(0));
    args.labels = ctx->input(1).flat<Label>().data();
    args.loss = core_mutable_ptr<T>(loss);
    args.lse = lse->flat<double>().data();
    ShardRows(ctx, args.layout.rows(), cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::sparse_forward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

// The gradient overwrites the logits buffer when TensorFlow lets it (the
// logits are not needed elsewhere), so a training step needs no new N x C buffer.
template <typename T, typename Label>
class SparseBackwardOp : public OpKernel {
 public:
  explicit SparseBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseBackwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    TensorShape reduced;
    OP_REQUIRES_OK(ctx, PrepareSparse<Label>(ctx, axis_, &args.options, &args.layout, &reduced));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(3), reduced, "lse", "labels"));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(4), reduced, "grad_loss", "labels"));
    const Tensor& logits = ctx->input(0);
    args.logits = core_ptr<T>(logits);
    args.labels = ctx->input(1).flat<Label>().data();
    args.lse = ctx->input(3).flat<double>().data();
    args.grad_loss = core_ptr<T>(ctx->input(4));
    OP_REQUIRES_OK(ctx, GradLseOf(ctx->input(5), reduced, &args.grad_lse));
    Tensor* grad_logits;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, logits.shape(), &grad_logits));
    advise_huge_pages(grad_logits->data(), grad_logits->TotalBytes());
    args.grad_logits = core_mutable_ptr<T>(grad_logits);
    ShardRows(ctx, args.layout.rows(), cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::sparse_backward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T>
class DenseForwardOp : public OpKernel {
 public:
  explicit DenseForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseForwardArgs<CoreType<T>> args;
    args.options = options_;
    TensorShape reduced;
    const Tensor& logits = ctx->input(0);
    OP_REQUIRES_OK(ctx, LayoutOf(logits.shape(), axis_, &args.layout, &reduced));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(1), logits.shape(), "labels", "logits"));
    Tensor *loss, *lse;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, reduced, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, reduced, &lse));
    args.logits = core_ptr<T>(logits);
    args.labels = core_ptr<T>(ctx->input(1));
    args.loss = core_mutable_ptr<T>(loss);
    args.lse = lse->flat<double>().data();
    ShardRows(ctx, args.layout.rows(), 2 * cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::dense_forward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T>
class DenseBackwardOp : public OpKernel {
 public:
  explicit DenseBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseBackwardArgs<CoreType<T>> args;
    args.options = options_;
    TensorShape reduced;
    const Tensor& logits = ctx->input(0);
    OP_REQUIRES_OK(ctx, LayoutOf(logits.shape(), axis_, &args.layout, &reduced));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(1), logits.shape(), "labels", "logits"));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(2), reduced, "lse", "logits without the class axis"));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(3), reduced, "grad_loss", "logits without the class axis"));
    args.logits = core_ptr<T>(logits);
    args.labels = core_ptr<T>(ctx->input(1));
    args.lse = ctx->input(2).flat<double>().data();
    args.grad_loss = core_ptr<T>(ctx->input(3));
    OP_REQUIRES_OK(ctx, GradLseOf(ctx->input(4), reduced, &args.grad_lse));
    Tensor* grad_logits;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, logits.shape(), &grad_logits));
    advise_huge_pages(grad_logits->data(), grad_logits->TotalBytes());
    args.grad_logits = core_mutable_ptr<T>(grad_logits);
    ShardRows(ctx, args.layout.rows(), 2 * cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::dense_backward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

#define FX_REGISTER_SPARSE(T, Label)                                                         \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropy")                        \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<Label>("Tlabels"),                             \
                          SparseForwardOp<T, Label>);                                        \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropyGrad")                    \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<Label>("Tlabels"),                             \
                          SparseBackwardOp<T, Label>);

#define FX_REGISTER_DENSE(T)                                                                               \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
                          DenseForwardOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropyGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          DenseBackwardOp<T>);

#define FX_REGISTER_ALL(T)         \
  FX_REGISTER_SPARSE(T, int32_t)   \
  FX_REGISTER_SPARSE(T, int64_t)   \
  FX_REGISTER_DENSE(T)

FX_REGISTER_ALL(Eigen::half)
FX_REGISTER_ALL(Eigen::bfloat16)
FX_REGISTER_ALL(float)
FX_REGISTER_ALL(double)

}  // namespace
}  // namespace fused_xent
