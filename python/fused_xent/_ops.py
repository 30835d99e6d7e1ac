"""TensorFlow functions mirroring tf.nn's softmax cross-entropy, on the fused op."""

import numbers

import tensorflow as tf

from fused_xent import _gradients  # noqa: F401  (registers the gradients)
from fused_xent._arguments import check_axis as _normalized_axis
from fused_xent._arguments import check_smoothing as _check_smoothing
from fused_xent._arguments import check_weight_values as _check_weight_values
from fused_xent._arguments import check_z_loss as _check_z_loss
from fused_xent._loader import load_op_library

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


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
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype.name}")
    if logits.shape.rank == 0:
        raise ValueError(f"`logits` cannot be a scalar. Received logits={logits}")
    return logits


def _static_classes(logits, axis):
    if logits.shape.rank is None:
        return None
    return logits.shape[axis]


def _class_weights(class_weights, logits, axis):
    if class_weights is None:
        return tf.zeros([0], tf.float32)
    if isinstance(class_weights, (tf.Tensor, tf.Variable)) and not class_weights.dtype.is_floating:
        raise TypeError(f"class_weights must be floating point, got {class_weights.dtype.name}")
    try:
        weights = tf.convert_to_tensor(class_weights, dtype=tf.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"class_weights must be a vector of floats: {error}") from None
    if weights.shape.rank != 1:
        raise ValueError(f"class_weights must be a vector (one weight per class), got shape {weights.shape}")
    classes = _static_classes(logits, axis)
    if classes is not None and weights.shape[0] is not None and weights.shape[0] != classes:
        raise ValueError(f"class_weights has {weights.shape[0]} entries but logits have {classes} classes")
    _check_weight_values(tf.get_static_value(weights))
    return weights


def _ignore_index_attrs(ignore_index):
    if ignore_index is None:
        return {"has_ignore_index": False, "ignore_index": 0}
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    if not tf.int64.min <= ignore_index <= tf.int64.max:  # no int32/int64 label equals it
        return {"has_ignore_index": False, "ignore_index": 0}
    return {"has_ignore_index": True, "ignore_index": int(ignore_index)}


def _check_sparse_shapes(labels, logits, axis):
    labels_shape, logits_shape = labels.shape, logits.shape
    if labels_shape.rank is None or logits_shape.rank is None:
        return
    if labels_shape.rank != logits_shape.rank - 1:
        raise ValueError(
            "`labels.shape.rank` must equal `logits.shape.rank - 1`. Received: "
            f"labels.shape={labels_shape} of rank {labels_shape.rank} and "
            f"logits.shape={logits_shape} of rank {logits_shape.rank}"
        )
    dims = logits_shape.as_list()
    del dims[axis]
    if not labels_shape.is_compatible_with(dims):
        raise ValueError(
            "`labels.shape` must equal `logits.shape` except for the class axis. Received: "
            f"labels.shape={labels_shape} and logits.shape={logits_shape}"
        )


def sparse_softmax_cross_entropy_with_logits(
    labels, logits, *, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0, axis=-1, name=None
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
      name: name scope for the ops.

    Returns:
      The per-example loss, shaped like ``labels``, in the dtype of ``logits``.
    """
    with tf.name_scope(name or "fused_sparse_softmax_cross_entropy_with_logits"):
        logits = _float_logits(logits)
        refuse_composite(labels, "labels")
        labels = tf.convert_to_tensor(labels, name="labels")
        if labels.dtype not in (tf.int32, tf.int64):
            raise TypeError(f"labels must be int32 or int64 class indices, got {labels.dtype.name}")
        axis = _normalized_axis(axis, logits.shape.rank)
        _check_sparse_shapes(labels, logits, axis)
        loss, _ = load_op_library().fused_xent_sparse_softmax_cross_entropy(
            logits,
            labels,
            _class_weights(class_weights, logits, axis),
            axis=axis,
            label_smoothing=_check_smoothing(label_smoothing),
            z_loss=_check_z_loss(z_loss),
            **_ignore_index_attrs(ignore_index),
        )
        return loss


def _broadcast_labels(labels, logits):
    if labels.shape.is_fully_defined() and logits.shape.is_fully_defined():
        if labels.shape == logits.shape:
            return labels
        try:
            tf.broadcast_static_shape(labels.shape, logits.shape)
        except ValueError:
            raise ValueError(
                f"logits and labels must be broadcastable: logits_size={logits.shape.as_list()} "
                f"labels_size={labels.shape.as_list()}"
            ) from None
    return tf.broadcast_to(labels, tf.shape(logits))


def softmax_cross_entropy_with_logits(labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, name=None):
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
      name: name scope for the ops.

    Returns:
      The per-example loss: ``logits``' shape without ``axis``, in their dtype.
    """
    with tf.name_scope(name or "fused_softmax_cross_entropy_with_logits"):
        logits = _float_logits(logits)
        axis = _normalized_axis(axis, logits.shape.rank)
        refuse_composite(labels, "labels")
        labels = tf.convert_to_tensor(labels, name="labels")
        if labels.dtype != logits.dtype:
            labels = tf.cast(labels, logits.dtype)
        labels = _broadcast_labels(labels, logits)
        loss, _ = load_op_library().fused_xent_softmax_cross_entropy(
            logits,
            labels,
            axis=axis,
            label_smoothing=_check_smoothing(label_smoothing),
            z_loss=_check_z_loss(z_loss),
        )
        return loss
