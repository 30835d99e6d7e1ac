// CPU OpKernels: validate inputs, fill the core's argument structs, shard rows.
#include "tf/kernel_support.h"
#include "core/cpu_kernels.h"
#include "core/label_check.h"
#include "tf/pooled_output.h"
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

// Checks the class weights, then runs kernel(args, begin, end) over the rows,
// each shard checking its own labels first (in parallel, and they are read
// next anyway); fails afterwards naming the first invalid label.
template <typename Args, typename Kernel>
absl::Status ShardSparseRows(OpKernelContext* ctx, const Args& args, const Kernel& kernel) {
  TF_RETURN_IF_ERROR(CheckClassWeightValues(args.options, args.layout.classes));
  FirstInvalidLabel first_invalid;
  ShardRows(ctx, args.layout, cpu::row_cost_cycles(args.layout.classes), [&](int64_t begin, int64_t end) {
    first_invalid.check(args.labels, begin, end, args.layout.classes, args.options);
    kernel(args, begin, end);
  });
  if (!first_invalid.found()) return absl::OkStatus();
  const int64_t value = static_cast<int64_t>(args.labels[first_invalid.row()]);
  return absl::InvalidArgumentError(invalid_label_message(value, args.layout.classes, args.options));
}

template <typename T, typename Label> class SparseForwardOp : public OpKernel {
 public:
  explicit SparseForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseForwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, (PrepareSparseForward<T, Label>(ctx, axis_, &args)));
    OP_REQUIRES_OK(ctx, ShardSparseRows(ctx, args, [](const auto& a, int64_t begin, int64_t end) {
                     cpu::sparse_forward(a, begin, end);
                   }));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T, typename Label> class SparseBackwardOp : public OpKernel {
 public:
  explicit SparseBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseBackwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, (PrepareSparseBackward<T, Label>(ctx, axis_, &args, ForwardOrPoolGradient)));
    OP_REQUIRES_OK(ctx, ShardSparseRows(ctx, args, [](const auto& a, int64_t begin, int64_t end) {
                     cpu::sparse_backward(a, begin, end);
                   }));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T> class DenseForwardOp : public OpKernel {
 public:
  explicit DenseForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseForwardArgs<CoreType<T>> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, PrepareDenseForward<T>(ctx, axis_, &args));
    ShardRows(ctx, args.layout, 2 * cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::dense_forward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T> class DenseBackwardOp : public OpKernel {
 public:
  explicit DenseBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseBackwardArgs<CoreType<T>> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, PrepareDenseBackward<T>(ctx, axis_, &args, ForwardOrPoolGradient));
    ShardRows(ctx, args.layout, 2 * cpu::row_cost_cycles(args.layout.classes),
              [&args](int64_t begin, int64_t end) { cpu::dense_backward(args, begin, end); });
  }

 private:
  Options options_;
  int64_t axis_;
};

#define FX_REGISTER_SPARSE(T, Label)                                      \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropy")     \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .TypeConstraint<Label>("Tlabels"),          \
                          SparseForwardOp<T, Label>);                     \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropyGrad") \
                              .Device(DEVICE_CPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .TypeConstraint<Label>("Tlabels"),          \
                          SparseBackwardOp<T, Label>);

#define FX_REGISTER_DENSE(T)                                                                               \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          DenseForwardOp<T>);                                                              \
  REGISTER_KERNEL_BUILDER(                                                                                 \
      Name("FusedXent>SoftmaxCrossEntropyGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),                 \
      DenseBackwardOp<T>);

#define FX_REGISTER_ALL(T)       \
  FX_REGISTER_SPARSE(T, int32_t) \
  FX_REGISTER_SPARSE(T, int64_t) \
  FX_REGISTER_DENSE(T)

FX_REGISTER_ALL(Eigen::half)
FX_REGISTER_ALL(Eigen::bfloat16)
FX_REGISTER_ALL(float)
FX_REGISTER_ALL(double)

}  // namespace
}  // namespace fused_xent
