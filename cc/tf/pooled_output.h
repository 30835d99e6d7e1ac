// Gradient outputs of the CPU backward kernels, from core/buffer_pool.h when
// the logits buffer cannot be reused.
#pragma once

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace fused_xent {

// Output 0, shaped like input 0 (the logits): the logits buffer when
// TensorFlow can forward it; otherwise a pooled block when the pool serves its
// size and the output's allocator attributes ask for nothing but host memory;
// otherwise TensorFlow's allocator. The GPU kernels keep TensorFlow's allocator.
absl::Status ForwardOrPoolGradient(tensorflow::OpKernelContext* ctx, tensorflow::Tensor** grad);

}  // namespace fused_xent
