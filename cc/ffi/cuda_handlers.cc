// XLA FFI handlers for the "CUDA" platform: the CUDA launchers on XLA's
// stream. Plain C++: the launchers' header declares cudaStream_t itself, so no
// CUDA header is needed.
//
// The launchers' workspace is the call's last result (ffi/handlers.h): XLA
// allocates it with the other buffers, so a call never allocates memory while
// it runs (XLA's scratch allocator may return nothing, which failed every
// dense gradient on a GPU), and a handler launches exactly the same kernels
// for the same shapes and buffers, which lets XLA trace it into a command
// buffer (CUDA graph).
//
// As with the TensorFlow GPU kernels, labels are not checked on the host (that
// would need a device-to-host copy and a synchronisation): a row whose label
// is out of range and not ignore_index gets NaN loss and gradient.
#include <cstdint>
#include <string>

#include "cuda/launchers.h"
#include "ffi/xent_handlers.h"

namespace fused_xent {
namespace xla_ffi {
namespace {

class CudaRunner {
 public:
  explicit CudaRunner(cudaStream_t stream) : stream_(stream) {}

  template <typename T, typename Label>
  ffi::Error Run(const SparseForwardArgs<T, Label>& args, const Workspace& workspace) {
    FX_FFI_RETURN_IF_ERROR(Aligned(workspace));
    return Launched(cuda::sparse_forward(args, workspace.data, stream_));
  }
  template <typename T, typename Label>
  ffi::Error Run(const SparseBackwardArgs<T, Label>& args, const Workspace&) {
    return Launched(cuda::sparse_backward(args, stream_));
  }
  template <typename T> ffi::Error Run(const DenseForwardArgs<T>& args, const Workspace& workspace) {
    FX_FFI_RETURN_IF_ERROR(Aligned(workspace));
    return Launched(cuda::dense_forward(args, workspace.data, stream_));
  }
  template <typename T> ffi::Error Run(const DenseBackwardArgs<T>& args, const Workspace& workspace) {
    FX_FFI_RETURN_IF_ERROR(Aligned(workspace));
    return Launched(cuda::dense_backward(args, workspace.data, stream_));
  }

 private:
  // The kernels keep 8-byte sums there (XLA's buffers are aligned far more).
  static ffi::Error Aligned(const Workspace& workspace) {
    if (workspace.needed == 0 || reinterpret_cast<uintptr_t>(workspace.data) % 16 == 0)
      return ffi::Error::Success();
    return InvalidArgument("workspace must be aligned to 16 bytes");
  }

  static ffi::Error Launched(const char* error) {
    if (error == nullptr) return ffi::Error::Success();
    return ffi::Error::Internal(std::string("fused_xent CUDA: ") + error);
  }

  cudaStream_t stream_;
};

}  // namespace

FX_FFI_DEFINE_TARGETS(cuda_targets, CudaRunner, .Ctx<ffi::PlatformStream<cudaStream_t>>(),
                      {ffi::Traits::kCmdBufferCompatible}, cudaStream_t)

}  // namespace xla_ffi
}  // namespace fused_xent
