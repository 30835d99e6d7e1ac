// Registers the XLA FFI handlers (cc/ffi) with TensorFlow's XLA when the op
// library loads, so the custom calls that the lowerings (xla_kernels.cc) emit
// find them: on "Host" always, on "CUDA" in CUDA builds.
#include <cstdio>
#include <string>

#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

// Exported by libtensorflow_framework; declared here because its own header
// (xla/ffi/ffi_api.h) clashes with the public xla/ffi/api/ffi.h.
namespace xla::ffi {
const XLA_FFI_Api* GetXlaFfiApi();
}  // namespace xla::ffi

namespace fused_xent {
namespace {

// A failed registration is reported, not fatal: XLA then says at compile time
// that the target has no handler, and the HLO lowering still works
// (FUSED_XENT_XLA_LOWERING=hlo).
void RegisterTargets(const char* platform, const xla_ffi::Target* targets, int count) {
  const XLA_FFI_Api* api = ::xla::ffi::GetXlaFfiApi();
  for (int i = 0; i < count; ++i) {
    XLA_FFI_Error* error =
        ::xla::ffi::Ffi::RegisterStaticHandler(api, targets[i].name, platform, targets[i].handler);
    if (error == nullptr) continue;
    const std::string message = ::xla::ffi::internal::GetErrorMessage(api, error);
    ::xla::ffi::internal::DestroyError(api, error);
    std::fprintf(stderr, "fused_xent: could not register XLA FFI handler %s for %s: %s\n", targets[i].name,
                 platform, message.c_str());
  }
}

const bool registered = [] {
  int count = 0;
  const xla_ffi::Target* cpu = xla_ffi::cpu_targets(&count);
  RegisterTargets("Host", cpu, count);
#if defined(FUSED_XENT_WITH_CUDA)
  const xla_ffi::Target* cuda = xla_ffi::cuda_targets(&count);
  RegisterTargets("CUDA", cuda, count);
#endif
  return true;
}();

}  // namespace
}  // namespace fused_xent
