"""The fused linear head in JAX: the loss of ``hidden @ weight (+ bias)`` without its logits.

The rows go through in chunks (a ``lax.fori_loop``): per chunk a matmul gives that chunk's
logits, the fused kernels give its loss, logsumexp and gradient, and matmuls fold the gradient
into dH, dW and db, so at most one chunk of logits (and of their gradient) lives at a time.

Under differentiation the forward also computes the gradients for an upstream gradient of 1
on every row (3 matmuls per chunk, as an unfused Dense layer needs). The backward scales
them: dH row by row (exact for any upstream gradient), dW and db by the upstream gradient
that the counted rows share (a mean or sum loss). Where the rows do not share one, it
recomputes each chunk's logits for dW and db.

Sharding (docs/distributed.md#the-linear-head): each pass over the chunks is one
``custom_partitioning`` op. With hidden's rows over some mesh axes and the weight's classes
over others (the Megatron layout), every device loops over its own rows and classes: the loss
is vocabulary-parallel (row-sized all-reduces, jax/_vocab_parallel.py), and after the loop dH
is summed over the class axes and dW, db over the row axes, once.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fused_xent.jax import _composite, _ffi, _sharding, _vocab_parallel

# Default chunk (as the TensorFlow head, docs/linear_head.md): at most 1/16 of a device's rows
# and at most this many bytes of logits, a power of two; but at least 128 rows: with fewer, the
# matmuls and the per-chunk pass over dW cost more than the memory saved (a device with
# 256 rows of 32000 classes and H = 256 ran 7x slower with 16-row chunks than unchunked).
_CHUNK_BYTES = 128 << 20
_CHUNK_FRACTION = 16
_MIN_CHUNK = 128
# A slab of the weight gradient (_add_weight_gradient): at most this fraction of a chunk's
# logits, at least _MIN_SLAB classes (thinner matmuls run slower).
_SLAB_FRACTION = 0.75
_MIN_SLAB = 16

LOSS, FORWARD, WEIGHTS = "loss", "forward", "weights"


class Config(NamedTuple):
    """The static part of a call (hashable: a custom_partitioning static argument)."""

    opts: tuple  # the sparse kernels' (axis=-1, label_smoothing, z_loss, ignore_index or None, softcap)
    transpose_weight: bool
    chunk_size: int | None
    has_bias: bool


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def chunk_rows(chunk_size, rows, classes, itemsize):
    """Rows per chunk on one device: chunk_size, or the default for its rows and classes."""
    if chunk_size is None:
        chunk = min(_CHUNK_BYTES // max(1, classes * itemsize), rows // _CHUNK_FRACTION)
        chunk = max(_MIN_CHUNK, 1 << max(0, int(chunk).bit_length() - 1))
    else:
        chunk = chunk_size
    return max(1, min(chunk, rows))


# ---------------------------------------------------------------- the kernels of one chunk


class _Kernels:
    """Loss, lse and gradient of a chunk of logits, on this device's classes."""

    def __init__(self, cfg, classes, class_axes, class_weights, fused=True):
        self.opts, self.classes, self.class_axes = cfg.opts, classes, class_axes
        self.class_weights, self.fused = class_weights, fused

    def forward(self, z, labels):
        """(loss, lse as kept for the backward)."""
        if not self.fused:
            lse = jax.nn.logsumexp(_composite.capped(z, self.opts[-1]).astype(_acc(z.dtype)), axis=-1)
            return _composite.sparse(self.opts, z, labels, self.class_weights), lse
        if self.class_axes:
            loss, lse = _vocab_parallel.forward(
                _ffi._run_forward, self.opts, self.classes, self.class_axes, z, labels, self.class_weights
            )
        else:
            loss, lse = _ffi._run_forward("fused_xent_sparse_forward", self.opts, z, labels, self.class_weights)
        return loss, _ffi._kept_lse(lse)

    def backward(self, z, labels, lse, g):
        if not self.fused:
            dz = _ffi._sparse_gradient_composite(self.opts, z, labels, self.class_weights, g)
            return dz.astype(z.dtype)
        if self.class_axes:
            return _vocab_parallel.backward(
                _ffi._run_backward, self.opts, self.classes, self.class_axes, z, labels, self.class_weights, lse, g
            )
        return _ffi._run_backward("fused_xent_sparse_backward", self.opts, z, labels, self.class_weights, lse, g)

    def kept_lse(self, rows):
        """The buffer for the rows' kept lse: float64 as uint32 halves (fused), else float32."""
        return jnp.zeros((rows, 2), jnp.uint32) if self.fused else jnp.zeros((rows,), jnp.float32)


# ---------------------------------------------------------------- the matmuls


def _dot(a, b, contract, dtype):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=dtype)


def _logits(cfg, h, w, b):
    z = _dot(h, w, ((1,), (1,)) if cfg.transpose_weight else ((1,), (0,)), h.dtype)
    return z if b is None else z + b.astype(z.dtype)


def _hidden_gradient(cfg, dz, w):
    return _dot(dz, w, ((1,), (0,)) if cfg.transpose_weight else ((1,), (1,)), dz.dtype)


def _weight_gradient(cfg, h, dz, dtype):
    """h^T dz (H x V), or dz^T h (V x H) for a transposed weight; accumulated in dtype."""
    return _dot(dz, h, ((0,), (0,)), dtype) if cfg.transpose_weight else _dot(h, dz, ((0,), (0,)), dtype)


def _add_weight_gradient(cfg, dw, h, dz):
    """dw += the chunk's weight gradient, a slab of classes at a time: each product is at most
    _SLAB_FRACTION of the chunk's logits, never W-sized (XLA adds a product to dw after it)."""
    class_dim = 0 if cfg.transpose_weight else 1
    classes, hidden_size = dw.shape[class_dim], dw.shape[1 - class_dim]
    step = max(_MIN_SLAB, int(h.shape[0] * classes * _SLAB_FRACTION) // hidden_size)
    for start in range(0, classes, step):
        size = min(step, classes - start)
        part = _weight_gradient(cfg, h, lax.slice_in_dim(dz, start, start + size, axis=1), dw.dtype)
        old = lax.slice_in_dim(dw, start, start + size, axis=class_dim)
        dw = lax.dynamic_update_slice_in_dim(dw, old + part, start, class_dim)
    return dw


# ---------------------------------------------------------------- the loop over chunks


class _Operands(NamedTuple):
    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    labels: jax.Array
    class_weights: jax.Array
    lse: jax.Array | None = None
    upstream: jax.Array | None = None


def split_operands(cfg, mode, operands):
    operands = list(operands)
    bias = operands.pop(2) if cfg.has_bias else None
    return _Operands(operands[0], operands[1], bias, *operands[2:])


def _initial_state(cfg, mode, ops, kernels):
    h, w = ops.hidden, ops.weight
    rows, classes = h.shape[0], w.shape[0 if cfg.transpose_weight else 1]
    acc = _acc(h.dtype)
    weight_state = (jnp.zeros(w.shape, acc), jnp.zeros((classes,), acc) if cfg.has_bias else None)
    if mode == WEIGHTS:
        return weight_state
    loss = jnp.zeros((rows,), h.dtype)
    if mode == LOSS:
        return (loss,)
    return (loss, kernels.kept_lse(rows), jnp.zeros(h.shape, h.dtype), *weight_state)


def _chunk_step(cfg, mode, ops, kernels, start, size, state):
    def rows(x):
        return None if x is None else lax.dynamic_slice_in_dim(x, start, size, 0)

    def put(buffer, values):
        return lax.dynamic_update_slice_in_dim(buffer, values.astype(buffer.dtype), start, 0)

    h, labels = rows(ops.hidden), rows(ops.labels)
    z = _logits(cfg, h, ops.weight, ops.bias)
    if mode == WEIGHTS:
        dz = kernels.backward(z, labels, rows(ops.lse), rows(ops.upstream).astype(z.dtype))
        dw, db = state
    else:
        loss, lse = kernels.forward(z, labels)
        if mode == LOSS:
            return (put(state[0], loss),)
        dz = kernels.backward(z, labels, lse, jnp.ones_like(loss))
        loss_all, lse_all, dh, dw, db = state
        state_head = (put(loss_all, loss), put(lse_all, lse), put(dh, _hidden_gradient(cfg, dz, ops.weight)))
    dw = _add_weight_gradient(cfg, dw, h, dz)
    db = None if db is None else db + jnp.sum(dz.astype(db.dtype), 0)
    return (dw, db) if mode == WEIGHTS else (*state_head, dw, db)


def run_chunks(cfg, mode, ops, kernels, row_axes=(), class_axes=()):
    """The pass over the rows: LOSS -> loss; FORWARD -> (loss, lse, dh, dw, db) for a unit upstream
    gradient; WEIGHTS -> (dw, db) for ops.upstream. dw and db in the accumulation type; db None
    without a bias."""
    rows = ops.hidden.shape[0]
    classes = ops.weight.shape[0 if cfg.transpose_weight else 1]
    chunk = chunk_rows(cfg.chunk_size, rows, classes, ops.hidden.dtype.itemsize)
    state = _initial_state(cfg, mode, ops, kernels)
    full = rows // chunk
    if full:
        state = lax.fori_loop(0, full, lambda i, s: _chunk_step(cfg, mode, ops, kernels, i * chunk, chunk, s), state)
    if rows > full * chunk:
        state = _chunk_step(cfg, mode, ops, kernels, full * chunk, rows - full * chunk, state)
    return _reduce_over_shards(mode, state, row_axes, class_axes)


def _reduce_over_shards(mode, state, row_axes, class_axes):
    """dH sums over the class shards, dW and db over the row shards: once, after the loop."""

    def over(x, axes):
        return lax.psum(x, axes) if axes and x is not None else x

    if mode == LOSS:
        return state
    *head, dw, db = state
    if mode == FORWARD:
        head[2] = over(head[2], class_axes)
    return (*head, over(dw, row_axes), over(db, row_axes))


# ---------------------------------------------------------------- partitioning


def _results(cfg, mode, values):
    """The op's results: a single array, or a tuple (None, the absent bias gradient, dropped)."""
    values = tuple(v for v in values if v is not None)
    return values[0] if len(values) == 1 else values


@functools.partial(custom_partitioning, static_argnums=(0, 1))
def _partitioned(cfg, mode, *operands):
    ops = split_operands(cfg, mode, operands)
    classes = ops.weight.shape[0 if cfg.transpose_weight else 1]
    kernels = _Kernels(cfg, classes, (), ops.class_weights)
    return _results(cfg, mode, run_chunks(cfg, mode, ops, kernels))


_FACTORS = {"hidden": "n h", "bias": "v", "labels": "n", "class_weights": "w", "lse": "n p", "upstream": "n"}


def _roles(cfg, mode):
    weight = "v h" if cfg.transpose_weight else "h v"
    operands = [_FACTORS["hidden"], weight] + ([_FACTORS["bias"]] if cfg.has_bias else [])
    operands += [_FACTORS["labels"], _FACTORS["class_weights"]]
    if mode == WEIGHTS:
        operands += [_FACTORS["lse"], _FACTORS["upstream"]]
    bias_result = ["v"] if cfg.has_bias else []
    results = {LOSS: ["n"], FORWARD: ["n", "n p", "n h", weight, *bias_result], WEIGHTS: [weight, *bias_result]}
    return operands, results[mode]


def _sharding_rule(cfg, mode, mesh, operand_types, result_types):
    operands, results = _roles(cfg, mode)
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    return rule, {"need_replication_factors": tuple(f for f in ("h", "w", "p") if f in rule.split())}


def _axes(entry):
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _layout(cfg, mesh, arg_shapes):
    """(row axes, class axes) from hidden's and the weight's shardings. Classes stay whole (gathered)
    where their shards would use an axis the rows use. Class shards that do not divide the class
    count are padded by XLA: the kernels read only each shard's valid columns (_valid_classes)."""
    row_axes = _axes(_spec(arg_shapes[0], 2)[0])
    weight_spec = _spec(arg_shapes[1], 2)
    class_dim = 0 if cfg.transpose_weight else 1
    class_axes = tuple(a for a in _axes(weight_spec[class_dim]) if a not in row_axes)
    return row_axes, class_axes


def _valid_classes(cfg, ops, classes, class_axes):
    """ops with the padding of the weight's (and bias's) last class shards zeroed: XLA leaves it
    unspecified, and dH = dZ W^T reads it (dZ is 0 there). Nothing to do where shards are even."""
    class_dim = 0 if cfg.transpose_weight else 1
    shard = _vocab_parallel.Shard(classes, ops.weight.shape[class_dim], class_axes)
    if shard.even:
        return ops
    weight = jnp.where(shard.valid_mask(ops.weight.shape, class_dim), ops.weight, 0)
    bias = None if ops.bias is None else jnp.where(shard.valid_mask(ops.bias.shape, 0), ops.bias, 0)
    return ops._replace(weight=weight, bias=bias)


def _spec(shape, rank):
    sharding = getattr(shape, "sharding", None)
    spec = tuple(sharding.spec) if sharding is not None else ()
    return spec + (None,) * (rank - len(spec))


def _partition(cfg, mode, mesh, arg_shapes, result_shape):
    row_axes, class_axes = _layout(cfg, mesh, arg_shapes)
    rows, classes = row_axes or None, class_axes or None
    weight = P(classes, None) if cfg.transpose_weight else P(None, classes)
    specs = {"n h": P(rows, None), "v": P(classes), "n": P(rows), "w": P(), "n p": P(rows, None)}
    specs["v h" if cfg.transpose_weight else "h v"] = weight
    operand_roles, result_roles = _roles(cfg, mode)
    arg_shardings = tuple(NamedSharding(mesh, specs[r]) for r in operand_roles)
    result_shardings = tuple(NamedSharding(mesh, specs[r]) for r in result_roles)
    all_classes = arg_shapes[1].shape[0 if cfg.transpose_weight else 1]

    def lower(*operands):
        ops = split_operands(cfg, mode, operands)
        if mode != WEIGHTS and mesh.size > 1:
            ops = ops._replace(labels=_sharding._share_invalid_label(ops.labels, all_classes, cfg.opts, mesh))
        if class_axes:
            ops = _valid_classes(cfg, ops, all_classes, class_axes)
        kernels = _Kernels(cfg, all_classes, class_axes, ops.class_weights)
        return _results(cfg, mode, run_chunks(cfg, mode, ops, kernels, row_axes, class_axes))

    return mesh, lower, result_shardings[0] if len(result_shardings) == 1 else result_shardings, arg_shardings


def _infer_result_shardings(cfg, mode, mesh, arg_shapes, result_shape):
    return _partition(cfg, mode, mesh, arg_shapes, result_shape)[2]


_partitioned.def_partition(
    partition=_partition, infer_sharding_from_operands=_infer_result_shardings, sharding_rule=_sharding_rule
)


@functools.lru_cache(maxsize=None)
def _batched(cfg, mode):
    """The op under jax.vmap (custom_partitioning has no batching rule): one pass per batch
    element (lax.map), as each element has its own weight gradient."""

    @jax.custom_batching.custom_vmap
    def call(*operands):
        return _partitioned(cfg, mode, *operands)

    @call.def_vmap
    def _rule(axis_size, in_batched, *operands):
        stacked = [x if b else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, b in zip(operands, in_batched)]
        out = lax.map(lambda ops: call(*ops), stacked)
        return out, jax.tree.map(lambda _: True, out)

    return call


def _pass(cfg, mode, hidden, weight, bias, labels, class_weights, *extra):
    operands = (hidden, weight, *([bias] if cfg.has_bias else []), labels, class_weights, *extra)
    out = _batched(cfg, mode)(*operands)
    return out if isinstance(out, tuple) else (out,)


# ---------------------------------------------------------------- the gradient


def _counted_rows(cfg, labels):
    ignore_index = cfg.opts[3]
    if ignore_index is None:
        return jnp.ones(labels.shape, bool)
    return labels != ignore_index


def _shared_gradient(g, counted):
    """(g_ref, uniform): the upstream gradient the counted rows share, if they share one."""
    high = jnp.max(jnp.where(counted, g, -jnp.inf), initial=-jnp.inf)
    low = jnp.min(jnp.where(counted, g, jnp.inf), initial=jnp.inf)
    any_counted = jnp.any(counted)
    return jnp.where(any_counted, high, 0.0), (high == low) | ~any_counted


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused(cfg, hidden, weight, bias, labels, class_weights):
    return _pass(cfg, LOSS, hidden, weight, bias, labels, class_weights)[0]


def _fused_forward(cfg, hidden, weight, bias, labels, class_weights):
    loss, lse, dh, dw, *db = _pass(cfg, FORWARD, hidden, weight, bias, labels, class_weights)
    return loss, (hidden, weight, bias, labels, class_weights, lse, dh, dw, db[0] if db else None)


def _fused_backward(cfg, residuals, g):
    hidden, weight, bias, labels, class_weights, lse, dh, dw, db = residuals
    acc = _acc(hidden.dtype)
    g = g.astype(acc)
    g_ref, uniform = _shared_gradient(g, _counted_rows(cfg, labels))

    def scaled():
        return dw * g_ref, None if db is None else db * g_ref

    def recomputed():
        out = _pass(cfg, WEIGHTS, hidden, weight, bias, labels, class_weights, lse, g)
        return out[0], out[1] if cfg.has_bias else None

    dw, db = lax.cond(uniform, scaled, recomputed)
    dh = (dh.astype(acc) * g[:, None]).astype(hidden.dtype)
    db = None if bias is None else db.astype(bias.dtype)
    return dh, dw.astype(weight.dtype), db, None, None


fused.defvjp(_fused_forward, _fused_backward)


# ---------------------------------------------------------------- other platforms


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def composite(cfg, hidden, weight, bias, labels, class_weights):
    """The same chunked head with jax.numpy kernels, for platforms without our handlers;
    XLA partitions it itself."""
    ops = _Operands(hidden, weight, bias, labels, class_weights)
    return run_chunks(cfg, LOSS, ops, _composite_kernels(cfg, weight, class_weights))[0]


def _composite_kernels(cfg, weight, class_weights):
    return _Kernels(cfg, weight.shape[0 if cfg.transpose_weight else 1], (), class_weights, fused=False)


def _composite_forward(cfg, hidden, weight, bias, labels, class_weights):
    ops = _Operands(hidden, weight, bias, labels, class_weights)
    loss, lse, dh, dw, db = run_chunks(cfg, FORWARD, ops, _composite_kernels(cfg, weight, class_weights))
    return loss, (hidden, weight, bias, labels, class_weights, lse, dh, dw, db)


def _composite_backward(cfg, residuals, g):
    hidden, weight, bias, labels, class_weights, lse, dh, dw, db = residuals
    acc = _acc(hidden.dtype)
    g = g.astype(acc)
    g_ref, uniform = _shared_gradient(g, _counted_rows(cfg, labels))
    ops = _Operands(hidden, weight, bias, labels, class_weights, lse, g)
    kernels = _composite_kernels(cfg, weight, class_weights)

    def recomputed():
        return run_chunks(cfg, WEIGHTS, ops, kernels)

    dw, db = lax.cond(uniform, lambda: (dw * g_ref, None if db is None else db * g_ref), recomputed)
    dh = (dh.astype(acc) * g[:, None]).astype(hidden.dtype)
    return dh, dw.astype(weight.dtype), None if bias is None else db.astype(bias.dtype), None, None


composite.defvjp(_composite_forward, _composite_backward)


def loss(cfg, hidden, weight, bias, labels, class_weights):
    """The per-row loss of the flattened rows, on the kernels where JAX has them."""
    return _ffi._on_platforms(
        functools.partial(fused, cfg),
        functools.partial(composite, cfg),
        hidden,
        weight,
        bias,
        labels,
        class_weights,
    )
