"""Every difference between the Keras 3 versions the package supports (3.0 and later), in one place.

Each shim gives what the running Keras's own losses use, so the fused losses reduce, mask and
weigh exactly as ``keras.losses`` does on that same version. Only Keras is imported here.
"""

import keras
from keras.src.losses import loss as _loss

# Keras's reduction of weighted per-element losses (every Keras 3; its rank rule and its "mean"
# reductions vary with the version, and the losses of each version use their own).
reduce_weighted_values = _loss.reduce_weighted_values

# Keras 3.0.0 to 3.0.4 lack squeeze_or_expand_to_same_rank: their losses match a sample weight's
# rank to the losses' with squeeze_to_same_rank (which squeezes a size-1 last axis, never expands).
squeeze_or_expand_to_same_rank = getattr(_loss, "squeeze_or_expand_to_same_rank", None) or _loss.squeeze_to_same_rank

try:  # Keras 3.6 and later keep a tensor's mask through get_keras_mask / set_keras_mask
    from keras.src.backend import get_keras_mask, set_keras_mask
except ImportError:
    # Keras before 3.6 lacks them: its losses read and write a `_keras_mask` attribute, and leave
    # tensors that take no attributes without a mask.
    def get_keras_mask(tensor):
        return getattr(tensor, "_keras_mask", None)

    def set_keras_mask(tensor, mask):
        try:
            tensor._keras_mask = mask
        except AttributeError:
            pass


# Keras 3.5 and later: Loss takes a dtype or a dtype policy (name or object) and computes in the
# policy's compute dtype. Keras before 3.5 keeps Loss.dtype as given, a plain dtype ("mixed_bfloat16"
# fails in its ops), and its own losses before 3.4 take no dtype at all: there the fused losses
# resolve a policy to its compute dtype themselves, as Keras 3.5 does.
LOSS_TAKES_POLICIES = hasattr(_loss.Loss(), "_dtype_policy")


def _policy(dtype):
    if isinstance(dtype, keras.mixed_precision.DTypePolicy):
        return dtype
    return keras.mixed_precision.DTypePolicy(
        dtype if isinstance(dtype, str) else keras.backend.standardize_dtype(dtype)
    )


def loss_dtype(dtype):
    """What to pass Loss.__init__ as `dtype` for a loss computing in `dtype` (a dtype or policy)."""
    return dtype if LOSS_TAKES_POLICIES or dtype is None else _policy(dtype).compute_dtype


def loss_dtype_name(loss, dtype):
    """The name of the dtype policy `loss` was constructed with (`dtype`, not None), for its config."""
    return loss._dtype_policy.name if LOSS_TAKES_POLICIES else _policy(dtype).name
