"""optax's softmax cross-entropy losses, computed by the fused kernels.

``softmax_cross_entropy``, ``softmax_cross_entropy_with_integer_labels`` and
``safe_softmax_cross_entropy`` take optax's arguments (logits first, ``axis`` an int or a tuple
of class axes, ``where`` a mask) and give optax's values and gradients, with these exceptions:

- a ``-inf`` logit whose label is 0 adds nothing to ``softmax_cross_entropy`` (0 log 0 = 0, as
  in ``safe_softmax_cross_entropy``); optax's ``softmax_cross_entropy`` gives NaN there;
- with ``where`` on ``softmax_cross_entropy``, the labels' gradient is 0 at masked-out
  elements; optax's is NaN there (0 times the -inf it puts in log_softmax).

The kernels see the class axes as one axis: several contiguous, increasing axes are merged by a
reshape (no copy); others are moved to the end first (a transpose, which copies).
"""

import jax
import jax.numpy as jnp

import fused_xent.jax as fused  # the package's fused functions, read at call time (it imports this module)
from fused_xent import _checks

_MASKED = -1  # the label of a row `where` masks out: ignore_index, never a class (labels are made >= 0)


# ---------------------------------------------------------------- arguments


def _float_logits(logits):
    logits = jnp.asarray(logits)
    _checks.logits_dtype(logits.dtype.name)
    return logits


def _integer_labels(labels):
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got {labels.dtype.name}")
    return labels


def _class_axes(axis, rank, allow_none):
    """The class axes as non-negative ints, in the order given (it orders a tuple's flat index)."""
    if axis is None and allow_none:
        return tuple(range(rank))
    if isinstance(axis, tuple):
        axes = tuple(_checks.axis(a, rank) % rank for a in axis)
    elif _checks.plain_integer(axis) is not None:
        axes = (_checks.axis(axis, rank) % rank,)
    else:
        allowed = "an int, a tuple of ints or None" if allow_none else "an int or a tuple of ints"
        raise ValueError(f"axis must be {allowed}, got {axis!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return axes


def _expanded_where(where, rank, axes):
    """optax's rule: a mask without the class axes gets them (size 1), so it masks whole rows."""
    if where is None:
        return None
    where = jnp.asarray(where, bool)
    return where if where.ndim == rank else jnp.expand_dims(where, axes)


# ---------------------------------------------------------------- one class axis


def _merged(x, axes):
    """(x with `axes` made one axis, that axis). Contiguous increasing axes are reshaped where they
    are; any others are moved to the end, in the order given, then reshaped."""
    first, count = axes[0], len(axes)
    if axes == tuple(range(first, first + count)):
        return x.reshape(x.shape[:first] + (-1,) + x.shape[first + count :]), first
    rest = tuple(i for i in range(x.ndim) if i not in axes)
    moved = x.transpose(rest + axes)
    return moved.reshape(moved.shape[: len(rest)] + (-1,)), len(rest)


def _shifted_for_leading_label_axes(axis, axes, added):
    """The class axes of the broadcast shape when labels add `added` leading axes to the logits'.
    optax takes the softmax on the logits' axes and sums on the product's: the same axes only when
    they count from the end, so only those are accepted."""
    if not added:
        return axes
    given = axis if isinstance(axis, tuple) else (axis,)
    if any(a is None or a >= 0 for a in given):
        raise ValueError(
            f"labels of {added} more axes than the logits need the class axes counted from the end, got axis={axis!r}"
        )
    return tuple(a + added for a in axes)


def _squeezed_rows(where, axis):
    """The mask of rows (class axis dropped) when `where` masks whole rows, else None."""
    return where.squeeze(axis) if where.shape[axis] == 1 else None


def _take(x, index, axis):
    """x[..., index, ...] along `axis` (index shaped like x without it); optax's gather: an index in
    [-C, 0) counts from the end, one outside [-C, C) gives NaN."""
    return jnp.take_along_axis(x, jnp.expand_dims(index, axis), axis=axis).squeeze(axis)


def _wide(labels, classes):
    """labels as int32 (int64 with x64) in the same order around [-C, C): unsigned values too large
    for that are clamped to C, which is out of range as they were."""
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger) and jnp.iinfo(labels.dtype).max > classes:
        labels = jnp.minimum(labels, jnp.asarray(classes, labels.dtype))
    return labels.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)


def _in_range(labels, classes):
    """(the label as an int32 index in [0, C), 0 where it is outside [-C, C); whether it is inside)."""
    labels = _wide(labels, classes)
    inside = (labels >= -classes) & (labels < classes)
    index = jnp.where(labels < 0, labels + classes, labels)
    return jnp.where(inside, index, 0).astype(jnp.int32), inside


# ---------------------------------------------------------------- the losses


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1, where=None):
    """optax.softmax_cross_entropy_with_integer_labels, fused: ``logsumexp(z) - z[label]`` per row.

    ``axis`` is the class axis, or a tuple of them (a label is then the flat index into those axes,
    in the order given). ``where`` (shaped like the logits, or like the loss to mask whole rows)
    keeps the classes it marks in the logsumexp; a row with none gives 0, with a zero gradient. As
    in optax, the label's own logit counts even where ``where`` masks it out, a label in [-C, 0)
    counts from the end and one outside [-C, C) gives NaN. Returns the logits' dtype.
    """
    logits, labels = _float_logits(logits), _integer_labels(labels)
    axes = _class_axes(axis, logits.ndim, allow_none=False)
    where = _expanded_where(where, logits.ndim, axes)
    z, axis = _merged(logits, axes)
    batch = z.shape[:axis] + z.shape[axis + 1 :]
    if labels.shape != batch:  # optax's gather broadcasts labels and logits' rows both ways
        batch = jnp.broadcast_shapes(batch, labels.shape)
        z = jnp.broadcast_to(z, batch[:axis] + (z.shape[axis],) + batch[axis:])
        labels = jnp.broadcast_to(labels, batch)
    if where is None:
        return _integer_rows(z, labels, axis)
    where, _ = _merged(where, axes)
    rows = _squeezed_rows(where, axis)
    if rows is not None:
        return _integer_rows(z, labels, axis, jnp.broadcast_to(rows, batch))
    return _integer_elements(z, labels, axis, jnp.broadcast_to(where, z.shape))


def _integer_rows(z, labels, axis, rows=None):
    """The loss with whole rows masked (or none): masked rows are the kernel's ignored rows, which
    give 0 and a zero gradient whatever their logits."""
    index, inside = _in_range(labels, z.shape[axis])
    if rows is not None:
        index = jnp.where(rows, index, _MASKED)
    loss = fused.sparse_softmax_cross_entropy_with_logits(index, z, axis=axis, ignore_index=_MASKED)
    # A label outside [-C, C) is NaN, with the gradient softmax(z) (optax's gather drops it).
    loss = loss + _off_label_correction(z, z, labels, index, inside, axis)
    return loss if rows is None else jnp.where(rows, loss, 0.0)


def _integer_elements(z, labels, axis, where):
    """The loss with classes masked: masked logits become -inf for the kernel (a row masked out
    entirely becomes zeros, and 0 after). The kernel's row must use a kept class, so where the
    label is masked out it uses the row's largest kept logit and adds back the difference."""
    kept_rows = jnp.any(where, axis, keepdims=True)
    masked = jnp.where(where, z, jnp.where(kept_rows, -jnp.inf, 0.0).astype(z.dtype))
    index, inside = _in_range(labels, z.shape[axis])
    usable = inside & _take(where, index, axis)
    index = jnp.where(usable, index, jnp.argmax(masked, axis).astype(jnp.int32))
    loss = fused.sparse_softmax_cross_entropy_with_logits(index, masked, axis=axis)
    loss = loss + _off_label_correction(masked, z, labels, index, usable, axis)
    return jnp.where(kept_rows.squeeze(axis), loss, 0.0)


def _off_label_correction(masked, z, labels, index, usable, axis):
    """z'[index] - z[label] where the kernel used another class than the label, else 0: the loss
    becomes lse - z[label] (NaN for a label outside [-C, C)) and its gradient p - onehot(label)."""
    moved = _take(masked, index, axis) - _take(z, labels, axis)
    return jnp.where(usable, jnp.zeros((), z.dtype), moved)


def softmax_cross_entropy(logits, labels, axis=-1, where=None):
    """optax.softmax_cross_entropy, fused: ``-sum(labels * log_softmax(logits))`` over the class axes.

    ``axis`` is an int, a tuple of class axes or None (all axes). ``labels`` and ``logits``
    broadcast together. ``where`` (shaped like the logits, or like the loss to mask whole rows)
    keeps the elements it marks, in the softmax and in the sum; a row with none gives 0. Returns
    the dtype labels * logits would have. Unlike optax, a ``-inf`` logit with label 0 adds 0, not
    NaN (see the module's notes).
    """
    logits = _float_logits(logits)
    labels = jnp.asarray(labels)
    dtype = jnp.result_type(logits, labels)
    axes = _class_axes(axis, logits.ndim, allow_none=True)
    where = _expanded_where(where, logits.ndim, axes)
    shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    added = len(shape) - logits.ndim
    axes = _shifted_for_leading_label_axes(axis, axes, added)
    z, class_axis = _merged(jnp.broadcast_to(logits, shape), axes)
    t, _ = _merged(jnp.broadcast_to(labels, shape), axes)
    if where is not None:
        where, _ = _merged(where.reshape((1,) * added + where.shape), axes)
        kept_rows = jnp.any(where, class_axis, keepdims=True)
        z = jnp.where(where, z, jnp.where(kept_rows, -jnp.inf, 0.0).astype(z.dtype))
        t = jnp.where(where, t, jnp.zeros((), t.dtype))
    return fused.softmax_cross_entropy_with_logits(t, z, axis=class_axis).astype(dtype)


def safe_softmax_cross_entropy(logits, labels):
    """optax.safe_softmax_cross_entropy, fused: the class axis is the last; a ``-inf`` logit whose
    label is 0 adds 0 (0 log 0 = 0), and a row whose labels are all 0 gives 0 whatever its logits."""
    logits = _float_logits(logits)
    labels = jnp.asarray(labels)
    loss = softmax_cross_entropy(logits, labels)
    # Rows of zero labels are 0 already unless their logsumexp is not finite (all -inf, a NaN, a
    # +inf): the kernel gives NaN there. Their labels are read only when some loss is NaN.
    shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    return jax.lax.cond(
        jnp.any(jnp.isnan(loss)),
        lambda loss, labels: jnp.where(
            jnp.all(jnp.broadcast_to(labels, shape) == 0, -1), jnp.zeros((), loss.dtype), loss
        ),
        lambda loss, labels: loss,
        loss,
        labels,
    )
