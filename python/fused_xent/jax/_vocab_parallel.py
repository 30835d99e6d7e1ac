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

Class counts the shards do not divide (Shard): XLA gives each of the n shards s = ceil(C / n)
columns, shard k classes [k s, k s + s), so the last shards hold fewer valid columns (maybe
none) and then padding of unspecified content. Each device's kernel call sees only its valid
columns: a ``lax.switch`` over the few distinct valid counts (s, the remainder, 0) picks a
branch that cuts the operands to that static prefix (no copy where the shard is full) and pads
the gradient back with zeros; a shard without classes gives the neutral statistics (lse -inf,
loss part 0, label sums 0). The collectives stay outside the switch.
"""

import functools

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
        """The labels as the kernel of a shard of `shard_classes` columns (padding included) takes them."""
        ignored_value, absent_value, invalid_alias = _sentinels(self.labels.dtype)
        offset = (lax.axis_index(self.class_axes) * shard_classes).astype(self.labels.dtype)
        # Labels at or past `classes` are invalid: never in the padding of the last shards.
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


class Shard:
    """Which columns of its class shard this device's kernel may read: under XLA's partitioner
    each of the n shards holds s = ceil(C / n) columns, shard k classes [k s, k s + s) of C;
    the valid ones are a prefix of valid = clip(C - k s, 0, s) columns, the rest padding."""

    def __init__(self, classes, padded, class_axes):
        shards = _shard_count(class_axes)
        counts = [min(padded, max(0, classes - k * padded)) for k in range(shards)]
        self.classes, self.padded = classes, padded
        self.sizes = tuple(sorted(set(counts), reverse=True))  # static: s, maybe a remainder, maybe 0
        index = lax.axis_index(class_axes)
        if self.even:
            self.valid = padded
        else:
            self.valid = jnp.asarray(counts, jnp.int32)[index]
            self.branch = jnp.asarray([self.sizes.index(c) for c in counts], jnp.int32)[index]

    @property
    def even(self):
        return self.sizes == (self.padded,)

    def share(self, acc):
        """This shard's valid classes over all C (ε C_s / C is its share of label smoothing)."""
        return lax.convert_element_type(self.valid, acc) / self.classes

    def valid_mask(self, shape, axis):
        """True on the valid columns of an array shaped like this device's logits."""
        return lax.broadcasted_iota(jnp.int32, shape, axis % len(shape)) < self.valid

    def run(self, axis, call, empty, cut, kept=(), pad_result=False, call_on_copies=None):
        """call(*cut, *kept) with the operands `cut` (shaped like the logits) cut to this shard's
        valid columns; empty(*cut, *kept) on a shard without any. pad_result: the result is
        shaped like the cut operands, padded back to the shard's columns with zeros.
        call_on_copies: call for the cut copies of a partly valid shard (which it may overwrite)."""
        call_on_copies = call_on_copies or call
        if self.even:
            return call(*cut, *kept)

        def branch(v):
            def run_branch(cut, kept):
                if v == 0:
                    return empty(*cut, *kept)
                if v == self.padded:
                    return call(*cut, *kept)
                out = call_on_copies(*(lax.slice_in_dim(x, 0, v, axis=axis) for x in cut), *kept)
                if not pad_result:
                    return out
                padding = [(0, 0, 0)] * out.ndim
                padding[axis % out.ndim] = (0, self.padded - v, 0)
                return lax.pad(out, jnp.zeros((), out.dtype), padding)

            return run_branch

        return lax.switch(self.branch, [branch(v) for v in self.sizes], tuple(cut), tuple(kept))


def _shard_count(class_axes):
    count = 1
    for a in class_axes if isinstance(class_axes, tuple) else (class_axes,):
        count *= lax.axis_size(a)
    return count


def _one_class(z, axis):
    """A column of zeros for rows shaped like z's: what a shard without classes shows its kernel."""
    shape = list(z.shape)
    shape[axis % z.ndim] = 1
    return jnp.zeros(shape, z.dtype)


def _neutral(x, value):
    """`value` where x is a number (x itself where NaN): a kernel's result that XLA keeps, so the
    kernel runs, with the value of a shard without classes. lax keeps float64 without x64."""
    return lax.select(lax.ne(x, x), x, lax.full_like(x, value))


def _moved_part(part, shard_lse, target_share, shift, acc):
    """L_s + Q_s (lse - lse_s) of each row. A shard with no target share adds nothing where it
    has no mass either (its logits of the row all -inf, a masked block, or no classes at all):
    there shift is +inf and the kernel's L_s NaN, as -inf - (-inf)."""
    nothing = target_share == 0
    no_mass = lax.eq(shard_lse, lax.full_like(shard_lse, -jnp.inf))
    part = jnp.where(nothing & no_mass, 0.0, part.astype(acc))
    return part + jnp.where(nothing, 0.0, target_share * shift)


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
    shard = Shard(classes, z.shape[axis], class_axes)
    local = rows.local_labels(shard.padded)
    empty = jnp.zeros([0], jnp.float32)
    # z-loss is of the row's lse: added once below, not per shard.
    shard_opts_ = shard_opts(opts, classes, labels.dtype, 0.0)

    def kernel(z, local):
        return tuple(runner("fused_xent_sparse_forward_shard", shard_opts_, z, local, empty))

    def no_classes(z, local):
        # The kernel still checks the labels (so an invalid one raises on this device too), on a
        # column of zeros where no label is; its results become the neutral lse -inf and part 0.
        part, lse = kernel(_one_class(z, axis), local)
        return _neutral(part, 0.0), _neutral(lse, -jnp.inf)

    part, shard_lse = shard.run(axis, kernel, no_classes, (z,), (local,))
    lse = _combine_lse(shard_lse, class_axes)
    acc = _acc(z.dtype)
    target_share = jnp.where(rows.here, 1.0 - eps, 0.0).astype(acc) + eps * shard.share(acc)
    shift = lax.convert_element_type(lax.sub(lse, shard_lse), acc)  # float64 lse: lax keeps it without x64
    # An all -inf row has lse = lse_s = -inf: its parts are already right.
    shift = jnp.where(jnp.isnan(shift), 0.0, shift)
    loss = lax.psum(_moved_part(part, shard_lse, target_share, shift, acc), class_axes)
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
    axis = opts[0]
    rows = Rows(labels, opts, classes, class_axes)
    shard = Shard(classes, z.shape[axis], class_axes)
    local = rows.local_labels(shard.padded)
    scaled = g * rows.weights(class_weights, g.dtype)
    empty = jnp.zeros([0], jnp.float32)
    shard_opts_ = shard_opts(opts, classes, labels.dtype, opts[2])

    def kernel(z, local, lse, scaled, **over):
        return runner("fused_xent_sparse_backward_shard", shard_opts_, z, local, empty, lse, scaled, **over)

    def no_classes(z, *_):
        return jnp.zeros_like(z)

    # a partly valid shard's gradient is written over its copy of the valid logits
    over_copy = functools.partial(kernel, aliases={0: 0})
    return shard.run(axis, kernel, no_classes, (z,), (local, lse, scaled), True, over_copy)


def dense_forward(runner, opts, classes, class_axes, z, t):
    """(loss, lse) of this device's rows from its shard of their classes, dense labels."""
    axis, eps, lam, cap = opts
    shard = Shard(classes, z.shape[axis], class_axes)

    def kernel(z, t):
        return tuple(runner("fused_xent_dense_forward_shard", (axis, eps, 0.0, classes, cap), z, t))

    def no_classes(z, t):
        rows = tuple(d for i, d in enumerate(z.shape) if i != axis % z.ndim)
        with jax.enable_x64(True):  # the statistics are float64, as the kernel's
            return jnp.zeros(rows, z.dtype), jnp.full(rows, -jnp.inf, jnp.float64), jnp.zeros(rows, jnp.float64)

    part, shard_lse, label_sums = shard.run(axis, kernel, no_classes, (z, t))
    lse = _combine_lse(shard_lse, class_axes)
    acc = _acc(z.dtype)
    target_share = (1.0 - eps) * lax.convert_element_type(label_sums, acc) + eps * shard.share(acc)
    shift = lax.convert_element_type(lax.sub(lse, shard_lse), acc)
    shift = jnp.where(jnp.isnan(shift), 0.0, shift)  # all -inf rows, as the sparse forward
    loss = lax.psum(_moved_part(part, shard_lse, target_share, shift, acc), class_axes)
    row_lse = lax.convert_element_type(lse, acc)
    return (loss + lam * row_lse * row_lse).astype(z.dtype), lse


def dense_backward(runner, opts, classes, class_axes, z, t, lse, g):
    """This device's shard of the gradient, given the rows' lse and label sums (one all-reduce)."""
    axis, eps, lam, cap = opts
    shard = Shard(classes, z.shape[axis], class_axes)

    def sums(t):
        with jax.enable_x64(True):  # the kernel reads the sums in float64, as it sums a row itself
            return jnp.sum(t.astype(jnp.float64), axis)

    def no_sums(t):
        with jax.enable_x64(True):
            return jnp.zeros(sums(t).shape, jnp.float64)

    # the padding's labels are not labels: the sums of the valid prefix (a slice the sum reads)
    label_sums = lax.psum(shard.run(axis, sums, no_sums, (t,)), class_axes)

    def kernel(z, t, lse, g, label_sums, **over):
        return runner(
            "fused_xent_dense_backward_shard", (axis, eps, lam, classes, cap), z, t, lse, g, label_sums, **over
        )

    def no_classes(z, *_):
        return jnp.zeros_like(z)

    over_copy = functools.partial(kernel, aliases={0: 0})  # as the sparse backward
    return shard.run(axis, kernel, no_classes, (z, t), (lse, g, label_sums), True, over_copy)
