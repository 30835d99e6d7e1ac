"""The fused kernels on CUDA arrays (PyTorch tensors or CuPy arrays), through the pybind11 module.

Works without TensorFlow, in a build with CUDA (``fused_xent.build_info()["cuda"]``).
Same functions as ``fused_xent.numpy``: each returns ``(loss, grad_logits)``, where
``grad_logits`` is the gradient of ``sum(loss * grad_loss)`` with respect to the
logits (``grad_loss`` defaults to ones), or None when ``compute_gradient=False``.
Their two halves are also here, for front ends that keep the forward's row
logsumexp until the backward (fused_xent.torch): ``sparse_forward`` and
``dense_forward`` return ``(loss, lse)``, lse the float64 logsumexp of each row,
and ``sparse_backward`` and ``dense_backward`` return ``grad_logits`` from it.

Outputs are allocated by the library of ``logits`` on its device, and the kernels
run on that library's current stream without synchronising the host. Labels are
not checked against the number of classes (that would need a copy to the host):
a row whose label is out of range, and is not ``ignore_index``, gets a NaN loss
and NaN gradients.
"""

from fused_xent import _checks, _core


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
    _checks.logits_dtype(name)
    _checks.logits_rank(len(logits.shape), logits)
    return backend.contiguous(logits), name


def _grad_loss(backend, grad_loss, reduced, name):
    if grad_loss is None:
        return backend.ones(reduced, name)
    grad_loss = backend.as_array(grad_loss, name)
    _checks.grad_loss_shape(tuple(grad_loss.shape), reduced)
    return backend.broadcast(grad_loss, reduced)


class _Call:
    """One call's checked arguments: its backend and stream, the logits' dtype name, shape and
    reduced shape, and the keyword arguments every binding of its kind takes."""

    def __init__(self, backend, logits, name, reduced, common):
        self.backend, self.name, self.shape, self.reduced = backend, name, tuple(logits.shape), reduced
        self.common = common
        self.stream = backend.stream()
        self.itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[name]

    def workspace(self, kind):
        """Scratch memory for the kernel `kind`, from the array library's (caching) allocator, so
        the binding allocates nothing itself; None when the kernel needs none for this shape."""
        c = self.common
        size = _core.workspace_bytes(kind, c["outer"], c["classes"], c["inner"], self.itemsize)
        return self.backend.empty((size,), "uint8") if size else None


def _sparse_call(labels, logits, axis, ignore_index, label_smoothing, class_weights, z_loss, softcap=None):
    backend = _backend(logits)
    logits, name = _prepare_logits(backend, logits)
    labels = backend.as_array(labels)
    label_name = backend.dtype_name(labels)
    if not label_name.startswith(("int", "uint")):
        raise TypeError(f"labels must be integer class indices, got {label_name}")
    if label_name not in ("int32", "int64"):
        labels = backend.as_array(labels, "int32" if label_name in ("int8", "int16", "uint8", "uint16") else "int64")
    labels = backend.contiguous(labels)
    outer, classes, inner, reduced = _checks.layout(tuple(logits.shape), axis)
    _checks.sparse_shapes(tuple(labels.shape), tuple(logits.shape), _checks.axis(axis, len(logits.shape)))
    label_smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    ignore_index = _checks.ignore_index(ignore_index)
    weights = None
    if class_weights is not None:
        weights = backend.contiguous(backend.as_array(class_weights, "float32"))
        _checks.class_weight_shape(tuple(weights.shape), classes)
    common = dict(
        dtype=name,
        logits=backend.interface(logits),
        labels=labels,
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        class_weights=weights,
        softcap=_checks.softcap(softcap),
    )
    return _Call(backend, logits, name, reduced, common)


def _dense_call(labels, logits, axis, label_smoothing, z_loss, softcap=None):
    backend = _backend(logits)
    logits, name = _prepare_logits(backend, logits)
    labels = backend.as_array(labels, name)
    _checks.dense_label_shape(tuple(labels.shape), tuple(logits.shape))
    labels = backend.broadcast(labels, tuple(logits.shape))
    outer, classes, inner, reduced = _checks.layout(tuple(logits.shape), axis)
    label_smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    common = dict(
        dtype=name,
        logits=backend.interface(logits),
        labels=backend.interface(labels),
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=_checks.softcap(softcap),
    )
    return _Call(backend, logits, name, reduced, common)


def _forward(binding, call, kind):
    backend = call.backend
    loss, lse = backend.empty(call.reduced, call.name), backend.empty(call.reduced, "float64")
    binding(
        loss=backend.interface(loss),
        lse=backend.interface(lse),
        stream=call.stream,
        workspace=call.workspace(kind),
        **call.common,
    )
    return loss, lse


def _backward(binding, call, lse, grad_loss, kind=None):
    backend = call.backend
    lse = backend.contiguous(backend.as_array(lse))  # its float64 dtype is the binding's to check
    if tuple(lse.shape) != call.reduced:
        raise ValueError(f"lse must have the loss's shape {call.reduced}, got {tuple(lse.shape)}")
    grad_loss = _grad_loss(backend, grad_loss, call.reduced, call.name)
    grad = backend.empty(call.shape, call.name)
    extra = {} if kind is None else {"workspace": call.workspace(kind)}
    binding(
        lse=backend.interface(lse),
        grad_loss=backend.interface(grad_loss),
        grad_logits=backend.interface(grad),
        stream=call.stream,
        **extra,
        **call.common,
    )
    return grad


def sparse_forward(
    labels, logits, *, axis=-1, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0, softcap=None
):
    """The sparse forward alone: ``(loss, lse)``, lse the float64 logsumexp of each row."""
    call = _sparse_call(labels, logits, axis, ignore_index, label_smoothing, class_weights, z_loss, softcap)
    return _forward(_core.cuda_sparse_forward, call, "sparse_forward")


def sparse_backward(
    labels,
    logits,
    lse,
    grad_loss=None,
    *,
    axis=-1,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    softcap=None,
):
    """The sparse backward alone: ``grad_logits``, the gradient of ``sum(loss * grad_loss)``, from the
    forward's ``lse`` (float64, shaped like the loss)."""
    call = _sparse_call(labels, logits, axis, ignore_index, label_smoothing, class_weights, z_loss, softcap)
    return _backward(_core.cuda_sparse_backward, call, lse, grad_loss)


def dense_forward(labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The dense forward alone: ``(loss, lse)``, lse the float64 logsumexp of each row."""
    call = _dense_call(labels, logits, axis, label_smoothing, z_loss, softcap)
    return _forward(_core.cuda_dense_forward, call, "dense_forward")


def dense_backward(labels, logits, lse, grad_loss=None, axis=-1, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The dense backward alone: ``grad_logits`` from the forward's ``lse``, as ``sparse_backward``."""
    call = _dense_call(labels, logits, axis, label_smoothing, z_loss, softcap)
    return _backward(_core.cuda_dense_backward, call, lse, grad_loss, "dense_backward")


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
    softcap=None,
):
    """Sparse softmax cross-entropy on CUDA arrays: returns ``(loss, grad_logits)``."""
    call = _sparse_call(labels, logits, axis, ignore_index, label_smoothing, class_weights, z_loss, softcap)
    loss, lse = _forward(_core.cuda_sparse_forward, call, "sparse_forward")
    if not compute_gradient:
        return loss, None
    return loss, _backward(_core.cuda_sparse_backward, call, lse, grad_loss)


def softmax_cross_entropy_with_logits(
    labels,
    logits,
    axis=-1,
    *,
    label_smoothing=0.0,
    z_loss=0.0,
    grad_loss=None,
    compute_gradient=True,
    softcap=None,
):
    """Softmax cross-entropy against dense labels on CUDA arrays: returns ``(loss, grad_logits)``.

    ``labels`` are cast to the logits' dtype and broadcast to their shape.
    """
    call = _dense_call(labels, logits, axis, label_smoothing, z_loss, softcap)
    loss, lse = _forward(_core.cuda_dense_forward, call, "dense_forward")
    if not compute_gradient:
        return loss, None
    return loss, _backward(_core.cuda_dense_backward, call, lse, grad_loss, "dense_backward")
