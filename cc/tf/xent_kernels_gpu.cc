// GPU OpKernels (built when FUSED_XENT_CUDA finds nvcc): the CPU kernels'
// validation of shapes and attrs, then the CUDA launchers on TensorFlow's
// compute stream. Plain C++: the launchers' header has no CUDA, TF or Eigen
// types, and the stream comes from StreamExecutor's platform handle, so this
// file needs neither GOOGLE_CUDA nor CUDA headers.
//
// Labels are not checked here: that would need a device-to-host copy and a
// synchronisation. A row whose label is out of range (and not ignore_index)
// gets a NaN loss and a NaN gradient instead of the CPU's InvalidArgument.
#include "cuda/launchers.h"
#include "tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "xla/stream_executor/stream.h"

namespace fused_xent {
namespace {

using ::tensorflow::DEVICE_GPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

absl::Status StreamOf(OpKernelContext* ctx, cudaStream_t* stream) {
  const auto* device_context = ctx->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr) {
    return absl::InternalError("fused_xent: no GPU stream for this kernel");
  }
  *stream = static_cast<cudaStream_t>(device_context->stream()->platform_specific_handle().stream);
  return absl::OkStatus();
}

absl::Status Launched(const char* error) {
  return error == nullptr ? absl::OkStatus() : absl::InternalError(absl::StrCat("fused_xent CUDA: ", error));
}

// Device scratch memory for `bytes` (none when 0), released after the kernels
// that use it since TensorFlow's allocator is ordered on the compute stream.
absl::Status WorkspaceOf(OpKernelContext* ctx, size_t bytes, Tensor* scratch, void** data) {
  *data = nullptr;
  if (bytes == 0) return absl::OkStatus();
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({static_cast<int64_t>(bytes)}), scratch));
  *data = scratch->flat<int8_t>().data();
  return absl::OkStatus();
}

// The sparse kernels' shape checks (labels stay on the device).
absl::Status PrepareSparse(OpKernelContext* ctx, int64_t axis, Options* options, Layout* layout, TensorShape* reduced) {
  TF_RETURN_IF_ERROR(LayoutOf(ctx->input(0).shape(), axis, layout, reduced));
  TF_RETURN_IF_ERROR(CheckSameShape(ctx->input(1), *reduced, "labels", "logits without the class axis"));
  return ClassWeightsOf(ctx->input(2), layout->classes, options);
}

template <typename T, typename Label>
class SparseForwardGpuOp : public OpKernel {
 public:
  explicit SparseForwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseForwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    TensorShape reduced;
    OP_REQUIRES_OK(ctx, PrepareSparse(ctx, axis_, &args.options, &args.layout, &reduced));
    Tensor *loss, *lse, scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, reduced, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, reduced, &lse));
    void* workspace;
    OP_REQUIRES_OK(ctx, WorkspaceOf(ctx, cuda::forward_workspace_bytes(args.layout, sizeof(T)), &scratch, &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    args.logits = core_ptr<T>(ctx->input(0));
    args.labels = ctx->input(1).flat<Label>().data();
    args.loss = core_mutable_ptr<T>(loss);
    args.lse = lse->flat<double>().data();
    OP_REQUIRES_OK(ctx, Launched(cuda::sparse_forward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

// As on the CPU, the gradient overwrites the logits buffer when TensorFlow allows.
template <typename T, typename Label>
class SparseBackwardGpuOp : public OpKernel {
 public:
  explicit SparseBackwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseBackwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    TensorShape reduced;
    OP_REQUIRES_OK(ctx, PrepareSparse(ctx, axis_, &args.options, &args.layout, &reduced));
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
    args.grad_logits = core_mutable_ptr<T>(grad_logits);
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::sparse_backward(args, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T>
class DenseForwardGpuOp : public OpKernel {
 public:
  explicit DenseForwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseForwardArgs<CoreType<T>> args;
    args.options = options_;
    TensorShape reduced;
    const Tensor& logits = ctx->input(0);
    OP_REQUIRES_OK(ctx, LayoutOf(logits.shape(), axis_, &args.layout, &reduced));
    OP_REQUIRES_OK(ctx, CheckSameShape(ctx->input(1), logits.shape(), "labels", "logits"));
    Tensor *loss, *lse, scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, reduced, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, reduced, &lse));
    void* workspace;
    OP_REQUIRES_OK(ctx, WorkspaceOf(ctx, cuda::forward_workspace_bytes(args.layout, sizeof(T)), &scratch, &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    args.logits = core_ptr<T>(logits);
    args.labels = core_ptr<T>(ctx->input(1));
    args.loss = core_mutable_ptr<T>(loss);
    args.lse = lse->flat<double>().data();
    OP_REQUIRES_OK(ctx, Launched(cuda::dense_forward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T>
class DenseBackwardGpuOp : public OpKernel {
 public:
  explicit DenseBackwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
    args.grad_logits = core_mutable_ptr<T>(grad_logits);
    Tensor scratch;
    void* workspace;
    OP_REQUIRES_OK(ctx, WorkspaceOf(ctx, cuda::dense_backward_workspace_bytes(args.layout, sizeof(T)), &scratch,
                                    &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::dense_backward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

#define FX_REGISTER_SPARSE_GPU(T, Label)                                                     \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropy")                        \
                              .Device(DEVICE_GPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<Label>("Tlabels"),                             \
                          SparseForwardGpuOp<T, Label>);                                     \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropyGrad")                    \
                              .Device(DEVICE_GPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<Label>("Tlabels"),                             \
                          SparseBackwardGpuOp<T, Label>);

#define FX_REGISTER_DENSE_GPU(T)                                                                               \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(DEVICE_GPU).TypeConstraint<T>("T"),     \
                          DenseForwardGpuOp<T>);                                                               \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropyGrad").Device(DEVICE_GPU).TypeConstraint<T>("T"), \
                          DenseBackwardGpuOp<T>);

#define FX_REGISTER_ALL_GPU(T)         \
  FX_REGISTER_SPARSE_GPU(T, int32_t)   \
  FX_REGISTER_SPARSE_GPU(T, int64_t)   \
  FX_REGISTER_DENSE_GPU(T)

FX_REGISTER_ALL_GPU(Eigen::half)
FX_REGISTER_ALL_GPU(Eigen::bfloat16)
FX_REGISTER_ALL_GPU(float)
FX_REGISTER_ALL_GPU(double)

}  // namespace
}  // namespace fused_xent
