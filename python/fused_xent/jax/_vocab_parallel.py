"""Cross-entropy with the class axis sharded (vocabulary-parallel, the Megatron layout).

Each device holds classes [offset, offset + C_s) of every row it has. Its kernel call (the
``*_shard`` FFI targets, core Options.total_classes) returns, per row, the shard's own
logsumexp lse_s and its part of the loss against it, L_s = sum over its classes of
q_c (lse_s - z_c). The row's loss is then the sum of the parts moved to the row's
logsumexp lse (docs/distributed.md):

    lse  = log(sum_s exp(lse_s))                     (a max and a sum over the shards)
    loss = w * (sum_s (L_s + Q_s (lse - lse_s)) + lambda lse^2)

with Q_s = sum over the shard's classes of q_c, and w the row's class weight. The devices
exchange three row-sized values; the backward, given lse, is local (the kernel with the
whole row's eps / C and the target only on its shard).

Dense labels: Q_s is (1 - eps) times the shard's label sum (which its kernel returns) plus
eps C_s / C, and the backward's kernel takes the whole rows' label sums (summed over the
shards: one more row-sized all-reduce).

Sparse labels reach the kernel as local class indices, ABSENT where the class is on another
shard, IGNORED for ignore_index; invalid labels keep their value (never a local class),
so the kernel names them.
"""

import jax
import jax.numpy as jnp
from jax import lax


def _sentinels(dtype):
    lowest = int(jnp.iinfo(dtype).min)
    return lowest, lowest + 1, lowest + 2  # ignored, absent, an invalid label equal to either


class Rows:
    """What a shard knows of its rows' labels."""

    def __init__(self, labels, opts, classes, class_axes):
        _, _, _, ignore_index = opts[:4]
        self.labels = labels
        self.classes = classes
        self.ignored = labels == ignore_index if ignore_index is not None else jnp.zeros(labels.shape, bool)
        self.invalid = ~self.ignored & ((labels < 0) | (labels >= classes))
        self.class_axes = class_axes

    def local_labels(self, shard_classes):
        ignored_value, absent_value, invalid_alias = _sentinels(self.labels.dtype)
        offset = (lax.axis_index(self.class_axes) * shard_classes).astype(self.labels.dtype)
        self.here = ~self.ignored & ~self.invalid & (self.labels >= offset) & (self.labels < offset + shard_classes)
        invalid = jnp.where(self.labels <= absent_value, jnp.asarray(invalid_alias, self.labels.dtype), self.labels)
        absent = jnp.full_like(self.labels, absent_value)
        local = jnp.where(self.here, self.labels - offset, absent)
        local = jnp.where(self.invalid, invalid, local)
        return jnp.where(self.ignored, jnp.asarray(ignored_value, self.labels.dtype), local)

    def weights(self, class_weights, dtype):
        """The row weights the kernel would apply: class_weights[label], or 1."""
        if class_weights.shape[0] == 0:
            return jnp.ones(self.labels.shape, dtype)
        safe = jnp.where(self.ignored | self.invalid, 0, self.labels)
        return class_weights[safe].astype(dtype)


def shard_opts(opts, classes, labels_dtype, z_loss):
    """The attributes of the *_shard call: the row's classes and the two sentinels."""
    ignored_value, absent_value, _ = _sentinels(labels_dtype)
    return (opts[0], opts[1], z_loss, ignored_value, classes, absent_value, opts[-1])


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def forward(runner, opts, classes, class_axes, z, labels, class_weights):
    """(loss, lse) of this device's rows from its shard of their classes."""
    axis, eps, lam = opts[0], opts[1], opts[2]
    rows = Rows(labels, opts, classes, class_axes)
    shard_classes = z.shape[axis]
    local = rows.local_labels(shard_classes)
    empty = jnp.zeros([0], jnp.float32)
    # z-loss is of the row's lse: added once below, not per shard.
    part, shard_lse = runner(
        "fused_xent_sparse_forward_shard", shard_opts(opts, classes, labels.dtype, 0.0), z, local, empty
    )
    lse = _combine_lse(shard_lse, class_axes)
    acc = _acc(z.dtype)
    target_share = jnp.where(rows.here, 1.0 - eps, 0.0).astype(acc) + eps * shard_classes / classes
    shift = lax.convert_element_type(lax.sub(lse, shard_lse), acc)  # float64 lse: lax keeps it without x64
    # An all -inf row has lse = lse_s = -inf: its parts are already right.
    shift = jnp.where(jnp.isnan(shift), 0.0, shift)
    loss = lax.psum(part.astype(acc) + target_share * shift, class_axes)
    row_lse = lax.convert_element_type(lse, acc)
    loss = rows.weights(class_weights, acc) * (loss + lam * row_lse * row_lse)
    loss = jnp.where(rows.ignored, 0.0, jnp.where(rows.invalid, jnp.nan, loss))
    return loss.astype(z.dtype), lse


def _combine_lse(shard_lse, class_axes):
    """log(sum_s exp(lse_s)) over the class axes: a max and a sum of row-sized values, in
    float64 (lax, which keeps float64 without jax_enable_x64)."""
    top = lax.pmax(shard_lse, class_axes)
    finite = lax.is_finite(top)
    finite_top = lax.select(finite, top, lax.full_like(top, 0))
    total = lax.psum(lax.exp(lax.sub(shard_lse, finite_top)), class_axes)
    return lax.select(finite, lax.add(finite_top, lax.log(total)), top)


def backward(runner, opts, classes, class_axes, z, labels, class_weights, lse, g):
    """This device's shard of the gradient, given the rows' lse: no communication."""
    rows = Rows(labels, opts, classes, class_axes)
    local = rows.local_labels(z.shape[opts[0]])
    scaled = g * rows.weights(class_weights, g.dtype)
    empty = jnp.zeros([0], jnp.float32)
    return runner(
        "fused_xent_sparse_backward_shard",
        shard_opts(opts, classes, labels.dtype, opts[2]),
        z,
        local,
        empty,
        lse,
        scaled,
    )


def dense_forward(runner, opts, classes, class_axes, z, t):
    """(loss, lse) of this device's rows from its shard of their classes, dense labels."""
    axis, eps, lam, cap = opts
    shard_classes = z.shape[axis]
    part, shard_lse, label_sums = runner("fused_xent_dense_forward_shard", (axis, eps, 0.0, classes, cap), z, t)
    lse = _combine_lse(shard_lse, class_axes)
    acc = _acc(z.dtype)
    target_share = (1.0 - eps) * lax.convert_element_type(label_sums, acc) + eps * shard_classes / classes
    shift = lax.convert_element_type(lax.sub(lse, shard_lse), acc)
    shift = jnp.where(jnp.isnan(shift), 0.0, shift)  # all -inf rows, as the sparse forward
    loss = lax.psum(part.astype(acc) + target_share * shift, class_axes)
    row_lse = lax.convert_element_type(lse, acc)
    return (loss + lam * row_lse * row_lse).astype(z.dtype), lse


def dense_backward(runner, opts, classes, class_axes, z, t, lse, g):
    """This device's shard of the gradient, given the rows' lse and label sums (one all-reduce)."""
    axis, eps, lam, cap = opts
    with jax.enable_x64(True):  # the kernel reads the sums in float64, as it sums a row itself
        label_sums = lax.psum(jnp.sum(t.astype(jnp.float64), axis), class_axes)
    return runner("fused_xent_dense_backward_shard", (axis, eps, lam, classes, cap), z, t, lse, g, label_sums)
