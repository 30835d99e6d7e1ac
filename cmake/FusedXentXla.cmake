# XLA lowerings of the ops (cc/tf/xla_kernels.cc), compiled into _fused_xent_ops.
# The file takes about a minute and 1.8 GB to compile (XLA's headers), so
# FUSED_XENT_XLA=OFF leaves the lowerings out; the same file then compiles in
# seconds to a stub that makes XLA fail with a message saying so.
# Sets FUSED_XENT_XLA_BUILT (ON when the lowerings are in the op library) and, when OFF,
# FUSED_XENT_XLA_REASON (why, for build_info()).
option(FUSED_XENT_XLA "Compile the XLA lowerings of the ops (jit_compile=True)" ON)

set(FUSED_XENT_XLA_BUILT OFF)
set(FUSED_XENT_XLA_REASON "no TensorFlow op library in this build")
if(TARGET _fused_xent_ops)
  set(xla_source ${CMAKE_CURRENT_SOURCE_DIR}/cc/tf/xla_kernels.cc)
  target_sources(_fused_xent_ops PRIVATE ${xla_source})
  if(FUSED_XENT_XLA)
    # The wheel ships XLA's headers and libtensorflow_cc exports its symbols, but
    # tf.sysconfig lists neither, nor two third-party folders those headers include.
    get_target_property(tf_includes TensorFlow::framework INTERFACE_INCLUDE_DIRECTORIES)
    # XLA's builder is under xla/client/ up to TensorFlow 2.18, xla/hlo/builder/ from 2.19.
    set(tf_include "")
    foreach(dir IN LISTS tf_includes)
      if(EXISTS "${dir}/tensorflow/compiler/tf2xla/xla_op_kernel.h"
         AND (EXISTS "${dir}/xla/hlo/builder/xla_builder.h" OR EXISTS "${dir}/xla/client/xla_builder.h"))
        set(tf_include "${dir}")
      endif()
    endforeach()
    if(tf_include AND EXISTS "${FUSED_XENT_TF_LIBRARY_DIR}/libtensorflow_cc.so.2")
      set_source_files_properties(${xla_source} PROPERTIES
        COMPILE_DEFINITIONS FUSED_XENT_WITH_XLA
        INCLUDE_DIRECTORIES "${tf_include}/external/highwayhash;${tf_include}/external/farmhash_archive/src")
      target_link_libraries(_fused_xent_ops PRIVATE -l:libtensorflow_cc.so.2)
      set(FUSED_XENT_XLA_BUILT ON)
      set(FUSED_XENT_XLA_REASON "")
      message(STATUS "fused_xent: XLA lowerings enabled")
    else()
      set(FUSED_XENT_XLA_REASON "TensorFlow ${FUSED_XENT_TF_VERSION} lacks XLA's headers or libtensorflow_cc.so.2")
      message(WARNING "fused_xent: TensorFlow's XLA headers or libtensorflow_cc.so.2 not found; "
                      "building without XLA lowerings (as with -DFUSED_XENT_XLA=OFF)")
    endif()
  else()
    set(FUSED_XENT_XLA_REASON "built with FUSED_XENT_XLA=OFF")
    message(STATUS "fused_xent: XLA lowerings disabled (FUSED_XENT_XLA=OFF)")
  endif()
endif()
