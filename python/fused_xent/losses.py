"""Keras losses on the fused op: drop-in replacements for Keras's cross-entropies.

``CategoricalCrossentropy`` and ``SparseCategoricalCrossentropy`` take the
constructor arguments of ``keras.losses``' classes of the same names and give
the same values on the same inputs: every reduction, ``sample_weight``, Keras
masks, probabilities (``from_logits=False``, with Keras's normalisation and
clipping) and softmax outputs (whose logits are used, as Keras does). Beyond
Keras: ``axis`` for sparse labels, label smoothing for sparse labels,
``class_weights``, ``z_loss``, and no float32 copy of half-precision logits
under mixed precision (the kernel reads them and accumulates in float32).

They run on Keras's TensorFlow, JAX (``fused_xent.jax``) and PyTorch
(``fused_xent.torch``) backends; on JAX and PyTorch the backend's fused function
gives the per-element losses and Keras's own code reduces them (the arguments
are converted to the loss dtype first, as Keras does). ``import fused_xent``
registers them, so models saved with them load after that import. docs/keras.md has the details.
"""

import numpy as np

from fused_xent import _arguments
from fused_xent._tf_keras_guard import called_by_tf_keras, tf_keras_refusal

try:
    import keras
except ImportError as error:  # e.g. KERAS_BACKEND names a backend that is not installed
    keras = None
    _keras_import_error = error

_BACKEND = None if keras is None else keras.backend.backend()
_BACKENDS = ("tensorflow", "jax", "torch")

if _BACKEND in (None, "tensorflow"):
    import tensorflow as tf

    from fused_xent import _tf_losses

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy"]

# ---------------------------------------------------------------- arguments


def _require_supported_backend(class_name, module="losses"):
    if keras is None:
        raise RuntimeError(
            f"fused_xent.{module}.{class_name} needs Keras, but importing keras failed "
            f"({type(_keras_import_error).__name__}: {_keras_import_error})."
        )
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise RuntimeError(
            f"fused_xent.{module}.{class_name} runs on Keras's TensorFlow, JAX or PyTorch backend, but Keras "
            f"runs on the {backend!r} backend. Set KERAS_BACKEND before importing keras."
        )
    if backend != _BACKEND:
        raise RuntimeError(
            f"fused_xent.losses was imported for Keras's {_BACKEND!r} backend, but Keras now runs on {backend!r}."
        )


def _backend_module():
    """The fused functions of Keras's (non-TensorFlow) backend."""
    import importlib

    return importlib.import_module(f"fused_xent.{_BACKEND}")


def _keras_mask(tensor):
    try:  # Keras keeps masks in a private attribute (or a side table for C types)
        from keras.src.backend import get_keras_mask
    except ImportError:
        return getattr(tensor, "_keras_mask", None)
    return get_keras_mask(tensor)


def _refuse_tf_keras(kind, class_name):
    """tf_keras takes a Keras 3 object for a plain function and gets wrong numbers from it."""
    if called_by_tf_keras():
        raise TypeError(tf_keras_refusal(kind, class_name))


# ---------------------------------------------------------------- reduction (Keras's semantics)


def _align_weights(values, weights):
    """Keras's rule: drop or add one trailing size-1 axis so the ranks agree; a
    lower-rank weight (per sample for per-time-step losses, where Keras fails)
    then gets trailing axes so that it broadcasts over the extra axes."""
    v_rank, w_rank = values.shape.rank, weights.shape.rank
    if w_rank == v_rank + 1 and weights.shape[-1] == 1:
        if v_rank == 1:
            values = tf.expand_dims(values, -1)
        else:
            weights = tf.squeeze(weights, -1)
    elif v_rank == w_rank + 1 and values.shape[-1] == 1:
        if w_rank == 1:
            weights = tf.expand_dims(weights, -1)
        else:
            values = tf.squeeze(values, -1)
    missing = values.shape.rank - weights.shape.rank
    if weights.shape.rank > 0 and missing > 0:
        weights = tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones([missing], tf.int32)], 0))
    return values, weights


def _mask_as_weights(mask, sample_weight, reduction, dtype):
    """Masked-out entries get weight 0; for the per-element means the others get
    total/valid, so that dividing by the element count averages the valid ones."""
    weights = tf.cast(mask, dtype)
    if reduction in ("sum_over_batch_size", "mean"):
        total = tf.cast(tf.size(weights), dtype)
        weights = weights * tf.math.divide_no_nan(total, tf.reduce_sum(weights))
    if sample_weight is None:
        return weights
    weights, sample_weight = _align_weights(weights, sample_weight)
    return sample_weight * weights


def _per_replica(loss):
    """Keras sums gradients over replicas, so a mean is divided by their number."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * tf.cast(1.0 / replicas, loss.dtype) if replicas > 1 else loss


def _reduce(values, sample_weight, mask, reduction, dtype):
    values = tf.cast(values, dtype)
    if sample_weight is not None:
        sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), dtype)
    if mask is not None:
        sample_weight = _mask_as_weights(mask, sample_weight, reduction, dtype)
    if sample_weight is not None:
        values, sample_weight = _align_weights(values, sample_weight)
        values = values * sample_weight
    if reduction in (None, "none") or values.shape.as_list() in ([], [0]):
        return values
    total = tf.reduce_sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        divisor = tf.reduce_sum(sample_weight)
    else:
        divisor = tf.cast(tf.size(values), dtype)
    return _per_replica(tf.math.divide_no_nan(total, divisor))


def _combined_weight(sample_weight, weight, dtype):
    """sample_weight times a per-element weight (shaped like the losses)."""
    weight = tf.cast(weight, dtype)
    if sample_weight is None:
        return weight
    sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), dtype)
    weight, sample_weight = _align_weights(weight, sample_weight)
    return weight * sample_weight


def _and_masks(first, second):
    if first is None or second is None:
        return second if first is None else first
    return tf.logical_and(tf.cast(first, tf.bool), tf.cast(second, tf.bool))


# ---------------------------------------------------------------- JAX and PyTorch backends (keras.ops)


def _keras_inputs(y_true, y_pred, dtype):
    """As Keras's Loss.__call__: both converted to the loss dtype (integer labels too)."""
    ops = keras.ops
    return ops.convert_to_tensor(y_true, dtype=dtype), ops.convert_to_tensor(y_pred, dtype=dtype)


def _set_keras_mask(tensor, mask):
    try:
        from keras.src.backend import set_keras_mask
    except ImportError:
        return
    set_keras_mask(tensor, mask)


def _keras_check_rank(y_pred, axis):
    rank = len(y_pred.shape)
    if rank < 1:
        raise ValueError(f"`y_pred` must have a known rank of at least 1. Received: y_pred.shape={y_pred.shape}")
    if not -rank <= axis < rank:
        raise ValueError(f"`axis`={axis} is out of range for `y_pred` of rank {rank}")


def _keras_log_probabilities(y_pred, axis):
    """log of Keras's normalised and clipped probabilities (its JAX and PyTorch backends normalise sparse ones too)."""
    ops = keras.ops
    p = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
    eps = keras.backend.epsilon()
    return ops.log(ops.clip(p, eps, 1.0 - eps))


def _keras_sparse_labels(y_true, logits, axis):
    ops = keras.ops
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


def _keras_combined_weight(sample_weight, weight, dtype):
    """sample_weight times a per-element weight; a lower-rank sample_weight broadcasts over the extra axes."""
    from keras.src.losses.loss import squeeze_or_expand_to_same_rank

    ops = keras.ops
    weight = ops.cast(weight, dtype)
    if sample_weight is None:
        return weight
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), dtype)
    weight, sample_weight = squeeze_or_expand_to_same_rank(weight, sample_weight)
    missing = len(weight.shape) - len(sample_weight.shape)
    if len(sample_weight.shape) > 0 and missing > 0:
        sample_weight = ops.reshape(sample_weight, tuple(sample_weight.shape) + (1,) * missing)
    return weight * sample_weight


# ---------------------------------------------------------------- the losses

# Without Keras the module still imports (fused_xent imports it); constructing a loss then explains.
_LossBase = object if keras is None else keras.losses.Loss


def _registered(cls):
    return cls if keras is None else keras.saving.register_keras_serializable(package="fused_xent")(cls)


class _FusedCrossentropy(_arguments.CrossentropyArguments, _LossBase):
    """Shared __call__: like Keras's, but y_pred keeps its float dtype."""

    def __init__(self, *, from_logits, label_smoothing, axis, z_loss, reduction, name, dtype):
        _require_supported_backend(type(self).__name__)
        super().__init__(name=name, reduction=reduction, dtype=dtype)  # checks `reduction`
        self.from_logits = bool(from_logits)
        self.label_smoothing = _arguments.keras_fraction("label_smoothing", label_smoothing)
        self.axis = _arguments.keras_axis(axis)
        self.z_loss = _arguments.keras_z_loss(z_loss)
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def __call__(self, y_true, y_pred, sample_weight=None):
        _refuse_tf_keras("losses", type(self).__name__)
        if _BACKEND != "tensorflow":
            return self._keras_ops_call(y_true, y_pred, sample_weight)
        _tf_losses.refuse_composites(y_true, y_pred)
        input_mask = _keras_mask(y_pred)
        with keras.name_scope(self.name):
            losses, loss_mask, extra_weight = self._losses(y_true, y_pred)
            if extra_weight is not None:
                sample_weight = _combined_weight(sample_weight, extra_weight, self.dtype)
            mask = _and_masks(input_mask, loss_mask)
            return _reduce(losses, sample_weight, mask, self.reduction, self.dtype)

    def call(self, y_true, y_pred):
        """The per-element losses, before masks, weights and reduction (elements of
        ``ignore_class`` are 0 and carry a Keras mask, as Keras's functions give them)."""
        if _BACKEND != "tensorflow":
            return self._keras_ops_per_element(y_true, y_pred)
        _tf_losses.refuse_composites(y_true, y_pred)
        losses, mask, extra_weight = self._losses(y_true, y_pred)
        losses = tf.cast(losses, self.dtype)
        if extra_weight is not None:
            losses = losses * tf.cast(extra_weight, self.dtype)
        if mask is not None:
            _set_keras_mask(losses, mask)
        return losses

    def _losses(self, y_true, y_pred):
        """Returns (per-element losses, mask or None, per-element weight or None)."""
        raise NotImplementedError

    # JAX and PyTorch backends: the backend's fused function, then Keras's own reduction.

    def _keras_ops_call(self, y_true, y_pred, sample_weight):
        from keras.src.losses.loss import reduce_weighted_values

        input_mask = _keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_true, y_pred = _keras_inputs(y_true, y_pred, self.dtype)
            losses, loss_mask, extra_weight = self._keras_ops_losses(y_true, y_pred)
            if extra_weight is not None:
                sample_weight = _keras_combined_weight(sample_weight, extra_weight, self.dtype)
            mask = input_mask if loss_mask is None else loss_mask if input_mask is None else input_mask & loss_mask
            return reduce_weighted_values(
                losses, sample_weight=sample_weight, mask=mask, reduction=self.reduction, dtype=self.dtype
            )

    def _keras_ops_per_element(self, y_true, y_pred):
        ops = keras.ops
        y_true, y_pred = _keras_inputs(y_true, y_pred, self.dtype)
        losses, mask, extra_weight = self._keras_ops_losses(y_true, y_pred)
        losses = ops.cast(losses, self.dtype)
        if extra_weight is not None:
            losses = losses * ops.cast(extra_weight, self.dtype)
        if mask is not None:
            _set_keras_mask(losses, mask)  # as Keras's ignore_class does
        return losses

    def _keras_ops_losses(self, y_true, y_pred):
        """_losses with keras.ops and the backend's fused function."""
        raise NotImplementedError

    def _options(self):
        return self._per_element_options(keras.backend.epsilon(), self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(self._argument_config(), dtype=self._dtype_argument)
        return config


@_registered
class CategoricalCrossentropy(_FusedCrossentropy):
    """Cross-entropy between one-hot (or soft) labels and predictions, fused.

    A drop-in for ``keras.losses.CategoricalCrossentropy`` with the same
    arguments and values, plus ``z_loss`` (adds ``z_loss * logsumexp(logits)**2``
    per element; it acts on logits, so on plain probabilities it has no effect).

    Args:
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        normalised and clipped as Keras does (a softmax output's logits are used).
      label_smoothing: epsilon in [0, 1]; targets become ``(1 - eps) * y_true + eps / C``.
      axis: the class axis.
      reduction: ``"sum_over_batch_size"``, ``"sum"``, ``"mean"``,
        ``"mean_with_sample_weight"``, ``"none"`` or None.
      name: the loss's name.
      dtype: dtype (or policy) of the result; None means ``keras.config.floatx()``.
      z_loss: lambda >= 0 of the z-loss.
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
        *,
        z_loss=0.0,
    ):
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def _losses(self, y_true, y_pred):
        return _tf_losses.categorical(y_true, y_pred, **self._options()), None, None

    def _keras_ops_losses(self, y_true, y_pred):
        ops = keras.ops
        _keras_check_rank(y_pred, self.axis)
        if tuple(y_true.shape) != tuple(y_pred.shape):
            raise ValueError(
                "Arguments `y_true` and `y_pred` must have the same shape. "
                f"Received: y_true.shape={tuple(y_true.shape)}, y_pred.shape={tuple(y_pred.shape)}"
            )
        fused = _backend_module().softmax_cross_entropy_with_logits
        options = dict(axis=self.axis, label_smoothing=self.label_smoothing, z_loss=self.z_loss)
        if self.from_logits:
            return fused(y_true, y_pred, **options), None, None
        eps = keras.backend.epsilon()
        clipped = ops.clip(y_pred / ops.sum(y_pred, axis=self.axis, keepdims=True), eps, 1.0 - eps)
        losses = fused(y_true, ops.log(clipped), **options)
        target_mass = (1.0 - self.label_smoothing) * ops.sum(y_true, axis=self.axis) + self.label_smoothing
        return losses - target_mass * ops.log(ops.sum(clipped, axis=self.axis)), None, None


@_registered
class SparseCategoricalCrossentropy(_FusedCrossentropy):
    """Cross-entropy between integer labels and predictions, fused.

    A drop-in for ``keras.losses.SparseCategoricalCrossentropy`` with the same
    arguments and values. Beyond Keras: any class ``axis``, ``label_smoothing``
    (targets ``(1 - eps) * onehot + eps / C``), ``class_weights`` and ``z_loss``.

    ``class_weights`` act like per-element sample weights equal to the weight of
    each element's label (as ``fit(class_weight=...)`` does): ``"sum_over_batch_size"``
    divides the weighted sum by the number of (unmasked) elements, and
    ``"mean_with_sample_weight"`` by the sum of the combined weights.

    Args:
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        clipped as Keras does (a softmax output's logits are used).
      ignore_class: an integer label whose elements give no loss and no
        gradient, and are left out of the mean (a Keras mask).
      reduction: ``"sum_over_batch_size"``, ``"sum"``, ``"mean"``,
        ``"mean_with_sample_weight"``, ``"none"`` or None.
      axis: the class axis of ``y_pred``.
      name: the loss's name.
      dtype: dtype (or policy) of the result; None means ``keras.config.floatx()``.
      label_smoothing: epsilon in [0, 1].
      class_weights: optional length-C vector of per-class weights.
      z_loss: lambda >= 0; adds ``z_loss * logsumexp(logits)**2`` per element.
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
        *,
        label_smoothing=0.0,
        class_weights=None,
        z_loss=0.0,
    ):
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )
        self.ignore_class = _arguments.keras_ignore_class(ignore_class)
        self.class_weights = _arguments.keras_class_weights(class_weights)

    def _losses(self, y_true, y_pred):
        # The weighted mean divides by the sum of the weights, class weights
        # included, so they go into the sample weights instead of the op.
        weights_as_samples = self.class_weights is not None and self.reduction == "mean_with_sample_weight"
        losses, labels = _tf_losses.sparse(
            y_true,
            y_pred,
            class_weights=None if weights_as_samples else self.class_weights,
            ignore_class=self.ignore_class,
            **self._options(),
        )
        extra_weight = _tf_losses.label_weights(labels, self.class_weights) if weights_as_samples else None
        return losses, _tf_losses.ignore_mask(labels, self.ignore_class), extra_weight

    def _keras_ops_losses(self, y_true, y_pred):
        ops = keras.ops
        _keras_check_rank(y_pred, self.axis)
        labels = _keras_sparse_labels(y_true, y_pred, self.axis)
        scores = y_pred if self.from_logits else _keras_log_probabilities(y_pred, self.axis)
        weights_as_samples = self.class_weights is not None and self.reduction == "mean_with_sample_weight"
        class_weights = None if self.class_weights is None else np.asarray(self.class_weights, np.float32)
        losses = _backend_module().sparse_softmax_cross_entropy_with_logits(
            labels,
            scores,
            ignore_index=self.ignore_class,
            label_smoothing=self.label_smoothing,
            class_weights=None if weights_as_samples else class_weights,
            z_loss=self.z_loss,
            axis=self.axis,
        )
        extra_weight = None
        if weights_as_samples:
            in_range = ops.clip(labels, 0, len(self.class_weights) - 1)
            extra_weight = ops.take(ops.convert_to_tensor(class_weights), in_range)
        mask = None
        if self.ignore_class is not None and -(2**31) <= self.ignore_class < 2**31:  # labels are int32
            mask = ops.not_equal(labels, self.ignore_class)
        return losses, mask, extra_weight

    def get_config(self):
        config = super().get_config()
        config.update(ignore_class=self.ignore_class, class_weights=self.class_weights)
        return config
