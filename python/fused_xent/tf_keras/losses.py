"""tf_keras (Keras 2) losses on the fused op.

Subclasses of ``tf_keras.losses.Loss`` whose ``call`` returns the per-element
losses, so that tf_keras applies masks, ``sample_weight``, ``class_weight`` and
the reduction as for its own losses, and registered with tf_keras for saving.
They take the arguments of ``tf_keras.losses``' classes of the same names, in the
same order, plus keyword-only ``axis`` (sparse), ``label_smoothing`` (sparse),
``class_weights`` (sparse) and ``z_loss``, as ``fused_xent.losses``.
"""

import tensorflow as tf
import tf_keras

from fused_xent import _checks
from fused_xent._keras import arguments as _arguments
from fused_xent._tf import keras_elementwise as _tf_losses

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy"]

_AUTO = tf_keras.losses.Reduction.AUTO


def _registered(cls):
    return tf_keras.saving.register_keras_serializable(package="fused_xent")(cls)


class _FusedCrossentropy(_arguments.CrossentropyArguments, tf_keras.losses.Loss):
    """Shared arguments and the per-element ``call``."""

    def __init__(self, *, from_logits, label_smoothing, axis, z_loss, softcap, reduction, name):
        super().__init__(reduction=reduction, name=name)  # checks `reduction`
        self.from_logits = bool(from_logits)
        self.label_smoothing = _checks.keras_fraction("label_smoothing", label_smoothing)
        self.axis = _checks.keras_axis(axis)
        self.z_loss = _checks.keras_z_loss(z_loss)
        self.softcap = _checks.keras_softcap(softcap, self.from_logits)

    # No Python control flow on tensors: AutoGraph (tf_keras converts `call`) would only cost.
    @tf.autograph.experimental.do_not_convert
    def call(self, y_true, y_pred):
        """Per-element losses (float32 for half-precision logits, which tf_keras would sum in half)."""
        _tf_losses.refuse_composites(y_true, y_pred)
        losses, mask = self._losses(y_true, y_pred)
        if losses.dtype in (tf.float16, tf.bfloat16):
            losses = tf.cast(losses, tf.float32)
        if mask is not None:
            losses._keras_mask = mask  # what tf_keras's own loss sets for ignore_class
        return losses

    def _losses(self, y_true, y_pred):
        """(per-element losses, mask or None)."""
        raise NotImplementedError

    def _options(self):
        return self._per_element_options(tf_keras.backend.epsilon(), tf_keras.backend.floatx())

    def get_config(self):
        config = super().get_config()
        config.update(self._argument_config())
        return config


@_registered
class CategoricalCrossentropy(_FusedCrossentropy):
    """Cross-entropy between one-hot (or soft) labels and predictions, fused, for tf_keras.

    A drop-in for ``tf_keras.losses.CategoricalCrossentropy``.

    Args:
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        normalised and clipped as tf_keras does (a softmax output's logits are used).
      label_smoothing: epsilon in [0, 1]; targets become ``(1 - eps) * y_true + eps / C``.
      axis: the class axis.
      reduction: a ``tf_keras.losses.Reduction``.
      name: the loss's name.
      z_loss: lambda >= 0; adds ``z_loss * logsumexp(logits)**2`` per element.
      softcap: None, or cap > 0 (with ``from_logits=True``): the loss reads
        ``cap * tanh(logits / cap)``, fused.
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction=_AUTO,
        name="categorical_crossentropy",
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
        )

    def _losses(self, y_true, y_pred):
        return _tf_losses.categorical(y_true, y_pred, **self._options()), None


@_registered
class SparseCategoricalCrossentropy(_FusedCrossentropy):
    """Cross-entropy between integer labels and predictions, fused, for tf_keras.

    A drop-in for ``tf_keras.losses.SparseCategoricalCrossentropy``. Elements
    labelled ``ignore_class`` give 0 and carry a mask, so that tf_keras leaves
    them out of the mean, as with its own loss.

    Args:
      from_logits: whether ``y_pred`` holds logits; otherwise probabilities,
        clipped as tf_keras does (a softmax output's logits are used).
      ignore_class: an integer label whose elements give no loss and no gradient.
      reduction: a ``tf_keras.losses.Reduction``.
      name: the loss's name.
      axis: the class axis of ``y_pred``.
      label_smoothing: epsilon in [0, 1]; targets ``(1 - eps) * onehot + eps / C``.
      class_weights: optional length-C vector; each element's loss is scaled by
        its label's weight.
      z_loss: lambda >= 0; adds ``z_loss * logsumexp(logits)**2`` per element.
      softcap: None, or cap > 0 (with ``from_logits=True``): the loss reads
        ``cap * tanh(logits / cap)``, fused.
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction=_AUTO,
        name="sparse_categorical_crossentropy",
        *,
        axis=-1,
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
        )
        self.ignore_class = _checks.keras_ignore_class(ignore_class)
        self.class_weights = _checks.keras_class_weights(class_weights)

    def _losses(self, y_true, y_pred):
        losses, labels = _tf_losses.sparse(
            y_true, y_pred, class_weights=self.class_weights, ignore_class=self.ignore_class, **self._options()
        )
        return losses, _tf_losses.ignore_mask(labels, self.ignore_class)

    def get_config(self):
        config = super().get_config()
        config.update(ignore_class=self.ignore_class, class_weights=self.class_weights)
        return config
