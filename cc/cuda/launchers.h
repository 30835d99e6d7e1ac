// Host API of the CUDA kernels. Free of CUDA, TensorFlow and Eigen headers so
// the TF op kernels and the pybind11 module can include it as plain C++: the
// launchers take the core's argument structs (device pointers), a workspace
// and a stream, enqueue their kernels and return without synchronising.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/xent_params.h"
#include "cuda/workspace.h"

// The same type as the CUDA runtime's cudaStream_t (a CUstream handle).
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace fused_xent {
namespace cuda {

// Every launcher returns nullptr on success, else a static message (a CUDA
// error string or a size limit). Rows with an out-of-range label (and not
// ignore_index) get a NaN loss and NaN gradients: checking labels on the host
// would need a device-to-host copy and a synchronisation.

// A launcher's `workspace` is device memory of at least workspace_bytes(...)
// (cuda/workspace.h) bytes, aligned to 16 bytes (any allocator's blocks are),
// which it may overwrite; null when that size is 0. A launcher that needs one
// and gets null returns an error and launches nothing.

template <typename T, typename Label>
const char* sparse_forward(const SparseForwardArgs<T, Label>& args, void* workspace, cudaStream_t stream);

// Needs no workspace.
template <typename T, typename Label>
const char* sparse_backward(const SparseBackwardArgs<T, Label>& args, cudaStream_t stream);

template <typename T>
const char* dense_forward(const DenseForwardArgs<T>& args, void* workspace, cudaStream_t stream);

template <typename T>
const char* dense_backward(const DenseBackwardArgs<T>& args, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_xent
