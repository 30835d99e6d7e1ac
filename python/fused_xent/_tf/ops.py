"""TensorFlow functions mirroring tf.nn's softmax cross-entropy, on the fused op."""

import tensorflow as tf

from fused_xent import _checks, _registration
from fused_xent._tf import gradients  # noqa: F401  (registers the gradients)
from fused_xent._tf.loader import load_op_library


def refuse_composite(value, name):
    """Ragged and sparse tensors are refused with what to pass instead (converting
    them fails with an unrelated message)."""
    if isinstance(value, tf.RaggedTensor):
        raise TypeError(
            f"{name} is a tf.RaggedTensor, but fused_xent needs a dense tensor: pass {name}.to_tensor(), "
            "or the .flat_values of ragged logits and labels with the same row lengths"
        )
    if isinstance(value, (tf.SparseTensor, tf.compat.v1.SparseTensorValue)):
        raise TypeError(
            f"{name} is a tf.SparseTensor, but fused_xent needs a dense tensor: pass tf.sparse.to_dense({name})"
        )


def _float_logits(logits):
    refuse_composite(logits, "logits")
    logits = tf.convert_to_tensor(logits, name="logits")
    _checks.logits_dtype(logits.dtype.name)
    _checks.logits_rank(logits.shape.rank, logits)
    return logits


def _static_classes(logits, axis):
    if logits.shape.rank is None:
        return None
    return logits.shape[axis]


def class_weights_tensor(class_weights, classes):
    """The op's class-weight input: float32 (empty for none), checked where known."""
    if class_weights is None:
        return tf.zeros([0], tf.float32)
    if isinstance(class_weights, (tf.Tensor, tf.Variable)):
        _checks.class_weight_dtype(class_weights.dtype.name)
    try:
        weights = tf.convert_to_tensor(class_weights, dtype=tf.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"class_weights must be a vector of floats: {error}") from None
    if weights.shape.rank is not None:
        _checks.class_weight_shape(weights.shape.as_list(), classes)
    _checks.class_weight_values(tf.get_static_value(weights))
    return weights


def ignore_index_attrs(ignore_index):
    """The op's attributes; an ignore_index no int64 label can equal ignores nothing."""
    index = _checks.ignore_index_for(ignore_index, "int64")
    return {"has_ignore_index": index is not None, "ignore_index": 0 if index is None else index}


def option_attrs(label_smoothing, z_loss, softcap=None):
    return {
        "label_smoothing": _checks.label_smoothing(label_smoothing),
        "z_loss": _checks.z_loss(z_loss),
        "softcap": _checks.softcap(softcap),
    }


def _check_sparse_shapes(labels, logits, axis):
    if labels.shape.rank is None or logits.shape.rank is None:
        return
    _checks.sparse_shapes(labels.shape.as_list(), logits.shape.as_list(), axis)


def sparse_softmax_cross_entropy_with_logits(
    labels,
    logits,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    axis=-1,
    softcap=None,
    name=None,
):
    """Per-example softmax cross-entropy with integer class labels.

    A drop-in for ``tf.nn.sparse_softmax_cross_entropy_with_logits`` computed by
    one fused kernel (forward) and one fused kernel (gradient).

    Args:
      labels: int32/int64 tensor of class indices, the shape of ``logits``
        without the class axis.
        A label outside ``[0, C)`` that is not ``ignore_index`` raises
        ``InvalidArgumentError`` on the CPU, also under XLA
        (``jit_compile=True``); on a GPU, and under XLA's HLO lowering
        (``FUSED_XENT_XLA_LOWERING=hlo``), it gives NaN loss and gradient for
        its row instead (docs/xla.md).
      logits: float16, bfloat16, float32 or float64 tensor of unscaled scores.
      ignore_index: rows whose label equals it give loss 0 and gradient 0; it
        may lie outside ``[0, C)``.
      label_smoothing: epsilon in [0, 1]; the target becomes
        ``(1 - eps) * onehot + eps / C``.
      class_weights: optional length-C float vector of finite values >= 0; a
        row's loss and gradient are multiplied by the weight of its label.
      z_loss: lambda >= 0; adds ``lambda * logsumexp(logits)**2`` to each row.
      axis: the class axis of ``logits`` (default: the last).
      softcap: None, or cap > 0: the loss reads ``cap * tanh(logits / cap)``
        (Gemma's final-logit softcapping), fused; the gradient includes the tanh.
      name: name scope for the ops.

    Returns:
      The per-example loss, shaped like ``labels``, in the dtype of ``logits``.
    """
    with tf.name_scope(name or "fused_sparse_softmax_cross_entropy_with_logits"):
        logits = _float_logits(logits)
        refuse_composite(labels, "labels")
        labels = tf.convert_to_tensor(labels, name="labels")
        _checks.sparse_label_dtype(labels.dtype.name)
        axis = _checks.axis(axis, logits.shape.rank)
        _check_sparse_shapes(labels, logits, axis)
        loss, _ = load_op_library().fused_xent_sparse_softmax_cross_entropy(
            logits,
            labels,
            class_weights_tensor(class_weights, _static_classes(logits, axis)),
            axis=axis,
            **option_attrs(label_smoothing, z_loss, softcap),
            **ignore_index_attrs(ignore_index),
        )
        return loss


def _broadcast_labels(labels, logits):
    if labels.shape.is_fully_defined() and logits.shape.is_fully_defined():
        _checks.dense_label_shape(labels.shape.as_list(), logits.shape.as_list())
        if labels.shape == logits.shape:
            return labels
    return tf.broadcast_to(labels, tf.shape(logits))


def softmax_cross_entropy_with_logits(
    labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, softcap=None, name=None
):
    """Per-example softmax cross-entropy with a probability distribution as labels.

    A drop-in for ``tf.nn.softmax_cross_entropy_with_logits``: ``labels`` are
    cast to the logits' dtype and broadcast to their shape; ``axis`` is the
    class axis. The gradient flows to both ``logits`` and ``labels``.

    Args:
      labels: tensor broadcastable to ``logits``; each row a distribution.
      logits: float16, bfloat16, float32 or float64 tensor of unscaled scores.
      axis: the class axis.
      label_smoothing: epsilon in [0, 1]; the target becomes
        ``(1 - eps) * labels + eps / C``.
      z_loss: lambda >= 0; adds ``lambda * logsumexp(logits)**2`` to each row.
      softcap: None, or cap > 0: the loss reads ``cap * tanh(logits / cap)``, fused.
      name: name scope for the ops.

    Returns:
      The per-example loss: ``logits``' shape without ``axis``, in their dtype.
    """
    with tf.name_scope(name or "fused_softmax_cross_entropy_with_logits"):
        logits = _float_logits(logits)
        axis = _checks.axis(axis, logits.shape.rank)
        refuse_composite(labels, "labels")
        labels = tf.convert_to_tensor(labels, name="labels")
        if labels.dtype != logits.dtype:
            labels = tf.cast(labels, logits.dtype)
        labels = _broadcast_labels(labels, logits)
        loss, _ = load_op_library().fused_xent_softmax_cross_entropy(
            logits,
            labels,
            axis=axis,
            **option_attrs(label_smoothing, z_loss, softcap),
        )
        return loss


_registration.register(finishing=__name__)  # this module may have been the first import of a framework
