"""Keras 2 (tf_keras) losses and metrics on the fused op.

``fused_xent.tf_keras.losses.SparseCategoricalCrossentropy`` and
``.CategoricalCrossentropy`` subclass ``tf_keras.losses.Loss`` and
``fused_xent.tf_keras.metrics``' classes ``tf_keras.metrics.MeanMetricWrapper``,
with tf_keras's arguments: tf_keras applies ``sample_weight``, ``class_weight``,
masks and the reduction to their per-element values itself, and saves and
reloads them (``.keras``, ``.h5`` and SavedModel). The Keras 3 classes of
``fused_xent.losses`` and ``fused_xent.metrics`` refuse to be used by tf_keras.

This package is the only place where fused_xent imports tf_keras. ``import
fused_xent`` registers these classes as soon as tf_keras is imported, so it is
all that loading a saved model needs.
"""

import importlib

try:
    importlib.import_module("tf_keras")  # the submodules import it too; here its absence is explained
except ImportError as error:
    raise ImportError(
        'fused_xent.tf_keras needs tf_keras (Keras 2) for TensorFlow 2.21: pip install "fused-xent[tf_keras]" '
        f'(or "tf_keras>=2.21,<2.22"). Importing it failed: {error}'
    ) from error

from fused_xent import _registration
from fused_xent.tf_keras import losses, metrics

__all__ = ["losses", "metrics"]

_registration.register(finishing=__name__)  # this module may have been the first import of a framework
