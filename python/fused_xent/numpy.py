"""The fused kernels on NumPy arrays, through the pybind11 module.

Works without TensorFlow. Each function returns ``(loss, grad_logits)``, where
``grad_logits`` is the gradient of ``sum(loss * grad_loss)`` with respect to the
logits (``grad_loss`` defaults to ones), or None when ``compute_gradient=False``.
bfloat16 arrays (``ml_dtypes.bfloat16``) are accepted like float16/32/64.
"""

import numbers

import numpy as np

from fused_xent import _core

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _logits_array(logits):
    logits = np.asarray(logits)
    if logits.dtype.name not in _FLOAT_NAMES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError("logits cannot be a scalar")
    return np.ascontiguousarray(logits)


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
        grad_loss = np.ascontiguousarray(np.broadcast_to(np.asarray(grad_loss).astype(logits.dtype), reduced))
    return loss, lse, grad_loss, np.empty_like(logits)


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
    """
    logits = _logits_array(logits)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    labels = np.ascontiguousarray(labels, dtype=np.int64 if labels.dtype.itemsize > 4 else np.int32)
    outer, classes, inner, reduced = _layout(logits.shape, axis)
    if labels.shape != reduced:
        raise ValueError(f"labels shape {labels.shape} must equal logits shape {logits.shape} without axis {axis}")
    _check_options(label_smoothing, z_loss)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    if class_weights is not None:
        class_weights = np.asarray(class_weights)
        if class_weights.dtype.kind not in "fiu":
            raise TypeError(f"class_weights must be numbers, got {class_weights.dtype}")
        class_weights = np.ascontiguousarray(class_weights, dtype=np.float32)
        if class_weights.shape != (classes,):
            raise ValueError(f"class_weights must have shape ({classes},), got {class_weights.shape}")
    loss, lse, grad_loss, grad_logits = _outputs(logits, reduced, grad_loss, compute_gradient)
    _core.sparse(
        logits.dtype.name, logits, labels, outer, classes, inner, float(label_smoothing), float(z_loss),
        None if ignore_index is None else int(ignore_index), class_weights, loss, lse, grad_loss, grad_logits,
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
