"""Keras metrics on the fused op: ``keras.metrics``' cross-entropy metrics, computed by the kernel.

``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy`` take the
arguments of Keras's metrics of the same names, in the same order, and give
their values: the mean over the samples seen since the last ``reset_state``,
weighted by ``sample_weight``. They run on Keras's TensorFlow, JAX and PyTorch
backends, through the per-element losses of ``fused_xent.losses``: only the
forward kernel (one pass over the logits), never the gradient. ``import fused_xent``
registers them, so models compiled with them load after that import.
"""

from fused_xent import _registration
from fused_xent._keras import arguments as _arguments
from fused_xent._keras.backend_check import keras, require_supported_backend
from fused_xent._keras.tf_keras_guard import called_by_tf_keras, tf_keras_refusal

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy"]

# Without Keras the module still imports; constructing a metric then explains.
_MetricBase = object if keras is None else keras.metrics.MeanMetricWrapper


def _registered(cls):
    """Registered as "fused_xent>...Metric": the losses hold the class names themselves."""
    if keras is None:
        return cls
    return keras.saving.register_keras_serializable(package="fused_xent", name=cls.__name__ + "Metric")(cls)


class _FusedCrossentropyMetric(_arguments.CrossentropyArguments, _MetricBase):
    """The mean of a fused loss's per-element values (its ``call``), as Keras's metrics take it."""

    _CONFIG_ARGUMENTS = ("from_logits", "label_smoothing", "axis", "softcap")

    def __init__(self, loss, name, dtype):
        super().__init__(fn=loss.call, name=name, dtype=dtype)
        self._fused_loss = loss
        self._keep_arguments_of(loss)
        self._direction = "down"  # to be minimised, as Keras's cross-entropy metrics

    def _refuse_tf_keras(self):
        if called_by_tf_keras():
            raise TypeError(tf_keras_refusal("metrics", type(self).__name__))

    @property
    def variables(self):
        self._refuse_tf_keras()  # tf_keras's compile reads them first
        return super().variables

    def update_state(self, y_true, y_pred, sample_weight=None):
        self._refuse_tf_keras()
        return super().update_state(y_true, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, **self._argument_config()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@_registered
class CategoricalCrossentropy(_FusedCrossentropyMetric):
    """The mean categorical cross-entropy, like ``keras.metrics.CategoricalCrossentropy``.

    Args:
      name: the metric's name.
      dtype: dtype of the metric's variables and result.
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        normalised and clipped as Keras does.
      label_smoothing: epsilon in [0, 1]; targets become ``(1 - eps) * y_true + eps / C``.
      axis: the class axis.
      softcap: None, or cap > 0 (with ``from_logits=True``; beyond Keras), as the loss.
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
        require_supported_backend(type(self).__name__, "metrics")
        from fused_xent import losses as _losses

        loss = _losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=label_smoothing, axis=axis, softcap=softcap
        )
        super().__init__(loss, name=name, dtype=dtype)


@_registered
class SparseCategoricalCrossentropy(_FusedCrossentropyMetric):
    """The mean sparse categorical cross-entropy, like ``keras.metrics.SparseCategoricalCrossentropy``.

    Args:
      name: the metric's name.
      dtype: dtype of the metric's variables and result.
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        clipped as Keras does.
      ignore_class: an integer label whose elements give 0 and carry a Keras
        mask (so that a ``sample_weight`` leaves them out), as in Keras.
      axis: the class axis (any axis).
      label_smoothing: epsilon in [0, 1] (beyond Keras): targets
        ``(1 - eps) * onehot + eps / C``, as the loss of the same name.
      softcap: None, or cap > 0 (with ``from_logits=True``; beyond Keras), as the loss.
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
        require_supported_backend(type(self).__name__, "metrics")
        from fused_xent import losses as _losses

        loss = _losses.SparseCategoricalCrossentropy(
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            softcap=softcap,
        )
        super().__init__(loss, name=name, dtype=dtype)


_registration.register(finishing=__name__)  # this module may have been the first import of a framework
