"""What Keras's own classes do on the installed Keras 3, for the tests that compare with them: the
package supports Keras 3.0 and later (the oldest that TensorFlow 2.16 accepts), and Keras itself
changed since. Each constant names the first Keras version with the behaviour. Reads the version
from the distribution's metadata, so importing this module imports no framework."""

import importlib.metadata

from packaging.version import Version

try:
    KERAS = Version(importlib.metadata.version("keras"))
except importlib.metadata.PackageNotFoundError:
    KERAS = None


def since(version):
    """Whether the installed Keras is `version` or newer (False without Keras)."""
    return KERAS is not None and KERAS >= Version(version)


# Keras 3.7 added the "mean" and "mean_with_sample_weight" reductions; before, Loss refuses them.
MEAN_REDUCTIONS = since("3.7")
NO_MEAN_REDUCTIONS = "Keras before 3.7 has no 'mean' and 'mean_with_sample_weight' reductions (its Loss refuses them)"


def reductions(names):
    """`names` less the reductions the installed Keras lacks."""
    return [name for name in names if MEAN_REDUCTIONS or name not in ("mean", "mean_with_sample_weight")]


# Keras 3.4 gave its losses a `dtype` argument, 3.5 let it name a dtype policy ("mixed_bfloat16").
LOSS_DTYPE_POLICIES = since("3.5")

# Keras 3.4 squeezes sparse labels' trailing size-1 axis before applying ignore_class; Keras
# 3.0 to 3.3 broadcast the mask against the logits and raise.
SQUEEZES_LABELS_BEFORE_IGNORE_CLASS = since("3.4")

# Keras 3.8 divides a loss, and the losses layers add (add_loss), by the replica count under a
# tf.distribute strategy (and its trainer multiplies the reported loss back); before, the
# replicas' gradients add up.
LOSSES_SCALED_FOR_REPLICAS = since("3.8")
NOT_SCALED_FOR_REPLICAS = (
    "Keras before 3.8 divides neither a loss nor an added loss by the replica count under "
    "tf.distribute: with its own losses two replicas train with twice the single-device gradient"
)

# Keras 3.7 loads a functional model that calls one layer at two depths (A(B(A(x)))); before,
# load_model raises "Layer node index out of bounds" for Keras's own layers too.
LOADS_LAYERS_SHARED_AT_TWO_DEPTHS = since("3.7")
NO_LAYERS_SHARED_AT_TWO_DEPTHS = (
    "Keras before 3.7 cannot load a model that calls a layer at two depths (shared(Dense(shared(x))) "
    "with Keras's own Dense as `shared` fails alike): ValueError 'Layer node index out of bounds'"
)


def set_dtype_policy(keras, policy):
    """keras.config.set_dtype_policy, which Keras 3.0.0 to 3.0.4 offer as keras.mixed_precision's only."""
    setter = getattr(keras.config, "set_dtype_policy", None) or keras.mixed_precision.set_dtype_policy
    setter(policy)
