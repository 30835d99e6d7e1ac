# fused_xent_find_tensorflow(<AUTO|ON>)
# Asks the Python interpreter's TensorFlow (tf.sysconfig) for its compile and
# link flags and wraps them in the imported target TensorFlow::framework, so
# the ABI define and include folders stay on our targets only.
# Sets FUSED_XENT_TF_FOUND, FUSED_XENT_TF_VERSION and FUSED_XENT_TF_LIBRARY_DIR
# in the caller's scope.
function(fused_xent_find_tensorflow mode)
  set(query [=[
import tensorflow as tf
print("@version=" + tf.__version__)
print("@compile=" + "|".join(tf.sysconfig.get_compile_flags()))
print("@link=" + "|".join(tf.sysconfig.get_link_flags()))
]=])
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${query}"
    OUTPUT_VARIABLE tf_out
    ERROR_VARIABLE tf_err
    RESULT_VARIABLE tf_result)
  if(NOT tf_result EQUAL 0)
    if(mode STREQUAL "ON")
      message(FATAL_ERROR "FUSED_XENT_TENSORFLOW=ON but TensorFlow cannot be imported:\n${tf_err}")
    endif()
    message(STATUS "TensorFlow not found: building the NumPy module only")
    return()
  endif()
  # Tagged lines, since TensorFlow may print banners of its own.
  string(REGEX MATCH "@version=([^\n]*)" _ "${tf_out}")
  set(version "${CMAKE_MATCH_1}")
  string(REGEX MATCH "@compile=([^\n]*)" _ "${tf_out}")
  string(REPLACE "|" ";" compile_flags "${CMAKE_MATCH_1}")
  string(REGEX MATCH "@link=([^\n]*)" _ "${tf_out}")
  string(REPLACE "|" ";" link_flags "${CMAKE_MATCH_1}")

  add_library(TensorFlow::framework INTERFACE IMPORTED GLOBAL)
  foreach(flag IN LISTS compile_flags)
    if(flag MATCHES "^-I(.*)")
      target_include_directories(TensorFlow::framework SYSTEM INTERFACE "${CMAKE_MATCH_1}")
    elseif(flag MATCHES "^-D(.*)")
      target_compile_definitions(TensorFlow::framework INTERFACE "${CMAKE_MATCH_1}")
    elseif(flag MATCHES "^--?std=")
      # The project sets C++17, the standard TensorFlow asks for.
    else()
      target_compile_options(TensorFlow::framework INTERFACE "${flag}")
    endif()
  endforeach()
  foreach(flag IN LISTS link_flags)
    if(flag MATCHES "^-L(.*)")
      target_link_directories(TensorFlow::framework INTERFACE "${CMAKE_MATCH_1}")
      set(FUSED_XENT_TF_LIBRARY_DIR "${CMAKE_MATCH_1}" PARENT_SCOPE)
    else()
      target_link_libraries(TensorFlow::framework INTERFACE "${flag}")
    endif()
  endforeach()
  message(STATUS "TensorFlow ${version}: compile ${compile_flags}; link ${link_flags}")
  set(FUSED_XENT_TF_FOUND ON PARENT_SCOPE)
  set(FUSED_XENT_TF_VERSION "${version}" PARENT_SCOPE)
endfunction()
