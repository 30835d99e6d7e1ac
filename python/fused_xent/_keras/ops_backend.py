"""Per-element cross-entropies of Keras-style inputs on Keras's JAX and PyTorch backends: keras.ops
around the backend's fused function (``fused_xent.jax`` or ``fused_xent.torch``). The same
functions as ``fused_xent._tf.keras_elementwise`` offers the TensorFlow backend, so the losses pick
one of the two once, at import."""

import importlib

import keras
import numpy as np

ops = keras.ops


def _fused():
    """The fused functions of Keras's backend."""
    return importlib.import_module(f"fused_xent.{keras.backend.backend()}")


def refuse_composites(y_true, y_pred):
    """Nothing to refuse: the JAX and PyTorch backends have no ragged or sparse tensors here."""


def keras_inputs(y_true, y_pred, dtype):
    """As Keras's Loss.__call__ (both converted to the loss dtype, integer labels too), except that
    floating-point predictions keep their dtype: under mixed precision the kernels read bfloat16 or
    float16 logits as they are (accumulating in float32) instead of a float32 copy of them."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not keras.backend.standardize_dtype(y_pred.dtype).startswith(("float", "bfloat")):
        y_pred = ops.cast(y_pred, dtype)
    return ops.convert_to_tensor(y_true, dtype=dtype), y_pred


def _check_rank(y_pred, axis):
    rank = len(y_pred.shape)
    if rank < 1:
        raise ValueError(f"`y_pred` must have a known rank of at least 1. Received: y_pred.shape={y_pred.shape}")
    if not -rank <= axis < rank:
        raise ValueError(f"`axis`={axis} is out of range for `y_pred` of rank {rank}")


def _log_probabilities(y_pred, axis, epsilon):
    """log of Keras's normalised and clipped probabilities (its JAX and PyTorch backends normalise sparse ones too)."""
    p = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
    return ops.log(ops.clip(p, epsilon, 1.0 - epsilon))


def _sparse_labels(y_true, logits, axis):
    labels = ops.cast(y_true, "int32")  # float labels truncate, as in Keras
    rank = len(logits.shape)
    if len(labels.shape) == rank and labels.shape[axis] == 1:
        labels = ops.squeeze(labels, axis)
    if len(labels.shape) != rank - 1:
        raise ValueError(
            "`y_pred` must have rank (ndim) `y_true.ndim + 1` (or `y_true` a size-1 class axis). "
            f"Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(logits.shape)}"
        )
    expected = list(logits.shape)
    del expected[axis]
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same shape except for the class axis "
            f"(axis={axis}). Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(logits.shape)}"
        )
    return labels


def categorical(y_true, y_pred, *, from_logits, label_smoothing, axis, z_loss, softcap=None, epsilon, loss_dtype, name):
    """Per-element losses of one-hot or soft labels (Keras's values, probabilities included)."""
    _check_rank(y_pred, axis)
    if tuple(y_true.shape) != tuple(y_pred.shape):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={tuple(y_true.shape)}, y_pred.shape={tuple(y_pred.shape)}"
        )
    fused = _fused().softmax_cross_entropy_with_logits
    options = dict(axis=axis, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if from_logits:
        return fused(y_true, y_pred, **options)
    y_pred = ops.cast(y_pred, loss_dtype)  # probabilities: Keras's normalisation and clipping in the loss dtype
    clipped = ops.clip(y_pred / ops.sum(y_pred, axis=axis, keepdims=True), epsilon, 1.0 - epsilon)
    losses = fused(y_true, ops.log(clipped), **options)
    # The op's softmax of log(clipped p) renormalises; Keras's sum does not, so its logsumexp is taken back.
    target_mass = (1.0 - label_smoothing) * ops.sum(y_true, axis=axis) + label_smoothing
    return losses - target_mass * ops.log(ops.sum(clipped, axis=axis))


def sparse(
    y_true,
    y_pred,
    *,
    from_logits,
    label_smoothing,
    axis,
    z_loss,
    class_weights,
    ignore_class,
    softcap=None,
    epsilon,
    loss_dtype,
    name,
):
    """(per-element losses, integer labels) of integer labels; ignored elements give 0."""
    _check_rank(y_pred, axis)
    labels = _sparse_labels(y_true, y_pred, axis)
    scores = y_pred if from_logits else _log_probabilities(ops.cast(y_pred, loss_dtype), axis, epsilon)
    losses = _fused().sparse_softmax_cross_entropy_with_logits(
        labels,
        scores,
        ignore_index=ignore_class,
        label_smoothing=label_smoothing,
        class_weights=None if class_weights is None else np.asarray(class_weights, np.float32),
        z_loss=z_loss,
        axis=axis,
        softcap=softcap,
    )
    return losses, labels


def ignore_mask(labels, ignore_class):
    """False where the label is `ignore_class`; None where nothing is ignored (labels are int32)."""
    if ignore_class is None or not -(2**31) <= ignore_class < 2**31:
        return None
    return ops.not_equal(labels, ignore_class)


def label_weights(labels, class_weights):
    """Each element's class weight (clipped so an out-of-range label reaches the op's error)."""
    in_range = ops.clip(labels, 0, len(class_weights) - 1)
    return ops.take(ops.convert_to_tensor(np.asarray(class_weights, np.float32)), in_range)
