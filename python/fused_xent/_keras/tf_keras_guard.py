"""Whether tf_keras (Keras 2) is calling a Keras 3 loss or metric of this package.

tf_keras's ``compile`` takes any callable for a loss or a metric: it wraps a Keras 3
object in its ``LossFunctionWrapper`` or ``MeanMetricWrapper``, which call it as
``fn(y_true, y_pred)`` and apply ``sample_weight`` and ``class_weight`` to the
already reduced value, and it cannot save it. Nothing in the call itself tells the
two Keras apart, so the callers' modules do: between tf_keras and our code there are
only TensorFlow's (AutoGraph, tf.function) and Keras 3's own frames (``Metric.__call__``).
No framework is imported here.
"""

import sys

_PASSED_THROUGH = ("fused_xent", "tensorflow", "keras")


def _in_package(module, packages):
    return any(module == name or module.startswith(name + ".") for name in packages)


def called_by_tf_keras():
    """Whether the nearest caller outside fused_xent, TensorFlow and Keras 3 is tf_keras."""
    if "tf_keras" not in sys.modules:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if not _in_package(module, _PASSED_THROUGH):
            return _in_package(module, ("tf_keras",))
        frame = frame.f_back
    return False


def tf_keras_refusal(kind, class_name):
    """The message: `kind` is "losses" or "metrics"."""
    what = "loss" if kind == "losses" else "metric"
    return (
        f"fused_xent.{kind}.{class_name} is a Keras 3 {what}, and tf_keras (Keras 2) is using it: "
        "tf_keras takes Keras 3 objects for plain functions, applies sample_weight and class_weight "
        "to their reduced values and cannot reload them. With tf_keras (TF_USE_LEGACY_KERAS=1), use "
        f"fused_xent.tf_keras.{kind}.{class_name}."
    )
