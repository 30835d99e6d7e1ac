// The device workspace of the CUDA launchers, in bytes, from the shape alone.
// Plain C++ and in the core library (cuda/workspace.cc), so that every caller
// sizes it with the kernels' own rule (cuda/plan.h), in builds with or without
// CUDA: the launchers' callers (TensorFlow GPU kernels, pybind11 bindings), the
// XLA FFI handlers, which check it, and whoever declares it as a result of the
// custom call: fused_xent.jax (through fused_xent._core.workspace_bytes) and
// the TensorFlow XLA lowering. The size does not depend on the platform the
// call runs on, so one lowering serves the CPU and CUDA handlers alike.
#pragma once

#include <cstddef>

#include "core/xent_params.h"

namespace fused_xent {
namespace cuda {

// The four kernels, as the FFI targets name them.
enum class Kernel { kSparseForward, kSparseBackward, kDenseForward, kDenseBackward };

// 0 when the kernel needs none: a forward keeps one partial RowSums per chunk
// of a row split across blocks (none when no row is split); the dense
// backward keeps each chunk's label sum; the sparse backward needs nothing.
size_t workspace_bytes(Kernel kernel, const Layout& layout, int element_size);

inline size_t forward_workspace_bytes(const Layout& layout, int element_size) {
  return workspace_bytes(Kernel::kSparseForward, layout, element_size);  // the dense forward's is the same
}
inline size_t dense_backward_workspace_bytes(const Layout& layout, int element_size) {
  return workspace_bytes(Kernel::kDenseBackward, layout, element_size);
}

}  // namespace cuda
}  // namespace fused_xent
