# XLA FFI handlers of the kernels (cc/ffi), built against XLA's header-only FFI
# API (xla/ffi/api/ffi.h) and nothing else. The header comes from TensorFlow's
# include folder, or from JAX's (jax.ffi.include_dir()) where TensorFlow lacks
# it; FUSED_XENT_XLA_FFI_INCLUDE_DIR names another folder.
# The handlers go into the pybind11 module, which hands them to JAX as PyCapsules,
# and, where TensorFlow ships the header itself (2.20 on: its XLA has the typed
# FFI), into the op library, which registers them with TensorFlow's XLA.
# Sets FUSED_XENT_FFI_FOUND, FUSED_XENT_TF_XLA_FFI (the op library registers
# them) and, when XLA gets the HLO lowering only, FUSED_XENT_XLA_REASON.
set(FUSED_XENT_XLA_FFI_INCLUDE_DIR "" CACHE PATH "Folder holding xla/ffi/api/ffi.h (found automatically when empty)")

set(tf_ffi_include "")
if(TARGET TensorFlow::framework)
  get_target_property(tf_includes TensorFlow::framework INTERFACE_INCLUDE_DIRECTORIES)
  foreach(dir IN LISTS tf_includes)
    if(EXISTS "${dir}/xla/ffi/api/ffi.h")
      set(tf_ffi_include "${dir}")
    endif()
  endforeach()
endif()
set(ffi_include "${FUSED_XENT_XLA_FFI_INCLUDE_DIR}")
if(NOT ffi_include)
  set(ffi_include "${tf_ffi_include}")
endif()
if(NOT ffi_include)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
    OUTPUT_VARIABLE jax_include OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE jax_result)
  if(jax_result EQUAL 0 AND EXISTS "${jax_include}/xla/ffi/api/ffi.h")
    set(ffi_include "${jax_include}")
  endif()
endif()

set(FUSED_XENT_FFI_FOUND OFF)
if(ffi_include AND EXISTS "${ffi_include}/xla/ffi/api/ffi.h")
  set(FUSED_XENT_FFI_FOUND ON)
  set(ffi_sources cc/ffi/cpu_handlers.cc)
  if(FUSED_XENT_CUDA_FOUND)
    list(APPEND ffi_sources cc/ffi/cuda_handlers.cc)
  endif()
  add_library(fused_xent_ffi STATIC ${ffi_sources})
  target_include_directories(fused_xent_ffi SYSTEM PUBLIC "${ffi_include}")
  target_link_libraries(fused_xent_ffi PUBLIC fused_xent_core)
  target_compile_options(fused_xent_ffi PRIVATE ${FUSED_XENT_CORE_FLAGS})
  if(FUSED_XENT_CUDA_FOUND)
    target_compile_definitions(fused_xent_ffi PUBLIC FUSED_XENT_WITH_CUDA)
    target_link_libraries(fused_xent_ffi PUBLIC fused_xent_cuda)
  endif()
  message(STATUS "fused_xent: XLA FFI handlers from ${ffi_include}/xla/ffi/api/ffi.h")
else()
  message(STATUS "fused_xent: xla/ffi/api/ffi.h not found (no TensorFlow or JAX headers): no XLA FFI handlers")
endif()

set(FUSED_XENT_TF_XLA_FFI OFF)
if(FUSED_XENT_FFI_FOUND AND tf_ffi_include AND TARGET _fused_xent_ops)
  set(FUSED_XENT_TF_XLA_FFI ON)
  target_sources(_fused_xent_ops PRIVATE cc/tf/ffi_registration.cc)
  target_link_libraries(_fused_xent_ops PRIVATE fused_xent_ffi)
  target_compile_definitions(_fused_xent_ops PRIVATE FUSED_XENT_WITH_XLA_FFI)
elseif(FUSED_XENT_XLA_BUILT)
  string(CONCAT FUSED_XENT_XLA_REASON "TensorFlow ${FUSED_XENT_TF_VERSION} has no XLA FFI header "
                "(xla/ffi/api/ffi.h, shipped from TensorFlow 2.20 on): the HLO lowering only")
  message(STATUS "fused_xent: ${FUSED_XENT_XLA_REASON}")
endif()
