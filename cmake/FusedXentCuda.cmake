# CUDA kernels (cc/cuda), their TensorFlow GPU registrations and their
# pybind11 bindings. FUSED_XENT_CUDA: AUTO builds them when nvcc is found,
# ON requires nvcc, OFF skips them.
#
# The .cu files include CUDA headers only; the CUDA runtime is linked
# statically and its symbols kept local, so a CUDA build still imports on a
# machine without libcudart (or without a GPU), and its runtime cannot be
# confused with the one TensorFlow or PyTorch loads.
set(FUSED_XENT_CUDA AUTO CACHE STRING "Build the CUDA kernels (AUTO, ON, OFF)")
set_property(CACHE FUSED_XENT_CUDA PROPERTY STRINGS AUTO ON OFF)
# Machine code for Ampere and Hopper (sm_86/89 run the sm_80 code), and PTX
# from which Turing and GPUs newer than Hopper compile theirs when the library
# loads. Override with CMAKE_CUDA_ARCHITECTURES (or CUDAARCHS).
set(FUSED_XENT_CUDA_DEFAULT_ARCHITECTURES "75-virtual;80-real;90-real")

set(FUSED_XENT_CUDA_FOUND OFF)
if(NOT FUSED_XENT_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    find_package(CUDAToolkit QUIET)
  endif()
  if(CMAKE_CUDA_COMPILER AND TARGET CUDA::cudart_static)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
      set(CMAKE_CUDA_ARCHITECTURES ${FUSED_XENT_CUDA_DEFAULT_ARCHITECTURES})
    endif()
    enable_language(CUDA)
    set(FUSED_XENT_CUDA_FOUND ON)
  elseif(FUSED_XENT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FUSED_XENT_CUDA=ON but no working nvcc and CUDA runtime (cudart_static) were found")
  else()
    message(STATUS "CUDA not found: building without the CUDA kernels")
  endif()
endif()

if(FUSED_XENT_CUDA_FOUND)
  add_library(fused_xent_cuda STATIC cc/cuda/sparse_kernels.cu cc/cuda/dense_kernels.cu)
  target_include_directories(fused_xent_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/cc)
  target_link_libraries(fused_xent_cuda PUBLIC CUDA::cudart_static)
  set_target_properties(fused_xent_cuda PROPERTIES
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Static
    POSITION_INDEPENDENT_CODE ON)
  # row_math.h calls std::numeric_limits (constexpr, host) from device code.
  target_compile_options(fused_xent_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3>)
  message(STATUS "CUDA kernels: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}")

  # Links the kernels into a Python extension or op library with the static
  # runtime's symbols (and the launchers') hidden inside it.
  function(fused_xent_link_cuda target)
    target_link_libraries(${target} PRIVATE fused_xent_cuda CUDA::cudart_static)
    target_link_options(${target} PRIVATE "LINKER:--exclude-libs,libcudart_static.a:libfused_xent_cuda.a")
  endfunction()

  if(TARGET _fused_xent_ops)
    target_sources(_fused_xent_ops PRIVATE cc/tf/xent_kernels_gpu.cc)
    fused_xent_link_cuda(_fused_xent_ops)
  endif()

  # Called by CMakeLists.txt for the pybind11 module.
  function(fused_xent_add_cuda_bindings target)
    target_sources(${target} PRIVATE ${PROJECT_SOURCE_DIR}/cc/py/cuda_bindings.cc)
    target_compile_definitions(${target} PRIVATE FUSED_XENT_WITH_CUDA)
    fused_xent_link_cuda(${target})
  endfunction()
endif()
