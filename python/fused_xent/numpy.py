"""The fused kernels on NumPy arrays, through the pybind11 module.

Works without TensorFlow. Each function returns ``(loss, grad_logits)``, where
``grad_logits`` is the gradient of ``sum(loss * grad_loss)`` with respect to the
logits (``grad_loss`` defaults to ones), or None when ``compute_gradient=False``.
bfloat16 arrays (``ml_dtypes.bfloat16``) are accepted like float16/32/64.
"""

import numpy as np

from fused_xent import _checks, _core


def _contiguous(array, dtype=None):
    # Not np.ascontiguousarray: it turns the 0-d label and loss of rank-1 logits into shape (1,).
    return np.asarray(array, dtype=dtype, order="C")


def _logits_array(logits):
    logits = np.asarray(logits)
    _checks.logits_dtype(logits.dtype.name)
    _checks.logits_rank(logits.ndim, logits)
    return _contiguous(logits)


def _grad_loss(logits, reduced, grad_loss):
    """The backward's grad_loss in the logits' dtype, broadcast to the loss's shape (ones by default)."""
    if grad_loss is None:
        return np.ones(reduced, logits.dtype)
    grad_loss = np.asarray(grad_loss)
    _checks.grad_loss_shape(grad_loss.shape, reduced)
    return _contiguous(np.broadcast_to(grad_loss.astype(logits.dtype), reduced))


def _run(forward, backward, logits, reduced, grad_loss, compute_gradient, **arguments):
    """The forward binding (loss and the float64 row logsumexp), then, for a gradient, the backward
    binding on that logsumexp. grad_loss is checked first, so a bad one raises before any work."""
    grad_loss = _grad_loss(logits, reduced, grad_loss) if compute_gradient else None
    loss, lse = np.empty(reduced, logits.dtype), np.empty(reduced, np.float64)
    forward(dtype=logits.dtype.name, logits=logits, loss=loss, lse=lse, **arguments)
    if not compute_gradient:
        return loss, None
    grad_logits = np.empty_like(logits)
    backward(
        dtype=logits.dtype.name,
        logits=logits,
        lse=lse,
        grad_loss=grad_loss,
        grad_logits=grad_logits,
        **arguments,
    )
    return loss, grad_logits


def _unsigned_labels(labels, classes, ignore_index, user_ignore_index):
    """Unsigned labels as int64, checked first: a cast alone would wrap large values into range
    or onto ignore_index. Ignored labels become -1, the ignore_index returned with them."""
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    too_large = labels >= classes if classes <= np.iinfo(labels.dtype).max else np.zeros(labels.shape, bool)
    bad = np.flatnonzero(too_large & ~ignored)
    if bad.size:
        raise _checks.bad_label_error(int(labels.reshape(-1)[bad[0]]), classes, user_ignore_index)
    signed = _contiguous(labels, np.int64)
    if ignore_index is None:
        return signed, None
    signed[ignored] = -1
    return signed, -1


def _label_array(labels, classes, ignore_index):
    """(integer labels as int32 or int64, the ignore_index to pass with them)."""
    checked = _checks.ignore_index_for(ignore_index, labels.dtype.name)
    if labels.dtype.kind == "u":
        return _unsigned_labels(labels, classes, checked, ignore_index)
    return _contiguous(labels, np.int64 if labels.dtype.itemsize > 4 else np.int32), checked


def _class_weights(class_weights, classes):
    if class_weights is None:
        return None
    class_weights = np.asarray(class_weights)
    if class_weights.dtype.kind not in "fiu":
        raise TypeError(f"class_weights must be numbers, got {class_weights.dtype}")
    class_weights = _contiguous(class_weights, np.float32)
    _checks.class_weight_shape(class_weights.shape, classes)
    _checks.class_weight_values(class_weights)
    return class_weights


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
    """Sparse softmax cross-entropy: returns ``(loss, grad_logits)``.

    Same options as ``fused_xent.sparse_softmax_cross_entropy_with_logits``
    (``softcap``: the loss of ``softcap * tanh(logits / softcap)``, its gradient
    for ``logits``).
    ``labels`` may have any integer dtype: unsigned ones are range-checked
    before they are converted, so a large value cannot wrap into range.
    """
    logits = _logits_array(logits)
    outer, classes, inner, reduced = _checks.layout(logits.shape, axis)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    _checks.sparse_shapes(labels.shape, logits.shape, _checks.axis(axis, logits.ndim))
    labels, ignore_index = _label_array(labels, classes, ignore_index)
    label_smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    class_weights = _class_weights(class_weights, classes)
    return _run(
        _core.sparse_forward,
        _core.sparse_backward,
        logits,
        reduced,
        grad_loss,
        compute_gradient,
        labels=labels,
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        class_weights=class_weights,
        softcap=_checks.softcap(softcap),
    )


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
    """Softmax cross-entropy against dense labels: returns ``(loss, grad_logits)``.

    ``labels`` are cast to the logits' dtype and broadcast to their shape.
    """
    logits = _logits_array(logits)
    outer, classes, inner, reduced = _checks.layout(logits.shape, axis)
    labels = np.asarray(labels)
    _checks.dense_label_shape(labels.shape, logits.shape)
    labels = np.ascontiguousarray(np.broadcast_to(labels.astype(logits.dtype), logits.shape))
    label_smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    return _run(
        _core.dense_forward,
        _core.dense_backward,
        logits,
        reduced,
        grad_loss,
        compute_gradient,
        labels=labels,
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=_checks.softcap(softcap),
    )
