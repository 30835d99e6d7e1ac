"""Per-element cross-entropies of Keras-style inputs on TensorFlow tensors, shared by the Keras 3
losses and metrics (fused_xent.losses, fused_xent.metrics) and the tf_keras ones
(fused_xent.tf_keras). Only the fused op's forward runs here: its gradient is a separate op that
TensorFlow adds only when something differentiates the result.

No Keras is imported: each front end passes its own epsilon and float dtype.
"""

import warnings

import tensorflow as tf

from fused_xent._tf.ops import (
    refuse_composite,
    softmax_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits,
)


def refuse_composites(y_true, y_pred):
    refuse_composite(y_pred, "y_pred")
    refuse_composite(y_true, "y_true")


def prediction_tensor(y_pred, loss_dtype):
    """Float TensorFlow tensors keep their dtype (no copy of half logits);
    anything else becomes a tensor of the loss dtype, as in Keras."""
    if isinstance(y_pred, (tf.Tensor, tf.Variable)) and y_pred.dtype.is_floating:
        return tf.convert_to_tensor(y_pred)
    y_pred = tf.convert_to_tensor(y_pred)
    return y_pred if y_pred.dtype == loss_dtype else tf.cast(y_pred, loss_dtype)


def softmax_input(y_pred):
    """The logits behind a softmax output, as Keras's TensorFlow code finds them."""
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is not None:
        return logits
    if isinstance(y_pred, tf.Variable) or tf.executing_eagerly():
        return None
    op = getattr(y_pred, "op", None)
    if op is not None and op.type == "Softmax" and len(op.inputs) == 1:
        return op.inputs[0]
    return None


def scores(y_pred, from_logits, loss_name):
    """(tensor, is_logits): a softmax output is replaced by its logits."""
    logits = softmax_input(y_pred)
    if logits is None:
        return y_pred, from_logits
    if from_logits:
        warnings.warn(
            f"`{loss_name}` received `from_logits=True`, but `y_pred` was produced by a softmax "
            "activation and thus does not represent logits; its logits are used. Was this intended?",
            stacklevel=5,
        )
    return tf.convert_to_tensor(logits), True


def clipped_probabilities(y_pred, axis, normalize, epsilon):
    """Keras's probability handling, in float32 (float64 stays float64)."""
    dtype = tf.float64 if y_pred.dtype == tf.float64 else tf.float32
    p = tf.cast(y_pred, dtype)
    if normalize:
        p = p / tf.reduce_sum(p, axis, keepdims=True)
    return tf.clip_by_value(p, epsilon, 1.0 - epsilon)


def sparse_labels(y_true, logits, axis):
    """Integer labels shaped like `logits` without `axis` (a size-1 class axis is dropped)."""
    labels = tf.convert_to_tensor(y_true)
    if labels.dtype not in (tf.int32, tf.int64):
        labels = tf.cast(labels, tf.int64)  # float labels truncate, as in Keras
    rank = logits.shape.rank
    if labels.shape.rank == rank and labels.shape[axis] == 1:
        labels = tf.squeeze(labels, axis)
    if labels.shape.rank != rank - 1:
        raise ValueError(
            "`y_pred` must have rank (ndim) `y_true.ndim + 1` (or `y_true` a size-1 class axis). "
            f"Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(logits.shape)}"
        )
    expected = logits.shape.as_list()
    del expected[axis]
    if not labels.shape.is_compatible_with(expected):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same shape except for the class axis "
            f"(axis={axis}). Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(logits.shape)}"
        )
    return labels


def dense_labels(y_true, y_pred):
    labels = tf.convert_to_tensor(y_true)
    if labels.shape.rank != y_pred.shape.rank:
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same rank (ndim). "
            f"Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(y_pred.shape)}"
        )
    if not labels.shape.is_compatible_with(y_pred.shape):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={tuple(labels.shape)}, y_pred.shape={tuple(y_pred.shape)}"
        )
    return labels


def check_rank(y_pred, axis):
    rank = y_pred.shape.rank
    if rank is None or rank < 1:
        raise ValueError(f"`y_pred` must have a known rank of at least 1. Received: y_pred.shape={y_pred.shape}")
    if not -rank <= axis < rank:
        raise ValueError(f"`axis`={axis} is out of range for `y_pred` of rank {rank}")


def _checked_scores(y_pred, from_logits, axis, loss_dtype, name):
    y_pred = prediction_tensor(y_pred, loss_dtype)
    check_rank(y_pred, axis)
    return scores(y_pred, from_logits, name)


def categorical(y_true, y_pred, *, from_logits, label_smoothing, axis, z_loss, softcap=None, epsilon, loss_dtype, name):
    """Per-element losses of one-hot or soft labels (Keras's values, probabilities included)."""
    logits, is_logits = _checked_scores(y_pred, from_logits, axis, loss_dtype, name)
    labels = dense_labels(y_true, logits)
    options = dict(axis=axis, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if is_logits:
        return softmax_cross_entropy_with_logits(labels, logits, **options)
    # Keras sums -q * log(clipped p) without renormalising after the clip; the
    # op's softmax of log(clipped p) renormalises, so its logsumexp is taken back.
    clipped = clipped_probabilities(logits, axis, normalize=True, epsilon=epsilon)
    losses = softmax_cross_entropy_with_logits(labels, tf.math.log(clipped), **options)
    target_mass = (1.0 - label_smoothing) * tf.reduce_sum(tf.cast(labels, clipped.dtype), axis) + label_smoothing
    return losses - target_mass * tf.math.log(tf.reduce_sum(clipped, axis))


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
    logits, is_logits = _checked_scores(y_pred, from_logits, axis, loss_dtype, name)
    labels = sparse_labels(y_true, logits, axis)
    if not is_logits:
        logits = tf.math.log(clipped_probabilities(logits, axis, normalize=False, epsilon=epsilon))
    losses = sparse_softmax_cross_entropy_with_logits(
        labels,
        logits,
        ignore_index=ignore_class,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        axis=axis,
        softcap=softcap,
    )
    return losses, labels


def ignore_mask(labels, ignore_class):
    """False where the label is `ignore_class`; None where nothing is ignored."""
    # An ignore_class the labels' dtype cannot hold masks nothing (a cast would wrap it).
    if ignore_class is None or not labels.dtype.min <= ignore_class <= labels.dtype.max:
        return None
    return tf.not_equal(labels, tf.constant(ignore_class, labels.dtype))


def label_weights(labels, class_weights):
    """Each element's class weight."""
    # Clipped so that an out-of-range label reaches the op's error, not gather's.
    in_range = tf.clip_by_value(labels, 0, len(class_weights) - 1)
    return tf.gather(tf.constant(class_weights, tf.float32), in_range)


def keras_inputs(y_true, y_pred, loss_dtype):
    """Unchanged: the functions above convert them (half-precision logits stay whole)."""
    return y_true, y_pred
