"""Gradients of the fused ops, first order and higher.

Forward ops output (loss, lse). Their gradient with respect to the logits is
the fused Grad op, which reads logits, labels, lse and the upstream gradient g
of the loss:

    dz = g * w * ((sum(q) + 2 lambda lse) * p - q),   p = exp(z - lse)

The Grad ops are differentiated here with a few TensorFlow element-wise ops:
that path (Hessian-vector products, gradient penalties) is rare and its cost is
dominated by the rest of the double backward. These functions recompute the
row logsumexp from the logits (tf.reduce_logsumexp) instead of reading the Grad
op's lse input, fold its derivative (d lse / d z = p) into the logits' gradient
and give the lse input no gradient. So nothing flows into the forward op's lse
output, and TensorFlow differentiates the recomputed logsumexp itself: every
higher derivative stays exact, as in JAX and PyTorch. The Grad ops' last input,
grad_lse, is kept for graphs saved by earlier versions, which fed lse's gradient
there; new graphs pass it empty and the kernels refuse anything else.
docs/derivation.md has the formulas.
"""

import numpy as np
import tensorflow as tf

from fused_xent._tf.loader import load_op_library

_SPARSE_ATTRS = ("axis", "label_smoothing", "z_loss", "softcap", "ignore_index", "has_ignore_index")
_DENSE_ATTRS = ("axis", "label_smoothing", "z_loss", "softcap")


def _attrs(op, names):
    attrs = {name: op.get_attr(name) for name in names}
    # The kernel sees float attrs as float32; eager ops report them as passed.
    for name in ("label_smoothing", "z_loss", "softcap"):
        attrs[name] = float(np.float32(attrs[name]))
    return attrs


def _capped(logits, cap):
    """(c, s, s') in float64 for a softcap: c = cap tanh(x / cap) (what the kernels read), s = dc/dx
    and s' = ds/dx, as TensorFlow ops so that higher derivatives see them."""
    x = tf.cast(logits, tf.float64)
    tanh = tf.tanh(x / cap)
    slope = 1.0 - tanh * tanh
    return cap * tanh, slope, -2.0 * tanh * slope / cap


def _input_gradient_needed(op, index):
    skip = getattr(op, "skip_input_indices", None)  # set by the eager tape
    return skip is None or index not in skip


# The Grad ops' legacy grad_lse input (cc/tf/ops.cc): always empty in new graphs.
def _legacy_empty_input():
    return tf.zeros([0], tf.float64)


def _softmax_and_lse(logits, axis):
    """(p, lse) recomputed from the logits with TensorFlow ops, in float64 (the Grad
    ops' lse dtype), so that TensorFlow differentiates lse itself at higher orders."""
    z = tf.cast(logits, tf.float64)
    lse = tf.reduce_logsumexp(z, axis)
    return tf.exp(z - tf.expand_dims(lse, axis)), lse


def _positive_axis(axis, logits):
    if axis >= 0:
        return axis
    rank = logits.shape.rank
    if rank is None:
        if axis == -1:
            return -1
        raise ValueError("second-order gradients need the rank of logits to be known when axis != -1")
    return axis + rank


def _neg_log_softmax(logits, lse, axis):
    """lse - z, in lse's dtype, from the forward op's lse. Its gradient goes to the
    logits only, lse's own dependence on them included (d lse / d z = p, from a
    recomputed lse): the forward op's lse output never takes a gradient."""

    @tf.custom_gradient
    def neg_log_p(z):
        def grad(u):
            p, _ = _softmax_and_lse(z, axis)
            u = tf.cast(u, p.dtype)
            return tf.cast(p * tf.reduce_sum(u, axis, keepdims=True) - u, z.dtype)

        return tf.expand_dims(lse, axis) - tf.cast(z, lse.dtype), grad

    return neg_log_p(logits)


# The forward ops' second output, lse, takes no gradient: the Grad ops' gradients
# below recompute lse rather than route one into it, and _neg_log_softmax folds its
# derivative into the logits'. TensorFlow still passes zeros for it; they are dropped.
@tf.RegisterGradient("FusedXent>SparseSoftmaxCrossEntropy")
def _sparse_forward_grad(op, grad_loss, _):
    logits, labels, class_weights = op.inputs
    lse = op.outputs[1]
    attrs = _attrs(op, _SPARSE_ATTRS)
    if grad_loss is None:
        grad_loss = tf.zeros_like(op.outputs[0])
    grad_logits = load_op_library().fused_xent_sparse_softmax_cross_entropy_grad(
        logits, labels, class_weights, lse, grad_loss, _legacy_empty_input(), **attrs
    )
    return grad_logits, None, None


@tf.RegisterGradient("FusedXent>SoftmaxCrossEntropy")
def _dense_forward_grad(op, grad_loss, _):
    logits, labels = op.inputs
    lse = op.outputs[1]
    attrs = _attrs(op, _DENSE_ATTRS)
    axis = attrs["axis"]
    if grad_loss is None:
        grad_loss = tf.zeros_like(op.outputs[0])
    grad_logits = load_op_library().fused_xent_softmax_cross_entropy_grad(
        logits, labels, lse, grad_loss, _legacy_empty_input(), **attrs
    )
    grad_labels = None
    if _input_gradient_needed(op, 1):
        # d loss / d t_j = (1 - eps) * (lse - z_j) = -(1 - eps) * log_softmax(z)_j
        scale = tf.cast(grad_loss, lse.dtype) * (1.0 - attrs["label_smoothing"])
        z = _capped(logits, attrs["softcap"])[0] if attrs["softcap"] else logits
        grad_labels = tf.cast(tf.expand_dims(scale, axis) * _neg_log_softmax(z, lse, axis), labels.dtype)
    return grad_logits, grad_labels


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


# The Grad ops' gradients. For the output dz = g w (a p - q), a = sum(q) + 2 lambda lse,
# and an incoming v (docs/derivation.md), with lse = logsumexp(z) recomputed here:
#   d/dz: g w (a p v + (2 lambda - a) (p . v) p)   (the second term: lse's own dependence on z)
#   d/dg: w (a (p . v) - q . v)
#   d/dt (dense labels): g (1 - eps) ((p . v) - v)
# and none for the lse input (the recomputed lse replaces it) or for grad_lse.
# With a softcap z = c(x), the op's output is s dz (s = c'(x)): the same terms with s v for v,
# and for x: s (d/dz along s v) + s' dz v.


def _logits_parts(logits, cap, v, axis):
    """(p, lse, v as the capped logits see it, finish) where finish(d_dz, dz) gives d/dx."""
    if not cap:
        p, lse = _softmax_and_lse(logits, axis)
        return p, lse, tf.cast(v, lse.dtype), lambda d_dz, dz: d_dz
    z, slope, slope_prime = _capped(logits, cap)
    p, lse = _softmax_and_lse(z, axis)
    v = tf.cast(v, lse.dtype)
    return p, lse, slope * v, lambda d_dz, dz: slope * d_dz + slope_prime * dz * v


@tf.RegisterGradient("FusedXent>SparseSoftmaxCrossEntropyGrad")
def _sparse_backward_grad(op, v):
    logits, labels, class_weights, _, grad_loss, _ = op.inputs
    attrs = _attrs(op, _SPARSE_ATTRS)
    axis, eps, lam = attrs["axis"], attrs["label_smoothing"], attrs["z_loss"]
    p, lse, v, finish = _logits_parts(logits, attrs["softcap"], v, axis)
    acc = lse.dtype
    g = tf.cast(grad_loss, acc)
    w = _sparse_row_weights(labels, class_weights, attrs, acc)
    classes = tf.cast(tf.shape(logits)[axis], acc)
    onehot = tf.one_hot(labels, tf.shape(logits)[axis], axis=_positive_axis(axis, logits), dtype=acc)
    p_dot_v = tf.reduce_sum(p * v, axis)
    q_dot_v = (1.0 - eps) * tf.reduce_sum(onehot * v, axis) + eps / classes * tf.reduce_sum(v, axis)
    a = 1.0 + 2.0 * lam * lse
    gw = g * w
    grad_logits = p * (tf.expand_dims(gw * a, axis) * v + tf.expand_dims(gw * (2.0 * lam - a) * p_dot_v, axis))
    if attrs["softcap"]:
        dz = tf.expand_dims(gw, axis) * (tf.expand_dims(a, axis) * p - ((1.0 - eps) * onehot + eps / classes))
        grad_logits = finish(grad_logits, dz)
    grad_grad_loss = w * (a * p_dot_v - q_dot_v)
    return (
        tf.cast(grad_logits, logits.dtype),
        None,
        None,
        None,
        tf.cast(grad_grad_loss, grad_loss.dtype),
        None,
    )


@tf.RegisterGradient("FusedXent>SoftmaxCrossEntropyGrad")
def _dense_backward_grad(op, v):
    logits, labels, _, grad_loss, _ = op.inputs
    attrs = _attrs(op, _DENSE_ATTRS)
    axis, eps, lam = attrs["axis"], attrs["label_smoothing"], attrs["z_loss"]
    p, lse, v, finish = _logits_parts(logits, attrs["softcap"], v, axis)
    acc = lse.dtype
    t = tf.cast(labels, acc)
    g = tf.cast(grad_loss, acc)
    classes = tf.cast(tf.shape(logits)[axis], acc)
    p_dot_v = tf.reduce_sum(p * v, axis)
    q_dot_v = (1.0 - eps) * tf.reduce_sum(t * v, axis) + eps / classes * tf.reduce_sum(v, axis)
    a = (1.0 - eps) * tf.reduce_sum(t, axis) + eps + 2.0 * lam * lse
    grad_logits = p * (tf.expand_dims(g * a, axis) * v + tf.expand_dims(g * (2.0 * lam - a) * p_dot_v, axis))
    if attrs["softcap"]:
        dz = tf.expand_dims(g, axis) * (tf.expand_dims(a, axis) * p - ((1.0 - eps) * t + eps / classes))
        grad_logits = finish(grad_logits, dz)
    grad_grad_loss = a * p_dot_v - q_dot_v
    grad_labels = tf.expand_dims(g * (1.0 - eps), axis) * (tf.expand_dims(p_dot_v, axis) - v)
    return (
        tf.cast(grad_logits, logits.dtype),
        tf.cast(grad_labels, labels.dtype),
        None,
        tf.cast(grad_grad_loss, grad_loss.dtype),
        None,
    )
