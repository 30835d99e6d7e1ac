"""The fused kernels in JAX: the XLA FFI handlers called with ``jax.ffi.ffi_call``.

``sparse_softmax_cross_entropy_with_logits`` and ``softmax_cross_entropy_with_logits``
take the arguments of the TensorFlow functions of the same names and return the
per-example loss. They work eagerly and under ``jax.jit``, ``jax.grad`` and
``jax.vmap`` (a batch axis is more rows: one kernel call), on the CPU and, in
CUDA builds, on the GPU. Under sharding (``jax.sharding``, Keras's
``DataParallel``) each device runs the kernels on its own rows
(docs/distributed.md). On platforms without the handlers (TPU, ROCm) they
lower to an exact jax.numpy composite instead.

The first derivative is the fused backward kernel, in reverse mode (``jax.grad``,
``jacrev``: the kernel with the upstream gradient) and forward mode (``jax.jvp``,
``jacfwd``, ``linearize``: the row dot of the kernel's gradient with the tangent).
Higher derivatives (``jax.hessian``, forward over reverse, gradient penalties) use a
composite of jax.numpy ops for the derivative of that kernel: exact, but not fused.

A label outside ``[0, C)`` that is not ``ignore_index`` raises the handler's
``INVALID_ARGUMENT`` error on the CPU (a ``JaxRuntimeError``); on a GPU it gives
NaN for its row. Gradients with respect to ``class_weights`` are zero.

Importing this module imports neither TensorFlow nor Keras.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fused_xent import _checks
from fused_xent.jax import _ffi, _linear
from fused_xent.jax._optax import (
    safe_softmax_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__all__ = [
    "linear_cross_entropy",
    "linear_logits",
    "safe_softmax_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
]


def _float_logits(logits):
    logits = jnp.asarray(logits)
    _checks.logits_dtype(logits.dtype.name)
    _checks.logits_rank(logits.ndim, logits)
    return logits


def _negative_axis(axis, rank):
    """axis counted from the end, so that it stays right when vmap adds leading axes."""
    axis = _checks.axis(axis, rank)
    return axis - rank if axis >= 0 else axis


def _class_weights(class_weights, classes):
    if class_weights is None:
        return jnp.zeros([0], jnp.float32)
    dtype = getattr(class_weights, "dtype", None)
    if dtype is not None:
        _checks.class_weight_dtype(jnp.dtype(dtype).name)
    try:
        weights = jnp.asarray(class_weights, jnp.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"class_weights must be a vector of floats: {error}") from None
    _checks.class_weight_shape(weights.shape, classes)
    if not isinstance(weights, jax.core.Tracer):  # known values are checked now, others by the CPU kernels
        _checks.class_weight_values(np.asarray(weights))
    return weights


def sparse_softmax_cross_entropy_with_logits(
    labels,
    logits,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    axis=-1,
    softcap=None,
):
    """Per-example softmax cross-entropy with integer class labels, fused.

    The JAX twin of ``fused_xent.sparse_softmax_cross_entropy_with_logits``: the
    same arguments (labels int32/int64 shaped like ``logits`` without ``axis``;
    ``ignore_index``, ``label_smoothing``, ``class_weights``, ``z_loss``, ``softcap``) and
    the same values. Returns the loss, shaped like ``labels``, in the logits' dtype.
    """
    _ffi.register_targets()
    logits = _float_logits(logits)
    labels = jnp.asarray(labels)
    _checks.sparse_label_dtype(labels.dtype.name)
    axis = _negative_axis(axis, logits.ndim)
    _checks.sparse_shapes(labels.shape, logits.shape, axis)
    weights = _class_weights(class_weights, logits.shape[axis])
    smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    ignore_index = _checks.ignore_index_for(ignore_index, labels.dtype.name)
    opts = (axis, smoothing, z_loss, ignore_index, _checks.softcap(softcap))
    return _ffi.sparse(opts, logits, labels, weights)


def softmax_cross_entropy_with_logits(labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Per-example softmax cross-entropy with a distribution as labels, fused.

    The JAX twin of ``fused_xent.softmax_cross_entropy_with_logits``: ``labels``
    are cast to the logits' dtype and broadcast to their shape; the gradient
    flows to both ``logits`` and ``labels``.
    """
    _ffi.register_targets()
    logits = _float_logits(logits)
    axis = _negative_axis(axis, logits.ndim)
    labels = jnp.asarray(labels).astype(logits.dtype)
    _checks.dense_label_shape(labels.shape, logits.shape)
    labels = jnp.broadcast_to(labels, logits.shape)
    opts = (axis, *_checks.kernel_options(label_smoothing, z_loss), _checks.softcap(softcap))
    return _ffi.dense(opts, logits, labels)


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
):
    """Per-token softmax cross-entropy of ``hidden @ weight (+ bias)``, without the logits.

    The JAX twin of ``fused_xent.linear_cross_entropy``: equal to
    ``sparse_softmax_cross_entropy_with_logits(labels, hidden @ weight + bias)`` with the same
    options, with gradients to ``hidden``, ``weight`` and ``bias``, while holding at most
    ``chunk_size`` rows of logits at a time. Under sharding, hidden's rows may be split over
    some mesh axes and the weight's classes over others (docs/distributed.md#the-linear-head).

    Args:
      hidden: (..., H) float16, bfloat16, float32 or float64 array.
      weight: H x V matrix of hidden's dtype, or V x H with ``transpose_weight=True``.
      labels: int32/int64 class indices, shaped like ``hidden`` without its last axis.
      bias: optional length-V vector of hidden's dtype.
      ignore_index, label_smoothing, class_weights, z_loss, softcap: as in
        ``sparse_softmax_cross_entropy_with_logits`` (softcap caps the logits: cap * tanh(z / cap)).
      chunk_size: rows of logits per chunk (per device); default: at most 1/16 of the rows
        and at most 128 MiB of logits, a power of two (at least 16 rows).

    Returns:
      The per-token loss, shaped like ``labels``: float32 for half-precision inputs, else
      hidden's dtype. The weight and bias gradients accumulate in float32 (float64 for float64).
    """
    _ffi.register_targets()
    hidden, weight, labels = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    bias = None if bias is None else jnp.asarray(bias)
    _checks.linear_dtypes(
        hidden.dtype.name, weight.dtype.name, None if bias is None else bias.dtype.name, labels.dtype.name
    )
    hidden_size, vocab = _checks.linear_shapes(
        hidden.shape, weight.shape, labels.shape, None if bias is None else bias.shape, transpose_weight
    )
    ignore_index = _checks.ignore_index_for(ignore_index, labels.dtype.name)
    if not isinstance(labels, jax.core.Tracer):
        _checks.static_labels(np.asarray(labels), vocab, ignore_index)
    weights = _class_weights(class_weights, vocab)
    smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    cfg = _linear.Config(
        opts=(-1, smoothing, z_loss, ignore_index, _checks.softcap(softcap)),
        transpose_weight=transpose_weight,
        chunk_size=_checks.chunk_size(chunk_size),
        has_bias=bias is not None,
    )
    loss = _linear.loss(cfg, hidden.reshape(-1, hidden_size), weight, bias, labels.reshape(-1), weights)
    out_dtype = jnp.float32 if hidden.dtype in (jnp.float16, jnp.bfloat16) else hidden.dtype
    return loss.astype(out_dtype).reshape(labels.shape)


def linear_logits(hidden, weight, *, bias=None, transpose_weight=False, softcap=None):
    """``hidden @ weight (+ bias)``: the logits, for inference (``transpose_weight`` for V x H),
    capped as the loss reads them (``softcap * tanh(logits / softcap)``) with a softcap."""
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    cap = _checks.softcap(softcap)
    logits = hidden @ (weight.T if transpose_weight else weight)
    logits = logits if bias is None else logits + jnp.asarray(bias, logits.dtype)
    return logits if not cap else (cap * jnp.tanh(logits / cap)).astype(logits.dtype)
