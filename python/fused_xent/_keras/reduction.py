"""The one reduction rule of the Keras 3 losses, on every backend (TensorFlow, JAX, PyTorch).

The running Keras's own ``reduce_weighted_values`` (masks, sample weights, every reduction it
offers, and where it does so, Keras 3.8 and later, the division by the replica count under a
``tf.distribute`` strategy), with one extension where Keras raises or broadcasts wrongly: a sample
weight of lower rank than the losses (one weight per sequence over per-token losses) is read as
Keras reads the same weight with trailing size-1 axes, (N,) as (N, 1). What differs between Keras
versions is in fused_xent._keras.compat.
"""

import keras

from fused_xent._keras.compat import reduce_weighted_values, squeeze_or_expand_to_same_rank

ops = keras.ops


def and_masks(first, second):
    if first is None or second is None:
        return second if first is None else first
    return ops.logical_and(ops.cast(first, "bool"), ops.cast(second, "bool"))


def weight_like(values, weight, dtype, full=False):
    """`weight` (sample weights) shaped to multiply `values`: Keras's size-1 squeeze or expand,
    then trailing size-1 axes for the axes a lower-rank weight lacks; with `full`, broadcast to
    `values`' shape (what Keras makes of it anyway once a mask multiplies it)."""
    weight = ops.cast(ops.convert_to_tensor(weight), dtype)
    values, weight = squeeze_or_expand_to_same_rank(values, weight)
    missing = len(values.shape) - len(weight.shape)
    if len(weight.shape) > 0 and missing > 0:
        for _ in range(missing):
            weight = ops.expand_dims(weight, -1)
        if full:
            # A new full tensor: Keras multiplies the mask into it in place (on PyTorch a
            # broadcast view, or a (N, 1) tensor, cannot take that).
            weight = weight * ops.ones_like(values)
    return values, weight


def combined_weight(sample_weight, weight, dtype):
    """sample_weight times a per-element weight (shaped like the losses)."""
    weight = ops.cast(weight, dtype)
    if sample_weight is None:
        return weight
    weight, sample_weight = weight_like(weight, sample_weight, dtype, full=True)
    return weight * sample_weight


def reduce(losses, sample_weight, mask, reduction, dtype):
    """Keras's reduction of per-element losses."""
    losses = ops.cast(losses, dtype)
    if sample_weight is not None:
        losses, sample_weight = weight_like(losses, sample_weight, dtype, full=mask is not None)
    return reduce_weighted_values(losses, sample_weight=sample_weight, mask=mask, reduction=reduction, dtype=dtype)
