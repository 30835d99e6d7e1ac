"""The losses as jax.numpy formulas, for platforms without the FFI handlers (TPU, ROCm, any
other): the same rows as the kernels (docs/derivation.md), differentiated by JAX itself.
``_ffi.sparse`` and ``_ffi.dense`` pick them with ``jax.lax.platform_dependent``, so a program
lowered for such a platform holds no custom call of ours. An out-of-range label gives NaN for
its row there (no handler to raise)."""

import jax
import jax.numpy as jnp


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _row_terms(z, axis):
    """z in the accumulation type and each row's lse (kept as an axis of size 1)."""
    z = z.astype(_acc(z.dtype))
    return z, jax.nn.logsumexp(z, axis=axis, keepdims=True)


def _gaps(z, lse, weights):
    """sum_j weights_j (lse - z_j), with a zero weight's term 0 even where z_j = -inf."""
    return jnp.where(weights != 0, weights * (lse - z), 0.0)


def capped(z, cap):
    """The logits the kernels read: cap * tanh(z / cap) in the accumulation type, or z (cap 0)."""
    if not cap:
        return z
    z = z.astype(_acc(z.dtype))
    return cap * jnp.tanh(z / cap)


def cap_slope(z, cap):
    """d capped / dz = 1 - tanh(z / cap)^2 (for the composite derivatives)."""
    tanh = jnp.tanh(z.astype(_acc(z.dtype)) / cap)
    return 1.0 - tanh * tanh


def sparse(opts, z, labels, class_weights):
    axis, eps, lam, ignore_index, cap = opts
    out_dtype = z.dtype
    z, lse = _row_terms(capped(z, cap), axis)
    classes = z.shape[axis]
    kept = labels != ignore_index if ignore_index is not None else jnp.ones(labels.shape, bool)
    in_range = (labels >= 0) & (labels < classes)
    safe = jnp.where(kept & in_range, labels, 0)
    q = (1.0 - eps) * jax.nn.one_hot(safe, classes, axis=axis, dtype=z.dtype) + eps / classes
    row_lse = jnp.squeeze(lse, axis)
    weight = class_weights[safe].astype(z.dtype) if class_weights.shape[0] else 1.0
    loss = weight * (jnp.sum(_gaps(z, lse, q), axis) + lam * row_lse * row_lse)
    return jnp.where(kept, jnp.where(in_range, loss, jnp.nan), 0.0).astype(out_dtype)


def dense(opts, z, t):
    axis, eps, lam, cap = opts
    out_dtype = z.dtype
    z, lse = _row_terms(capped(z, cap), axis)
    q = (1.0 - eps) * t.astype(z.dtype) + eps / z.shape[axis]
    row_lse = jnp.squeeze(lse, axis)
    return (jnp.sum(_gaps(z, lse, q), axis) + lam * row_lse * row_lse).astype(out_dtype)
