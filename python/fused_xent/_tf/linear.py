"""Fused linear projection + sparse softmax cross-entropy that never holds the N x V logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``sparse_softmax_cross_entropy_with_logits(labels, hidden @ weight)`` with
gradients to hidden, weight and bias, but goes through the rows in chunks: per
chunk a TensorFlow matmul gives that chunk's logits, the fused kernels give its
loss, log-sum-exp and gradient (written over the logits), and matmuls fold the
gradient into dH and dW. dW is built in row slabs added in place
(TensorScatterAdd forwards its input buffer), so no W-sized temporary exists
beside dW itself. docs/linear_head.md has the design and its measurements.

Two ways of computing the gradient:

* when a GradientTape records the call, the forward pass also computes the
  gradients for a unit upstream gradient (3 matmuls per chunk, like an
  unfused Dense layer); the backward scales them. dH is exact for any upstream
  gradient g (its rows scale by g); dW and the bias gradient are exact when g
  is the same on all rows that count (a mean loss), otherwise the backward
  adds sum_rows (g - g_ref) * dW_row, recomputing each chunk's logits.
* otherwise (no tape: inference, or symbolic gradients) the forward keeps only
  the per-row log-sum-exp, and the backward recomputes the logits.
"""

import collections

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

from fused_xent import _checks
from fused_xent._tf.loader import load_op_library
from fused_xent._tf.ops import class_weights_tensor, ignore_index_attrs, option_attrs, refuse_composite

__all__ = ["linear_cross_entropy", "linear_logits"]

_FLOATS = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
_HALF = (tf.float16, tf.bfloat16)
# Default chunk: at most 1/16 of the rows (so a chunk's logits are at most 1/16
# of all N x V), at most this many bytes of logits, rounded down to a power of two, at least 16 rows.
# 1/16, not 1/8: a training step's first call then peaks at 23% of the logits above the
# process's base (less dW) at 2048 x 256 x 32000 float32, not 35% (docs/linear_head.md,
# "Targets"); at large V the extra chunks cost time (1.27x at V = 128256 float32, same place).
_CHUNK_BYTES = 128 << 20
_CHUNK_FRACTION = 16
_ROW_MULTIPLE = 16
# A slab of dW (see _add_weight_gradient) is at most _SLAB_FRACTION of a chunk's
# logits, and at least _MIN_SLAB_ROWS rows: thinner matmuls run slower
# (docs/linear_head.md, "Targets"). A chunk and a slab: at most 1.75/16 = 11% of the logits.
_SLAB_FRACTION = 0.75
_MIN_SLAB_ROWS = 16


class _Config:
    """The static (Python) part of a call; hashable, so it keys the internal tf.functions."""

    def __init__(self, transpose_weight, attrs, chunk, vocab, hidden_size, dtype, has_bias, has_weights):
        self.transpose_weight = transpose_weight
        self.attrs = attrs
        self.chunk = chunk
        self.vocab = vocab
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.has_bias = has_bias
        self.has_weights = has_weights

    def key(self):
        return (
            self.transpose_weight,
            tuple(sorted(self.attrs.items())),
            self.chunk,
            self.vocab,
            self.hidden_size,
            self.dtype.name,
            self.has_bias,
            self.has_weights,
        )

    @property
    def acc_dtype(self):
        """dW, db accumulate in float32 for half types only for the bias (small); dW in the weight's dtype."""
        return tf.float32 if self.dtype in _HALF else self.dtype

    def slab_rows(self):
        """Rows of dW per in-place add."""
        rows, cols = (self.vocab, self.hidden_size) if self.transpose_weight else (self.hidden_size, self.vocab)
        slab = max(_MIN_SLAB_ROWS, int(self.chunk * self.vocab * _SLAB_FRACTION) // cols)
        return min(rows, slab)


# ------------------------------------------------------------------ arguments


def _float_tensor(value, name):
    refuse_composite(value, name)
    tensor = tf.convert_to_tensor(value, name=name)
    if tensor.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype.name}")
    return tensor


def _checked_chunk(chunk_size, rows, vocab, dtype):
    """The rows per chunk. The default is a power of two (>= _ROW_MULTIPLE): calls whose row
    counts vary (a last partial batch, sequences of varying length) then share a few chunk sizes,
    hence a few traced functions, and the chunks divide power-of-two batches evenly."""
    if chunk_size is None:
        chunk = _CHUNK_BYTES // (vocab * dtype.size)
        if rows is not None:
            chunk = min(chunk, rows // _CHUNK_FRACTION)
        return max(_ROW_MULTIPLE, 1 << max(0, chunk.bit_length() - 1))
    return _checks.chunk_size(chunk_size)


def _checked_shapes(hidden, weight, labels, bias, transpose_weight):
    """(hidden size H, vocabulary V), after checking every shape against them."""
    if weight.shape.rank != 2:
        raise ValueError(f"weight must be a matrix, got shape {weight.shape}")
    if not weight.shape.is_fully_defined():
        raise ValueError(f"weight must have a static shape, got {weight.shape}")
    vocab, hidden_size = weight.shape if transpose_weight else weight.shape[::-1]
    layout = "V x H (transpose_weight=True)" if transpose_weight else "H x V"
    if hidden.shape.rank is None or hidden.shape.rank < 2:
        raise ValueError(f"hidden must have rank >= 2 (rows x H), got shape {hidden.shape}")
    if hidden.shape[-1] is not None and hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal H={hidden_size} of weight {weight.shape} ({layout})"
        )
    if labels.shape.rank is not None and not labels.shape.is_compatible_with(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of hidden without its last axis: labels {labels.shape}, hidden {hidden.shape}"
        )
    if bias is not None and (bias.shape.rank != 1 or not bias.shape.is_compatible_with([vocab])):
        raise ValueError(f"bias must be a vector of V={vocab} entries, got shape {bias.shape}")
    return hidden_size, vocab


def _checked_dtypes(hidden, weight, labels, bias):
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight ({weight.dtype.name}) must have hidden's dtype ({hidden.dtype.name})")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias ({bias.dtype.name}) must have hidden's dtype ({hidden.dtype.name})")
    if labels.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"labels must be int32 or int64 class indices, got {labels.dtype.name}")


def _checked_rows(hidden, labels):
    """(hidden, labels), with a run-time check that labels have hidden's shape without its last axis
    where the shapes are not both known now (flattened, a mismatch would pair rows and labels wrongly)."""
    expected = hidden.shape[:-1]
    if labels.shape.is_fully_defined() and expected.is_fully_defined():
        return hidden, labels  # checked by _checked_shapes
    label_shape = tf.shape(labels, out_type=tf.int64)
    row_shape = tf.shape(hidden, out_type=tf.int64)[:-1]
    same = tf.cond(
        tf.equal(tf.size(label_shape), tf.size(row_shape)),
        lambda: tf.reduce_all(tf.equal(label_shape, tf.reshape(row_shape, tf.shape(label_shape)))),
        lambda: tf.constant(False),
    )
    check = tf.debugging.Assert(
        same,
        ["labels must have the shape of hidden without its last axis: labels", label_shape, "hidden", tf.shape(hidden)],
    )
    with tf.control_dependencies([check]):
        return tf.identity(hidden), tf.identity(labels)


def _check_static_labels(labels, vocab, ignore_index):
    """Labels known when the graph is built are checked here; others by the kernel."""
    values = tf.get_static_value(labels)
    if values is not None:
        _checks.static_labels(values, vocab, ignore_index)


# ------------------------------------------------------------------ one chunk


def _logits(h_c, w, b, cfg):
    z = tf.matmul(h_c, w, transpose_b=cfg.transpose_weight)
    return z if b is None else tf.nn.bias_add(z, b)


def _forward_op(z, y_c, cw, cfg):
    return load_op_library().fused_xent_sparse_softmax_cross_entropy(z, y_c, cw, axis=-1, **cfg.attrs)


def _gradient_op(z, y_c, cw, lse_c, g_c, cfg):
    """(softmax - target) * g per row, written over z when nothing else holds it."""
    return load_op_library().fused_xent_sparse_softmax_cross_entropy_grad(
        z, y_c, cw, lse_c, tf.cast(g_c, z.dtype), tf.zeros([0], tf.float64), axis=-1, **cfg.attrs
    )


def _hidden_gradient(dz, w, cfg):
    return tf.matmul(dz, w, transpose_b=not cfg.transpose_weight)


def _add_weight_gradient(dw, dz, h_c, cfg):
    """dw += h_c^T dz, a slab of dW rows at a time so that no W-sized partial exists.
    Each slab waits for the previous add, which keeps one partial alive at a time."""
    rows = dw.shape[0]
    step = cfg.slab_rows()
    # h_c's columns as rows, once per chunk: the slabs' matmuls then take plain row
    # slices (bfloat16 slabs ran 1.2x faster than with transpose_a).
    h_t = None if cfg.transpose_weight else tf.transpose(h_c)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        with tf.control_dependencies([dw]):
            if cfg.transpose_weight:
                part = tf.matmul(dz[:, r0:r1], h_c, transpose_a=True)  # (V slab) x H
            else:
                part = tf.matmul(h_t[r0:r1], dz)  # (H slab) x V
        dw = _add_rows(dw, r0, tf.cast(part, dw.dtype))
    return dw


def _add_bias_gradient(db, dz):
    return db + tf.reduce_sum(tf.cast(dz, db.dtype), 0)


# In-place row writes. TensorScatterAdd/Update copy their input on the CPU
# (measured: ~20 ms per call on a 131 MB buffer, whatever its refcount), so
# outside XLA the rows go in with AddToRows (or InplaceAdd)/InplaceUpdate, which write into
# their input unconditionally: they are only ever applied to buffers this
# module allocated and nothing else reads. XLA updates scatters in place itself.


def _in_xla():
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _row_indices(start, values):
    size = values.shape[0] if values.shape[0] is not None else tf.shape(values)[0]
    return start + tf.range(size)  # a static range plus an offset (XLA needs the size constant)


def _add_rows(buffer, start, values):
    if _in_xla():
        return tf.tensor_scatter_nd_add(buffer, _row_indices(start, values)[:, None], values)
    if not tf.config.list_logical_devices("GPU"):
        # The op library's own add (SIMD, on TensorFlow's threads): InplaceAdd took 2.8x as long
        # in float32, 7x in bfloat16 (benchmarks/bench_add_rows.py). It has no GPU kernel.
        return load_op_library().fused_xent_add_to_rows(buffer, tf.cast(start, tf.int32), values)
    return tf.raw_ops.InplaceAdd(x=buffer, i=_row_indices(start, values), v=values)


def _write_rows(buffer, start, values):
    rows = _row_indices(start, values)
    if _in_xla():
        return tf.tensor_scatter_nd_update(buffer, rows[:, None], values)
    return tf.raw_ops.InplaceUpdate(x=buffer, i=rows, v=values)


def _private_zeros(shape, dtype):
    """A zero buffer of our own: Empty is never folded or merged with another
    node by Grappler, so the in-place writes above cannot reach anyone else's tensor."""
    if _in_xla():
        return tf.zeros(shape, dtype)
    return tf.raw_ops.Empty(shape=shape, dtype=dtype, init=True)


# ------------------------------------------------------------------ loops over row chunks


def _row_loop(rows, cfg, body, state):
    """Runs body(start, size, state) over [0, rows) in chunks of cfg.chunk: the
    full chunks in a while loop (one at a time, so one chunk's logits live at
    once) and the remainder after it, so every slice has a static size when rows is."""
    chunk = cfg.chunk
    full = rows // chunk

    def step(i, *carry):
        with tf.control_dependencies(list(carry)):  # the next chunk waits for this one's writes
            start = i * chunk
        return (i + 1, *body(start, chunk, carry))

    state = tf.while_loop(lambda i, *carry: i < full, step, (tf.constant(0), *state), parallel_iterations=1)[1:]
    remainder = rows - full * chunk
    static_remainder = tf.get_static_value(remainder)
    if static_remainder == 0:
        return tuple(state)
    with tf.control_dependencies(list(state)):
        start = full * chunk
    return tuple(body(start, remainder, state))


def _rows(h, start, size):
    return tf.slice(h, [start, 0], [size, -1])


def _forward_only(h, w, b, y, cw, cfg):
    """(loss, lse) per row."""
    n = _num_rows(h)
    loss = _private_zeros([n], cfg.dtype)
    lse = _private_zeros([n], tf.float64)

    def body(start, size, carry):
        loss, lse = carry
        z = _logits(_rows(h, start, size), w, b, cfg)
        loss_c, lse_c = _forward_op(z, tf.slice(y, [start], [size]), cw, cfg)
        return _write_rows(loss, start, loss_c), _write_rows(lse, start, lse_c)

    return _row_loop(n, cfg, body, (loss, lse))


def _forward_with_gradients(h, w, b, y, cw, cfg):
    """(loss, lse, dh, dw, db) with the gradients for an upstream gradient of 1 on every row."""
    n = _num_rows(h)
    state = (
        _private_zeros([n], cfg.dtype),
        _private_zeros([n], tf.float64),
        _private_zeros(tf.shape(h), h.dtype),
        _private_zeros(w.shape, w.dtype),
        tf.zeros([cfg.vocab], cfg.acc_dtype),
    )

    def body(start, size, carry):
        loss, lse, dh, dw, db = carry
        h_c, y_c = _rows(h, start, size), tf.slice(y, [start], [size])
        z = _logits(h_c, w, b, cfg)
        loss_c, lse_c = _forward_op(z, y_c, cw, cfg)
        dz = _gradient_op(z, y_c, cw, lse_c, tf.ones([size], cfg.dtype), cfg)
        dh = _write_rows(dh, start, _hidden_gradient(dz, w, cfg))
        db = _add_bias_gradient(db, dz) if cfg.has_bias else db
        dw = _add_weight_gradient(dw, dz, h_c, cfg)
        return _write_rows(loss, start, loss_c), _write_rows(lse, start, lse_c), dh, dw, db

    return _row_loop(n, cfg, body, state)


def _weight_gradients(h, w, b, y, cw, lse, g, dw, db, cfg):
    """dw += sum_rows g * dW_row (and db alike), recomputing each chunk's logits; also dh."""
    n = _num_rows(h)
    dh = _private_zeros(tf.shape(h), h.dtype)

    def body(start, size, carry):
        dh, dw, db = carry
        h_c, y_c = _rows(h, start, size), tf.slice(y, [start], [size])
        z = _logits(h_c, w, b, cfg)
        dz = _gradient_op(z, y_c, cw, tf.slice(lse, [start], [size]), tf.slice(g, [start], [size]), cfg)
        dh = _write_rows(dh, start, _hidden_gradient(dz, w, cfg))
        db = _add_bias_gradient(db, dz) if cfg.has_bias else db
        return dh, _add_weight_gradient(dw, dz, h_c, cfg), db

    return _row_loop(n, cfg, body, (dh, dw, db))


def _num_rows(h):
    rows = h.shape[0]
    return rows if rows is not None else tf.shape(h)[0]


# ------------------------------------------------------------------ backward


def _counted_rows(y, cfg):
    """Rows whose gradient is not identically zero (not ignore_index)."""
    attrs = cfg.attrs
    if not attrs["has_ignore_index"] or not y.dtype.min <= attrs["ignore_index"] <= y.dtype.max:
        return tf.ones_like(y, tf.bool)
    return tf.not_equal(y, tf.constant(attrs["ignore_index"], y.dtype))


def _shared_gradient(g, counted):
    """(g_ref, uniform): the upstream gradient shared by all counted rows, if they share one."""
    high = tf.reduce_max(tf.where(counted, g, -np.inf))
    low = tf.reduce_min(tf.where(counted, g, np.inf))
    any_counted = tf.reduce_any(counted)
    return tf.where(any_counted, high, tf.zeros_like(high)), tf.logical_or(
        tf.equal(high, low), tf.logical_not(any_counted)
    )


def _scaled_backward(h, w, b, y, cw, lse, dh0, dw0, db0, g, cfg):
    """Gradients from the forward's unit-gradient ones (see the module docstring). dH scales
    row by row. dW and db scale by the shared upstream gradient; without one, they are
    zeroed (in place, the same multiply) and rebuilt from recomputed logits."""
    g_ref, uniform = _shared_gradient(g, _counted_rows(y, cfg))
    scale = tf.where(uniform, g_ref, tf.zeros_like(g_ref))
    dh = dh0 * tf.cast(g, dh0.dtype)[:, None]
    dw = dw0 * tf.cast(scale, dw0.dtype)  # in place when nothing else holds dw0
    db = db0 * tf.cast(scale, db0.dtype)

    def rebuild():
        return _weight_gradients(h, w, b, y, cw, lse, g, dw, db, cfg)[1:]

    dw, db = tf.cond(uniform, lambda: (tf.identity(dw), tf.identity(db)), rebuild)
    return dh, dw, db


def _recomputed_backward(h, w, b, y, cw, lse, g, cfg):
    dw = _private_zeros(w.shape, w.dtype)
    db = tf.zeros([cfg.vocab], cfg.acc_dtype)
    return _weight_gradients(h, w, b, y, cw, lse, g, dw, db, cfg)


# ------------------------------------------------------------------ graph or internal function

_FUNCTIONS = collections.OrderedDict()  # least recently used first
_MAX_FUNCTIONS = 32  # each holds its traced graphs: bounded, so varying shapes cannot grow memory


def _run(builder, cfg, *args):
    """Builds the loop inline in a graph; eagerly, runs it as a cached tf.function,
    where TensorFlow can forward buffers (in place adds, gradients over logits)."""
    if not tf.executing_eagerly():
        return builder(*args, cfg)
    key = (builder.__name__, cfg.key(), tuple(a is None for a in args))
    function = _FUNCTIONS.pop(key, None)
    if function is None:
        function = tf.function(lambda *a: builder(*a, cfg), reduce_retracing=True)
    _FUNCTIONS[key] = function
    while len(_FUNCTIONS) > _MAX_FUNCTIONS:
        _FUNCTIONS.popitem(last=False)
    # Unwatched inputs: the tape must not try to differentiate the function (InplaceAdd has no gradient).
    return function(*[None if a is None else tf.stop_gradient(a) for a in args])


def _fused(h, w, b, y, cw, cfg, strategy):
    recording = record.should_record_backprop([t for t in (h, w, b) if t is not None])
    precompute = recording and strategy == "auto"

    @tf.custom_gradient
    def run(h, w, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        if precompute:
            loss, lse, dh0, dw0, db0 = _run(_forward_with_gradients, cfg, h, w, b, y, cw)
        else:
            loss, lse = _run(_forward_only, cfg, h, w, b, y, cw)

        def grad(g):
            g = tf.reshape(tf.cast(g, tf.float64 if cfg.dtype == tf.float64 else tf.float32), [-1])
            if precompute:
                dh, dw, db = _run(_scaled_backward, cfg, h, w, b, y, cw, lse, dh0, dw0, db0, g)
            else:
                dh, dw, db = _run(_recomputed_backward, cfg, h, w, b, y, cw, lse, g)
            return (dh, dw, tf.cast(db, b.dtype)) if b is not None else (dh, dw)

        out_dtype = tf.float32 if cfg.dtype in _HALF else cfg.dtype
        return tf.cast(loss, out_dtype), grad

    return run(h, w, *([] if b is None else [b]))


# ------------------------------------------------------------------ public


def _prepare(hidden, weight, labels, bias, transpose_weight, class_weights, chunk_size, **options):
    hidden = _float_tensor(hidden, "hidden")
    weight = _float_tensor(weight, "weight")
    bias = None if bias is None else _float_tensor(bias, "bias")
    refuse_composite(labels, "labels")
    labels = tf.convert_to_tensor(labels, name="labels")
    if not isinstance(transpose_weight, bool):
        raise TypeError(f"transpose_weight must be a bool, got {transpose_weight!r}")
    _checked_dtypes(hidden, weight, labels, bias)
    hidden_size, vocab = _checked_shapes(hidden, weight, labels, bias, transpose_weight)
    attrs = dict(
        **option_attrs(options["label_smoothing"], options["z_loss"], options["softcap"]),
        **ignore_index_attrs(options["ignore_index"]),
    )
    _check_static_labels(labels, vocab, options["ignore_index"])
    cw = class_weights_tensor(class_weights, vocab)
    cfg = _Config(
        transpose_weight,
        attrs,
        _checked_chunk(chunk_size, hidden.shape[:-1].num_elements(), vocab, hidden.dtype),
        vocab,
        hidden_size,
        hidden.dtype,
        bias is not None,
        class_weights is not None,
    )
    return hidden, weight, labels, bias, cw, cfg


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    transpose_weight=False,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    chunk_size=None,
    softcap=None,
    _strategy="auto",
):
    """Per-token softmax cross-entropy of ``hidden @ weight (+ bias)``, without the logits.

    Equal to ``sparse_softmax_cross_entropy_with_logits(labels, hidden @ weight + bias)``
    (with the same options), with gradients to ``hidden``, ``weight`` and
    ``bias`` for any upstream gradient, while holding at most ``chunk_size``
    rows of logits (and of their gradient) at a time.

    Args:
      hidden: (..., H) float16, bfloat16, float32 or float64 tensor.
      weight: H x V matrix of hidden's dtype, or V x H with ``transpose_weight=True``
        (an input embedding's matrix, for tied embeddings).
      labels: int32/int64 class indices, shaped like ``hidden`` without its last axis.
      bias: optional length-V vector of hidden's dtype.
      transpose_weight: whether ``weight`` is V x H.
      ignore_index, label_smoothing, class_weights, z_loss, softcap: as in
        ``fused_xent.sparse_softmax_cross_entropy_with_logits`` (softcap caps the logits,
        ``cap * tanh(z / cap)``, inside the fused kernels).
      chunk_size: rows of logits per chunk; default: at most 1/16 of the rows and at
        most 128 MiB of logits, rounded down to a power of two (at least 16 rows).

    Returns:
      The per-token loss, shaped like ``labels``: float32 for half-precision
      inputs (the kernel accumulates in float32 and rounds each row's loss to
      the logits' dtype), else hidden's dtype.
    """
    if _strategy not in ("auto", "recompute"):
        raise ValueError(f"unknown gradient strategy {_strategy!r}")
    with tf.name_scope("linear_cross_entropy"):
        hidden, weight, labels, bias, cw, cfg = _prepare(
            hidden,
            weight,
            labels,
            bias,
            transpose_weight,
            class_weights,
            chunk_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        hidden, labels = _checked_rows(hidden, labels)
        h = tf.reshape(hidden, [-1, cfg.hidden_size])
        y = tf.reshape(labels, [-1])
        loss = _fused(h, weight, bias, y, cw, cfg, _strategy)
        return tf.reshape(loss, tf.shape(labels))


def linear_logits(hidden, weight, *, bias=None, transpose_weight=False, softcap=None):
    """``hidden @ weight (+ bias)``: the logits, for inference (with ``transpose_weight`` for V x H),
    capped as the loss reads them (``softcap * tanh(logits / softcap)``) with a softcap."""
    hidden = _float_tensor(hidden, "hidden")
    weight = _float_tensor(weight, "weight")
    cap = _checks.softcap(softcap)
    logits = tf.linalg.matmul(hidden, weight, transpose_b=transpose_weight)
    if bias is not None:
        logits = tf.nn.bias_add(logits, tf.convert_to_tensor(bias, logits.dtype))
    return logits if not cap else cap * tf.tanh(logits / cap)
