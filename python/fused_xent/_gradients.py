"""Gradients of the fused ops, first order and higher.

Forward ops output (loss, lse). Their gradient with respect to the logits is
the fused Grad op, which reads logits, labels, lse and the upstream gradients
g (of the loss) and g_lse (of lse; nonzero only on second-order paths):

    dz = g * w * ((sum(q) + 2 lambda lse) * p - q) + g_lse * p,   p = exp(z - lse)

The Grad ops are differentiated here with a few
TensorFlow element-wise ops: that path (Hessian-vector products, gradient
penalties) is rare and its cost is dominated by the rest of the double backward.
Treating lse as an independent input of the Grad op keeps this exact: its
gradient flows back into the forward op's lse output. docs/derivation.md has
the formulas.
"""

import numpy as np
import tensorflow as tf

from fused_xent._loader import load_op_library

_SPARSE_ATTRS = ("axis", "label_smoothing", "z_loss", "ignore_index", "has_ignore_index")
_DENSE_ATTRS = ("axis", "label_smoothing", "z_loss")


def _attrs(op, names):
    attrs = {name: op.get_attr(name) for name in names}
    # The kernel sees float attrs as float32; eager ops report them as passed.
    for name in ("label_smoothing", "z_loss"):
        attrs[name] = float(np.float32(attrs[name]))
    return attrs


def _input_gradient_needed(op, index):
    skip = getattr(op, "skip_input_indices", None)  # set by the eager tape
    return skip is None or index not in skip


def _softmax(logits, lse, axis):
    z = tf.cast(logits, lse.dtype)
    return tf.exp(z - tf.expand_dims(lse, axis))


def _lse_gradient(grad_lse):
    """The Grad ops take an empty tensor when no gradient flows into lse."""
    return tf.zeros([0], tf.float64) if grad_lse is None else grad_lse


def _lse_gradient_rows(grad_lse, lse):
    """grad_lse as one value per row (zeros when it was passed empty)."""
    if grad_lse.shape.num_elements() == 0:
        return tf.zeros_like(lse)
    if grad_lse.shape.rank is not None and grad_lse.shape.rank > 0 and grad_lse.shape == lse.shape:
        return grad_lse
    return tf.cond(tf.size(grad_lse) > 0, lambda: tf.reshape(grad_lse, tf.shape(lse)), lambda: tf.zeros_like(lse))


def _positive_axis(axis, logits):
    if axis >= 0:
        return axis
    rank = logits.shape.rank
    if rank is None:
        if axis == -1:
            return -1
        raise ValueError("second-order gradients need the rank of logits to be known when axis != -1")
    return axis + rank


@tf.RegisterGradient("FusedXent>SparseSoftmaxCrossEntropy")
def _sparse_forward_grad(op, grad_loss, grad_lse):
    logits, labels, class_weights = op.inputs
    lse = op.outputs[1]
    attrs = _attrs(op, _SPARSE_ATTRS)
    if grad_loss is None:
        grad_loss = tf.zeros_like(op.outputs[0])
    grad_logits = load_op_library().fused_xent_sparse_softmax_cross_entropy_grad(
        logits, labels, class_weights, lse, grad_loss, _lse_gradient(grad_lse), **attrs
    )
    return grad_logits, None, None


@tf.RegisterGradient("FusedXent>SoftmaxCrossEntropy")
def _dense_forward_grad(op, grad_loss, grad_lse):
    logits, labels = op.inputs
    lse = op.outputs[1]
    attrs = _attrs(op, _DENSE_ATTRS)
    axis = attrs["axis"]
    if grad_loss is None:
        grad_loss = tf.zeros_like(op.outputs[0])
    grad_logits = load_op_library().fused_xent_softmax_cross_entropy_grad(
        logits, labels, lse, grad_loss, _lse_gradient(grad_lse), **attrs
    )
    grad_labels = None
    if _input_gradient_needed(op, 1):
        # d loss / d t_j = (1 - eps) * (lse - z_j) = -(1 - eps) * log_softmax(z)_j
        scale = tf.cast(grad_loss, lse.dtype) * (1.0 - attrs["label_smoothing"])
        neg_log_p = tf.expand_dims(lse, axis) - tf.cast(logits, lse.dtype)
        grad_labels = tf.cast(tf.expand_dims(scale, axis) * neg_log_p, labels.dtype)
    return grad_logits, grad_labels


def _grad_of_grad_lse(grad_lse, p_dot_v):
    """d(dz)/d(grad_lse) = p: its gradient is p . v per row (none for an empty input)."""
    if grad_lse.shape.num_elements() == 0:
        return None
    if grad_lse.shape.is_fully_defined() and grad_lse.shape == p_dot_v.shape:
        return p_dot_v
    return tf.cond(
        tf.size(grad_lse) > 0,
        lambda: tf.reshape(p_dot_v, tf.shape(grad_lse)),
        lambda: tf.zeros_like(grad_lse),
    )


def _ignored_rows(labels, attrs):
    """Rows whose label is ignore_index, or None. An ignore_index the label dtype
    cannot hold matches no row (a cast would wrap 2**32 onto the int32 label 0)."""
    index = attrs["ignore_index"]
    if not attrs["has_ignore_index"] or not labels.dtype.min <= index <= labels.dtype.max:
        return None
    return tf.equal(labels, tf.constant(index, labels.dtype))


def _sparse_row_weights(labels, class_weights, attrs, dtype):
    """w per row: the class weight of the label (or 1), and 0 for ignored rows."""
    valid_labels = labels
    ignored = _ignored_rows(labels, attrs)
    if ignored is not None:
        valid_labels = tf.where(ignored, tf.zeros_like(labels), labels)
    size = class_weights.shape[0]
    if size == 0:
        weights = tf.ones_like(labels, dtype)
    elif size is not None:
        weights = tf.cast(tf.gather(class_weights, valid_labels), dtype)
    else:
        weights = tf.cond(
            tf.size(class_weights) > 0,
            lambda: tf.cast(tf.gather(class_weights, valid_labels), dtype),
            lambda: tf.ones_like(labels, dtype),
        )
    if ignored is not None:
        weights = tf.where(ignored, tf.zeros_like(weights), weights)
    return weights


@tf.RegisterGradient("FusedXent>SparseSoftmaxCrossEntropyGrad")
def _sparse_backward_grad(op, v):
    logits, labels, class_weights, lse, grad_loss, grad_lse = op.inputs
    attrs = _attrs(op, _SPARSE_ATTRS)
    axis, eps, lam = attrs["axis"], attrs["label_smoothing"], attrs["z_loss"]
    acc = lse.dtype
    p = _softmax(logits, lse, axis)
    v = tf.cast(v, acc)
    g = tf.cast(grad_loss, acc)
    w = _sparse_row_weights(labels, class_weights, attrs, acc)
    classes = tf.cast(tf.shape(logits)[axis], acc)
    onehot = tf.one_hot(labels, tf.shape(logits)[axis], axis=_positive_axis(axis, logits), dtype=acc)
    p_dot_v = tf.reduce_sum(p * v, axis)
    q_dot_v = (1.0 - eps) * tf.reduce_sum(onehot * v, axis) + eps / classes * tf.reduce_sum(v, axis)
    a = 1.0 + 2.0 * lam * lse
    softmax_scale = g * w * a + _lse_gradient_rows(grad_lse, lse)
    grad_logits = tf.expand_dims(softmax_scale, axis) * p * v
    grad_into_lse = (2.0 * lam * g * w - softmax_scale) * p_dot_v
    grad_grad_loss = w * (a * p_dot_v - q_dot_v)
    return (
        tf.cast(grad_logits, logits.dtype),
        None,
        None,
        grad_into_lse,
        tf.cast(grad_grad_loss, grad_loss.dtype),
        _grad_of_grad_lse(grad_lse, p_dot_v),
    )


@tf.RegisterGradient("FusedXent>SoftmaxCrossEntropyGrad")
def _dense_backward_grad(op, v):
    logits, labels, lse, grad_loss, grad_lse = op.inputs
    attrs = _attrs(op, _DENSE_ATTRS)
    axis, eps, lam = attrs["axis"], attrs["label_smoothing"], attrs["z_loss"]
    acc = lse.dtype
    p = _softmax(logits, lse, axis)
    v = tf.cast(v, acc)
    t = tf.cast(labels, acc)
    g = tf.cast(grad_loss, acc)
    classes = tf.cast(tf.shape(logits)[axis], acc)
    p_dot_v = tf.reduce_sum(p * v, axis)
    q_dot_v = (1.0 - eps) * tf.reduce_sum(t * v, axis) + eps / classes * tf.reduce_sum(v, axis)
    a = (1.0 - eps) * tf.reduce_sum(t, axis) + eps + 2.0 * lam * lse
    softmax_scale = g * a + _lse_gradient_rows(grad_lse, lse)
    grad_logits = tf.expand_dims(softmax_scale, axis) * p * v
    grad_into_lse = (2.0 * lam * g - softmax_scale) * p_dot_v
    grad_grad_loss = a * p_dot_v - q_dot_v
    grad_labels = tf.expand_dims(g * (1.0 - eps), axis) * (tf.expand_dims(p_dot_v, axis) - v)
    return (
        tf.cast(grad_logits, logits.dtype),
        tf.cast(grad_labels, labels.dtype),
        grad_into_lse,
        tf.cast(grad_grad_loss, grad_loss.dtype),
        _grad_of_grad_lse(grad_lse, p_dot_v),
    )
