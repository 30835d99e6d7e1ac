"""Type information for fused_xent._core, the pybind11 module of the C++ kernels (private: use
fused_xent.numpy, fused_xent.cuda and fused_xent.jax). Names, order and optional parameters are
those of the bindings (cc/py/module.cc, cc/py/cuda_bindings.cc); tests/package/test_typing.py checks them
against the compiled module's signatures."""

from typing import Any, SupportsFloat, SupportsIndex, SupportsInt

import numpy
import numpy.typing

_Int = SupportsInt | SupportsIndex
_Float = SupportsFloat | SupportsIndex

# tensorflow_version, cuda, simd, xla, xla_ffi_platforms and version of this build.
def build_info() -> dict[str, Any]: ...

# The XLA FFI handlers as PyCapsules, by platform ("cpu", "cuda") and target name.
def ffi_targets() -> dict[str, dict[str, Any]]: ...

# Bytes of scratch memory the CUDA kernel `kind` ("sparse_forward", "sparse_backward",
# "dense_forward", "dense_backward") needs for logits viewed as [outer, classes, inner] with
# elements of element_size bytes: the size of the FFI targets' workspace result (docs/xla.md)
# and of the CUDA bindings' workspace argument; the same in every build.
def workspace_bytes(kind: str, outer: _Int, classes: _Int, inner: _Int, element_size: _Int) -> int: ...

# NumPy arrays (C-contiguous), with the arguments of the CUDA bindings below minus the stream:
# a forward writes loss and lse (the float64 row logsumexp); a backward reads that lse and writes
# grad_logits (which may be logits itself).

_ClassWeights = numpy.typing.ArrayLike  # float32 vector, one weight per class

def sparse_forward(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    ignore_index: _Int | None,
    class_weights: _ClassWeights | None,
    loss: numpy.ndarray,
    lse: numpy.ndarray,
    total_classes: _Int = 0,
    absent_label: _Int = 0,
    softcap: _Float = 0.0,
) -> None: ...
def sparse_backward(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    ignore_index: _Int | None,
    class_weights: _ClassWeights | None,
    lse: numpy.ndarray,
    grad_loss: numpy.ndarray,
    grad_logits: numpy.ndarray,
    total_classes: _Int = 0,
    absent_label: _Int = 0,
    softcap: _Float = 0.0,
) -> None: ...
def dense_forward(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    loss: numpy.ndarray,
    lse: numpy.ndarray,
    total_classes: _Int = 0,
    label_sums: numpy.ndarray | None = None,
    softcap: _Float = 0.0,
) -> None: ...
def dense_backward(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    lse: numpy.ndarray,
    grad_loss: numpy.ndarray,
    grad_logits: numpy.ndarray,
    total_classes: _Int = 0,
    label_sums: numpy.ndarray | None = None,
    softcap: _Float = 0.0,
) -> None: ...

# Forward and, when grad_loss and grad_logits are given, backward in one call (the benchmarks use it).

def sparse(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    ignore_index: _Int | None,
    class_weights: numpy.typing.ArrayLike | None,
    loss: numpy.ndarray,
    lse: numpy.ndarray,
    grad_loss: numpy.ndarray | None,
    grad_logits: numpy.ndarray | None,
    softcap: _Float = 0.0,
) -> None: ...
def dense(
    dtype: str,
    logits: numpy.ndarray,
    labels: numpy.ndarray,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    loss: numpy.ndarray,
    lse: numpy.ndarray,
    grad_loss: numpy.ndarray | None,
    grad_logits: numpy.ndarray | None,
    softcap: _Float = 0.0,
) -> None: ...

# CUDA builds only (build_info()["cuda"]): arrays with __cuda_array_interface__, and a CUDA
# stream handle; the kernels are enqueued on it and the calls return without synchronising.
# workspace: device memory of at least workspace_bytes(...) bytes, or None to have the binding
# allocate it (stream-ordered) when the kernel needs one. softcap (every kernel binding): the
# loss reads softcap * tanh(logits / softcap) and the gradient is for the logits; 0: no cap.

def cuda_device_count() -> int: ...
def cuda_sparse_forward(
    dtype: str,
    logits: object,
    labels: object,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    ignore_index: _Int | None,
    class_weights: object | None,
    loss: object,
    lse: object,
    stream: _Int,
    workspace: object | None = None,
    softcap: _Float = 0.0,
) -> None: ...
def cuda_sparse_backward(
    dtype: str,
    logits: object,
    labels: object,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    ignore_index: _Int | None,
    class_weights: object | None,
    lse: object,
    grad_loss: object,
    grad_logits: object,
    stream: _Int,
    softcap: _Float = 0.0,
) -> None: ...
def cuda_dense_forward(
    dtype: str,
    logits: object,
    labels: object,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    loss: object,
    lse: object,
    stream: _Int,
    workspace: object | None = None,
    softcap: _Float = 0.0,
) -> None: ...
def cuda_dense_backward(
    dtype: str,
    logits: object,
    labels: object,
    outer: _Int,
    classes: _Int,
    inner: _Int,
    label_smoothing: _Float,
    z_loss: _Float,
    lse: object,
    grad_loss: object,
    grad_logits: object,
    stream: _Int,
    workspace: object | None = None,
    softcap: _Float = 0.0,
) -> None: ...
