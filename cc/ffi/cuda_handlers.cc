// XLA FFI handlers for the "CUDA" platform: the CUDA launchers on XLA's
// stream, with their workspace from XLA's scratch allocator. Plain C++: the
// launchers' header declares cudaStream_t itself, so no CUDA header is needed.
//
// As with the TensorFlow GPU kernels, labels are not checked on the host (that
// would need a device-to-host copy and a synchronisation): a row whose label
// is out of range and not ignore_index gets NaN loss and gradient.
#include <optional>
#include <string>
#include <utility>

#include "cuda/launchers.h"
#include "ffi/xent_handlers.h"

namespace fused_xent {
namespace xla_ffi {
namespace {

class CudaRunner {
 public:
  CudaRunner(cudaStream_t stream, ffi::ScratchAllocator scratch) : stream_(stream), scratch_(std::move(scratch)) {}

  template <typename T, typename Label>
  ffi::Error Run(const SparseForwardArgs<T, Label>& args) {
    void* workspace;
    FX_FFI_RETURN_IF_ERROR(Workspace(cuda::forward_workspace_bytes(args.layout, sizeof(T)), &workspace));
    return Launched(cuda::sparse_forward(args, workspace, stream_));
  }
  template <typename T, typename Label>
  ffi::Error Run(const SparseBackwardArgs<T, Label>& args) {
    return Launched(cuda::sparse_backward(args, stream_));
  }
  template <typename T>
  ffi::Error Run(const DenseForwardArgs<T>& args) {
    void* workspace;
    FX_FFI_RETURN_IF_ERROR(Workspace(cuda::forward_workspace_bytes(args.layout, sizeof(T)), &workspace));
    return Launched(cuda::dense_forward(args, workspace, stream_));
  }
  template <typename T>
  ffi::Error Run(const DenseBackwardArgs<T>& args) {
    void* workspace;
    FX_FFI_RETURN_IF_ERROR(Workspace(cuda::dense_backward_workspace_bytes(args.layout, sizeof(T)), &workspace));
    return Launched(cuda::dense_backward(args, workspace, stream_));
  }

 private:
  // Device scratch memory, freed by XLA after the kernels that use it (its
  // allocator is ordered on the stream).
  ffi::Error Workspace(size_t bytes, void** data) {
    *data = nullptr;
    if (bytes == 0) return ffi::Error::Success();
    const std::optional<void*> memory = scratch_.Allocate(bytes, 256);
    if (!memory) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "fused_xent CUDA: no scratch memory");
    *data = *memory;
    return ffi::Error::Success();
  }

  static ffi::Error Launched(const char* error) {
    if (error == nullptr) return ffi::Error::Success();
    return ffi::Error::Internal(std::string("fused_xent CUDA: ") + error);
  }

  cudaStream_t stream_;
  ffi::ScratchAllocator scratch_;
};

#define FX_CUDA_CONTEXTS .Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::ScratchAllocator>()

}  // namespace

FX_FFI_DEFINE_TARGETS(cuda_targets, CudaRunner, FX_CUDA_CONTEXTS, cudaStream_t, ffi::ScratchAllocator)

}  // namespace xla_ffi
}  // namespace fused_xent
