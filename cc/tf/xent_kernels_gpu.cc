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

template <typename T, typename Label> class SparseForwardGpuOp : public OpKernel {
 public:
  explicit SparseForwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseForwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, (PrepareSparseForward<T, Label>(ctx, axis_, &args)));
    Tensor scratch;
    void* workspace;
    OP_REQUIRES_OK(
        ctx, WorkspaceOf(ctx, cuda::forward_workspace_bytes(args.layout, sizeof(T)), &scratch, &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::sparse_forward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

// As on the CPU, the gradient overwrites the logits buffer when TensorFlow allows.
template <typename T, typename Label> class SparseBackwardGpuOp : public OpKernel {
 public:
  explicit SparseBackwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/true, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseBackwardArgs<CoreType<T>, Label> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, (PrepareSparseBackward<T, Label>(ctx, axis_, &args)));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::sparse_backward(args, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T> class DenseForwardGpuOp : public OpKernel {
 public:
  explicit DenseForwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseForwardArgs<CoreType<T>> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, PrepareDenseForward<T>(ctx, axis_, &args));
    Tensor scratch;
    void* workspace;
    OP_REQUIRES_OK(
        ctx, WorkspaceOf(ctx, cuda::forward_workspace_bytes(args.layout, sizeof(T)), &scratch, &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::dense_forward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

template <typename T> class DenseBackwardGpuOp : public OpKernel {
 public:
  explicit DenseBackwardGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, /*sparse=*/false, &options_, &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    DenseBackwardArgs<CoreType<T>> args;
    args.options = options_;
    OP_REQUIRES_OK(ctx, PrepareDenseBackward<T>(ctx, axis_, &args));
    Tensor scratch;
    void* workspace;
    OP_REQUIRES_OK(ctx, WorkspaceOf(ctx, cuda::dense_backward_workspace_bytes(args.layout, sizeof(T)),
                                    &scratch, &workspace));
    cudaStream_t stream;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, &stream));
    OP_REQUIRES_OK(ctx, Launched(cuda::dense_backward(args, workspace, stream)));
  }

 private:
  Options options_;
  int64_t axis_;
};

#define FX_REGISTER_SPARSE_GPU(T, Label)                                  \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropy")     \
                              .Device(DEVICE_GPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .TypeConstraint<Label>("Tlabels"),          \
                          SparseForwardGpuOp<T, Label>);                  \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropyGrad") \
                              .Device(DEVICE_GPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .TypeConstraint<Label>("Tlabels"),          \
                          SparseBackwardGpuOp<T, Label>);

#define FX_REGISTER_DENSE_GPU(T)                                                                           \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(DEVICE_GPU).TypeConstraint<T>("T"), \
                          DenseForwardGpuOp<T>);                                                           \
  REGISTER_KERNEL_BUILDER(                                                                                 \
      Name("FusedXent>SoftmaxCrossEntropyGrad").Device(DEVICE_GPU).TypeConstraint<T>("T"),                 \
      DenseBackwardGpuOp<T>);

#define FX_REGISTER_ALL_GPU(T)       \
  FX_REGISTER_SPARSE_GPU(T, int32_t) \
  FX_REGISTER_SPARSE_GPU(T, int64_t) \
  FX_REGISTER_DENSE_GPU(T)

FX_REGISTER_ALL_GPU(Eigen::half)
FX_REGISTER_ALL_GPU(Eigen::bfloat16)
FX_REGISTER_ALL_GPU(float)
FX_REGISTER_ALL_GPU(double)

}  // namespace
}  // namespace fused_xent
