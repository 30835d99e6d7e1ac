"""The fused kernels on NumPy arrays, through the pybind11 module.

Works without TensorFlow. Each function returns ``(loss, grad_logits)``, where
``grad_logits`` is the gradient of ``sum(loss * grad_loss)`` with respect to the
logits (``grad_loss`` defaults to ones), or None when ``compute_gradient=False``.
bfloat16 arrays (``ml_dtypes.bfloat16``) are accepted like float16/32/64.
"""

import numbers

import numpy as np

from fused_xent import _core
from fused_xent._arguments import check_weight_values

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _contiguous(array, dtype=None):
    # Not np.ascontiguousarray: it turns the 0-d label and loss of rank-1 logits into shape (1,).
    return np.asarray(array, dtype=dtype, order="C")


def _logits_array(logits):
    logits = np.asarray(logits)
    if logits.dtype.name not in _FLOAT_NAMES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError("logits cannot be a scalar")
    return _contiguous(logits)


def _layout(shape, axis):
    if not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for logits of rank {rank}")
    axis %= rank
    classes = shape[axis]
    if classes == 0:
        raise ValueError(f"Must have at least one class, but got logits shape {tuple(shape)}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    reduced = tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    return outer, classes, inner, reduced


def _check_options(label_smoothing, z_loss):
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, numbers.Real) or not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")


def _outputs(logits, reduced, grad_loss, compute_gradient):
    loss = np.empty(reduced, logits.dtype)
    lse = np.empty(reduced, np.float64)
    if not compute_gradient:
        return loss, lse, None, None
    if grad_loss is None:
        grad_loss = np.ones(reduced, logits.dtype)
    else:
        grad_loss = _contiguous(np.broadcast_to(np.asarray(grad_loss).astype(logits.dtype), reduced))
    return loss, lse, grad_loss, np.empty_like(logits)


def _checked_ignore_index(ignore_index, label_dtype):
    """ignore_index, or None when no label of `label_dtype` can equal it (it then ignores nothing)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    limits = np.iinfo(label_dtype)
    return int(ignore_index) if limits.min <= ignore_index <= limits.max else None


def _bad_label_error(value, classes, ignore_index):
    message = f"Received a label value of {value} which is outside the valid range of [0, {classes})"
    if ignore_index is not None:
        message += f" and is not ignore_index ({ignore_index})"
    return ValueError(message)


def _unsigned_labels(labels, classes, ignore_index, user_ignore_index):
    """Unsigned labels as int64, checked first: a cast alone would wrap large values into range
    or onto ignore_index. Ignored labels become -1, the ignore_index returned with them."""
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    too_large = labels >= classes if classes <= np.iinfo(labels.dtype).max else np.zeros(labels.shape, bool)
    bad = np.flatnonzero(too_large & ~ignored)
    if bad.size:
        raise _bad_label_error(int(labels.reshape(-1)[bad[0]]), classes, user_ignore_index)
    signed = _contiguous(labels, np.int64)
    if ignore_index is None:
        return signed, None
    signed[ignored] = -1
    return signed, -1


def _label_array(labels, classes, ignore_index):
    """(integer labels as int32 or int64, the ignore_index to pass with them)."""
    checked = _checked_ignore_index(ignore_index, labels.dtype)
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
    if class_weights.shape != (classes,):
        raise ValueError(f"class_weights must have shape ({classes},), got {class_weights.shape}")
    check_weight_values(class_weights)
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
):
    """Sparse softmax cross-entropy: returns ``(loss, grad_logits)``.

    Same options as ``fused_xent.sparse_softmax_cross_entropy_with_logits``.
    ``labels`` may have any integer dtype: unsigned ones are range-checked
    before they are converted, so a large value cannot wrap into range.
    """
    logits = _logits_array(logits)
    outer, classes, inner, reduced = _layout(logits.shape, axis)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.shape != reduced:
        raise ValueError(f"labels shape {labels.shape} must equal logits shape {logits.shape} without axis {axis}")
    labels, ignore_index = _label_array(labels, classes, ignore_index)
    _check_options(label_smoothing, z_loss)
    class_weights = _class_weights(class_weights, classes)
    loss, lse, grad_loss, grad_logits = _outputs(logits, reduced, grad_loss, compute_gradient)
    _core.sparse(
        logits.dtype.name, logits, labels, outer, classes, inner, float(label_smoothing), float(z_loss),
        ignore_index, class_weights, loss, lse, grad_loss, grad_logits,
    )
    return loss, grad_logits


def softmax_cross_entropy_with_logits(
    labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, grad_loss=None, compute_gradient=True
):
    """Softmax cross-entropy against dense labels: returns ``(loss, grad_logits)``.

    ``labels`` are cast to the logits' dtype and broadcast to their shape.
    """
    logits = _logits_array(logits)
    labels = np.ascontiguousarray(np.broadcast_to(np.asarray(labels).astype(logits.dtype), logits.shape))
    outer, classes, inner, reduced = _layout(logits.shape, axis)
    _check_options(label_smoothing, z_loss)
    loss, lse, grad_loss, grad_logits = _outputs(logits, reduced, grad_loss, compute_gradient)
    _core.dense(
        logits.dtype.name, logits, labels, outer, classes, inner, float(label_smoothing), float(z_loss),
        loss, lse, grad_loss, grad_logits,
    )
    return loss, grad_logits
