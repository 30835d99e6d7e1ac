# fused_xent_add_kernel_target(<namespace> <float lanes> <compile flags>)
# Builds cc/core/cpu_kernels_target.cc as an object library for one
# instruction-set target; the flags stay on that library only.
function(fused_xent_add_kernel_target ns lanes flags)
  add_library(fused_xent_kernels_${ns} OBJECT cc/core/cpu_kernels_target.cc)
  target_include_directories(fused_xent_kernels_${ns} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cc)
  target_compile_definitions(fused_xent_kernels_${ns} PRIVATE FX_TARGET_NS=${ns} FX_LANES=${lanes})
  target_compile_options(fused_xent_kernels_${ns} PRIVATE ${FUSED_XENT_CORE_FLAGS} ${flags})
endfunction()
