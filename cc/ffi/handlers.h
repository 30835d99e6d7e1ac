// The XLA FFI handlers of the four kernels, for any XLA that registers them
// (TensorFlow's, JAX's). Each takes the same operands and attributes on every
// platform; docs/xla.md lists them.
//
//   sparse_forward (logits, labels, class_weights) -> (loss, lse, workspace)
//   sparse_backward(logits, labels, class_weights, lse, grad_loss) -> (grad_logits, workspace)
//   dense_forward  (logits, labels) -> (loss, lse, workspace)
//   dense_backward (logits, labels, lse, grad_loss) -> (grad_logits, workspace)
//
// `workspace` is scratch memory of at least cuda::workspace_bytes(...) bytes
// (cuda/workspace.h; any dtype, e.g. uint8), which the caller declares as a
// result so that XLA allocates it with the other buffers; it holds nothing
// afterwards. The same size on every platform; the CPU handlers leave it alone.
//
// Attributes: axis (i64), label_smoothing (f32), z_loss (f32), softcap (f32, 0: none) and, for the
// sparse targets, ignore_index (i64) and has_ignore_index (i1).
#pragma once

#include "xla/ffi/api/c_api.h"

namespace fused_xent {
namespace xla_ffi {

struct Target {
  const char* name;          // custom-call target name (ffi/target_names.h)
  XLA_FFI_Handler* handler;  // to register for the platform of its table
};

// For XLA's "Host" platform ("cpu" in JAX). Sets *count.
const Target* cpu_targets(int* count);

#if defined(FUSED_XENT_WITH_CUDA)
// For XLA's "CUDA" platform; in CUDA builds only.
const Target* cuda_targets(int* count);
#endif

}  // namespace xla_ffi
}  // namespace fused_xent
