"""tf_keras (Keras 2) metrics on the fused op.

``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy`` take the
arguments of ``tf_keras.metrics``' classes of the same names, in the same order,
and give their values: the weighted mean of the per-element losses of
``fused_xent.tf_keras.losses`` (the forward kernel only, never the gradient).
"""

import tf_keras

from fused_xent._keras import arguments as _arguments
from fused_xent.tf_keras import losses as _losses

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy"]


def _registered(cls):
    """Registered as "fused_xent>...Metric": the losses hold the class names themselves."""
    return tf_keras.saving.register_keras_serializable(package="fused_xent", name=cls.__name__ + "Metric")(cls)


class _FusedCrossentropyMetric(_arguments.CrossentropyArguments, tf_keras.metrics.MeanMetricWrapper):
    """The mean of a fused loss's per-element values, as tf_keras's metrics take it."""

    _CONFIG_ARGUMENTS = ("from_logits", "label_smoothing", "axis", "softcap")

    def __init__(self, loss, name, dtype):
        super().__init__(loss.call, name, dtype=dtype)
        self._fused_loss = loss
        self._keep_arguments_of(loss)

    def get_config(self):
        config = super().get_config()
        config.update(self._argument_config())
        return config


@_registered
class CategoricalCrossentropy(_FusedCrossentropyMetric):
    """The mean categorical cross-entropy, like ``tf_keras.metrics.CategoricalCrossentropy``.

    Args:
      name: the metric's name.
      dtype: dtype of the metric's result.
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities.
      label_smoothing: epsilon in [0, 1]; targets become ``(1 - eps) * y_true + eps / C``.
      axis: the class axis.
      softcap: None, or cap > 0 (with ``from_logits=True``), as the loss.
    """

    def __init__(
        self,
        name="categorical_crossentropy",
        dtype=None,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        *,
        softcap=None,
    ):
        loss = _losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=label_smoothing, axis=axis, softcap=softcap
        )
        super().__init__(loss, name=name, dtype=dtype)


@_registered
class SparseCategoricalCrossentropy(_FusedCrossentropyMetric):
    """The mean sparse categorical cross-entropy, like ``tf_keras.metrics.SparseCategoricalCrossentropy``.

    Args:
      name: the metric's name.
      dtype: dtype of the metric's result.
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities.
      ignore_class: an integer label whose elements are left out, as in tf_keras.
      axis: the class axis (any axis).
      label_smoothing: epsilon in [0, 1] (beyond tf_keras).
      softcap: None, or cap > 0 (with ``from_logits=True``), as the loss.
    """

    _CONFIG_ARGUMENTS = ("from_logits", "ignore_class", "axis", "label_smoothing", "softcap")

    def __init__(
        self,
        name="sparse_categorical_crossentropy",
        dtype=None,
        from_logits=False,
        ignore_class=None,
        axis=-1,
        *,
        label_smoothing=0.0,
        softcap=None,
    ):
        loss = _losses.SparseCategoricalCrossentropy(
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            softcap=softcap,
        )
        super().__init__(loss, name=name, dtype=dtype)
