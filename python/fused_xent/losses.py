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
(``fused_xent.torch``) backends: the backend's per-element functions are picked
once, at import, and every backend reduces with one rule (Keras's own, plus
sample weights of lower rank than the losses; fused_xent._keras.reduction). ``import fused_xent``
registers them, so models saved with them load after that import. docs/keras.md has the details.
"""

import importlib

from fused_xent import _checks, _registration
from fused_xent._keras import arguments as _arguments
from fused_xent._keras.backend_check import BACKEND as _BACKEND
from fused_xent._keras.backend_check import SUPPORTED as _BACKENDS
from fused_xent._keras.backend_check import keras, require_supported_backend
from fused_xent._keras.tf_keras_guard import called_by_tf_keras, tf_keras_refusal

if _BACKEND in _BACKENDS:
    from fused_xent._keras import compat as _compat
    from fused_xent._keras import reduction as _reduction

    # The per-element functions of this backend: TensorFlow's (which keep half-precision logits
    # whole and find a softmax's logits) or keras.ops around fused_xent.jax / fused_xent.torch.
    _elementwise = importlib.import_module(
        "fused_xent._tf.keras_elementwise" if _BACKEND == "tensorflow" else "fused_xent._keras.ops_backend"
    )

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy"]


def _refuse_tf_keras(kind, class_name):
    """tf_keras takes a Keras 3 object for a plain function and gets wrong numbers from it."""
    if called_by_tf_keras():
        raise TypeError(tf_keras_refusal(kind, class_name))


# ---------------------------------------------------------------- the losses

# Without Keras the module still imports (fused_xent imports it); constructing a loss then explains.
_LossBase = object if keras is None else keras.losses.Loss


def _registered(cls):
    return cls if keras is None else keras.saving.register_keras_serializable(package="fused_xent")(cls)


class _FusedCrossentropy(_arguments.CrossentropyArguments, _LossBase):
    """Shared __call__: like Keras's, but on TensorFlow y_pred keeps its float dtype."""

    def __init__(self, *, from_logits, label_smoothing, axis, z_loss, softcap, reduction, name, dtype):
        require_supported_backend(type(self).__name__, "losses")
        super().__init__(name=name, reduction=reduction, dtype=_compat.loss_dtype(dtype))  # checks `reduction`
        self.from_logits = bool(from_logits)
        self.label_smoothing = _checks.keras_fraction("label_smoothing", label_smoothing)
        self.axis = _checks.keras_axis(axis)
        self.z_loss = _checks.keras_z_loss(z_loss)
        self.softcap = _checks.keras_softcap(softcap, self.from_logits)
        self._dtype_argument = None if dtype is None else _compat.loss_dtype_name(self, dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        _refuse_tf_keras("losses", type(self).__name__)
        input_mask = _compat.get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            losses, loss_mask, extra_weight = self._losses(y_true, y_pred)
            if extra_weight is not None:
                sample_weight = _reduction.combined_weight(sample_weight, extra_weight, self.dtype)
            mask = _reduction.and_masks(input_mask, loss_mask)
            return _reduction.reduce(losses, sample_weight, mask, self.reduction, self.dtype)

    def call(self, y_true, y_pred):
        """The per-element losses, before masks, weights and reduction (elements of
        ``ignore_class`` are 0 and carry a Keras mask, as Keras's functions give them)."""
        losses, mask, extra_weight = self._losses(y_true, y_pred)
        losses = keras.ops.cast(losses, self.dtype)
        if extra_weight is not None:
            losses = losses * keras.ops.cast(extra_weight, self.dtype)
        if mask is not None:
            _compat.set_keras_mask(losses, mask)
        return losses

    def _inputs(self, y_true, y_pred):
        _elementwise.refuse_composites(y_true, y_pred)
        return _elementwise.keras_inputs(y_true, y_pred, self.dtype)

    def _losses(self, y_true, y_pred):
        """Returns (per-element losses, mask or None, per-element weight or None)."""
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
      softcap: None, or cap > 0 (with ``from_logits=True``): the loss reads
        ``cap * tanh(logits / cap)`` (Gemma's final-logit softcapping), fused.
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
        softcap=None,
    ):
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def _losses(self, y_true, y_pred):
        y_true, y_pred = self._inputs(y_true, y_pred)
        return _elementwise.categorical(y_true, y_pred, **self._options()), None, None


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
      softcap: None, or cap > 0 (with ``from_logits=True``): the loss reads
        ``cap * tanh(logits / cap)``, fused.
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
        softcap=None,
    ):
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )
        self.ignore_class = _checks.keras_ignore_class(ignore_class)
        self.class_weights = _checks.keras_class_weights(class_weights)

    def _losses(self, y_true, y_pred):
        y_true, y_pred = self._inputs(y_true, y_pred)
        # The weighted mean divides by the sum of the weights, class weights
        # included, so they go into the sample weights instead of the op.
        weights_as_samples = self.class_weights is not None and self.reduction == "mean_with_sample_weight"
        losses, labels = _elementwise.sparse(
            y_true,
            y_pred,
            class_weights=None if weights_as_samples else self.class_weights,
            ignore_class=self.ignore_class,
            **self._options(),
        )
        extra_weight = _elementwise.label_weights(labels, self.class_weights) if weights_as_samples else None
        return losses, _elementwise.ignore_mask(labels, self.ignore_class), extra_weight

    def get_config(self):
        config = super().get_config()
        config.update(ignore_class=self.ignore_class, class_weights=self.class_weights)
        return config


_registration.register(finishing=__name__)  # this module may have been the first import of a framework
