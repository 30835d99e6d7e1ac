"""The fused kernels on CUDA arrays (PyTorch tensors or CuPy arrays), through the pybind11 module.

Works without TensorFlow, in a build with CUDA (``fused_xent.build_info()["cuda"]``).
Same functions as ``fused_xent.numpy``: each returns ``(loss, grad_logits)``, where
``grad_logits`` is the gradient of ``sum(loss * grad_loss)`` with respect to the
logits (``grad_loss`` defaults to ones), or None when ``compute_gradient=False``.

Outputs are allocated by the library of ``logits`` on its device, and the kernels
run on that library's current stream without synchronising the host. Labels are
not checked against the number of classes (that would need a copy to the host):
a row whose label is out of range, and is not ``ignore_index``, gets a NaN loss
and NaN gradients.
"""

import numbers

from fused_xent import _core
from fused_xent.numpy import _check_options, _layout

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def is_available():
    """Whether this build has the CUDA kernels and a CUDA device is visible."""
    return bool(_core.build_info()["cuda"]) and _core.cuda_device_count() > 0


class _Torch:
    def __init__(self, torch, like):
        self.torch = torch
        self.device = like.device

    @staticmethod
    def dtype_name(x):
        return str(x.dtype).replace("torch.", "")

    def float_dtype(self, name):
        return getattr(self.torch, name)

    def as_array(self, value, dtype_name=None):
        t = value if isinstance(value, self.torch.Tensor) else self.torch.as_tensor(value)
        t = t.detach().to(device=self.device)
        if dtype_name is not None:
            t = t.to(getattr(self.torch, dtype_name))
        return t

    def contiguous(self, x):
        return x.contiguous()

    def broadcast(self, x, shape):
        return x.expand(shape).contiguous()

    def empty(self, shape, dtype_name):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype_name), device=self.device)

    def ones(self, shape, dtype_name):
        return self.torch.ones(shape, dtype=getattr(self.torch, dtype_name), device=self.device)

    def interface(self, x):
        # PyTorch exports no typestr for bfloat16: pass its bits as int16.
        x = x.detach()
        return x.view(self.torch.int16) if x.dtype == self.torch.bfloat16 else x

    def stream(self):
        return self.torch.cuda.current_stream(self.device).cuda_stream


class _CuPy:
    def __init__(self, cupy, like):
        self.cupy = cupy
        self.device = like.device

    @staticmethod
    def dtype_name(x):
        return x.dtype.name

    def as_array(self, value, dtype_name=None):
        with self.device:
            return self.cupy.asarray(value, dtype=dtype_name)

    def contiguous(self, x):
        with self.device:
            return self.cupy.ascontiguousarray(x)

    def broadcast(self, x, shape):
        with self.device:
            return self.cupy.ascontiguousarray(self.cupy.broadcast_to(x, shape))

    def empty(self, shape, dtype_name):
        with self.device:
            return self.cupy.empty(shape, dtype=dtype_name)

    def ones(self, shape, dtype_name):
        with self.device:
            return self.cupy.ones(shape, dtype=dtype_name)

    def interface(self, x):
        return x

    def stream(self):
        with self.device:
            return self.cupy.cuda.get_current_stream().ptr


def _backend(logits):
    if not _core.build_info()["cuda"]:
        raise RuntimeError("this build of fused_xent has no CUDA kernels (it was built without nvcc)")
    module = type(logits).__module__.split(".")[0]
    if module == "torch":
        import torch

        if not logits.is_cuda:
            raise ValueError("logits must be a CUDA tensor; use fused_xent.numpy for host arrays")
        return _Torch(torch, logits)
    if module == "cupy":
        import cupy

        return _CuPy(cupy, logits)
    raise TypeError(f"logits must be a PyTorch CUDA tensor or a CuPy array, got {type(logits).__name__}")


def _prepare_logits(backend, logits):
    name = backend.dtype_name(logits)
    if name not in _FLOAT_NAMES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {name}")
    if len(logits.shape) == 0:
        raise ValueError("logits cannot be a scalar")
    return backend.contiguous(logits), name


def _grad_loss(backend, grad_loss, reduced, name):
    if grad_loss is None:
        return backend.ones(reduced, name)
    return backend.broadcast(backend.as_array(grad_loss, name), reduced)


def sparse_softmax_cross_entropy_with_logits(
    labels,
    logits,
    *,
    axis=-1,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    grad_loss=None,
    compute_gradient=True,
):
    """Sparse softmax cross-entropy on CUDA arrays: returns ``(loss, grad_logits)``."""
    backend = _backend(logits)
    logits, name = _prepare_logits(backend, logits)
    labels = backend.as_array(labels)
    label_name = backend.dtype_name(labels)
    if not label_name.startswith(("int", "uint")):
        raise TypeError(f"labels must be integer class indices, got {label_name}")
    if label_name not in ("int32", "int64"):
        labels = backend.as_array(labels, "int32" if label_name in ("int8", "int16", "uint8", "uint16") else "int64")
    labels = backend.contiguous(labels)
    outer, classes, inner, reduced = _layout(tuple(logits.shape), axis)
    if tuple(labels.shape) != reduced:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape {tuple(logits.shape)} without axis {axis}")
    _check_options(label_smoothing, z_loss)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    weights = None
    if class_weights is not None:
        weights = backend.contiguous(backend.as_array(class_weights, "float32"))
        if tuple(weights.shape) != (classes,):
            raise ValueError(f"class_weights must have shape ({classes},), got {tuple(weights.shape)}")
    common = dict(
        dtype=name, logits=backend.interface(logits), labels=labels, outer=outer, classes=classes, inner=inner,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        ignore_index=None if ignore_index is None else int(ignore_index), class_weights=weights,
    )
    stream = backend.stream()
    loss, lse = backend.empty(reduced, name), backend.empty(reduced, "float64")
    _core.cuda_sparse_forward(loss=backend.interface(loss), lse=lse, stream=stream, **common)
    if not compute_gradient:
        return loss, None
    grad = backend.empty(tuple(logits.shape), name)
    _core.cuda_sparse_backward(
        lse=lse, grad_loss=backend.interface(_grad_loss(backend, grad_loss, reduced, name)), grad_lse=None,
        grad_logits=backend.interface(grad), stream=stream, **common,
    )
    return loss, grad


def softmax_cross_entropy_with_logits(
    labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, grad_loss=None, compute_gradient=True
):
    """Softmax cross-entropy against dense labels on CUDA arrays: returns ``(loss, grad_logits)``.

    ``labels`` are cast to the logits' dtype and broadcast to their shape.
    """
    backend = _backend(logits)
    logits, name = _prepare_logits(backend, logits)
    labels = backend.broadcast(backend.as_array(labels, name), tuple(logits.shape))
    outer, classes, inner, reduced = _layout(tuple(logits.shape), axis)
    _check_options(label_smoothing, z_loss)
    common = dict(
        dtype=name, logits=backend.interface(logits), labels=backend.interface(labels), outer=outer,
        classes=classes, inner=inner, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
    )
    stream = backend.stream()
    loss, lse = backend.empty(reduced, name), backend.empty(reduced, "float64")
    _core.cuda_dense_forward(loss=backend.interface(loss), lse=lse, stream=stream, **common)
    if not compute_gradient:
        return loss, None
    grad = backend.empty(tuple(logits.shape), name)
    _core.cuda_dense_backward(
        lse=lse, grad_loss=backend.interface(_grad_loss(backend, grad_loss, reduced, name)), grad_lse=None,
        grad_logits=backend.interface(grad), stream=stream, **common,
    )
    return loss, grad
