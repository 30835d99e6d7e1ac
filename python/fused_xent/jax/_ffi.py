"""The XLA FFI calls behind fused_xent.jax, and their derivative rules.

``sparse(opts, logits, labels, weights)`` and ``dense(opts, logits, labels)`` give the
per-example loss; their first derivative is the fused backward kernel (a
``jax.custom_vjp``), higher ones differentiate a composite of jax.numpy ops for that
kernel's output (exact, not fused). The forward keeps each row's logsumexp in float64
for the backward: an internal value, so ``jax_enable_x64`` may stay off.
"""

import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from fused_xent import _core
from fused_xent.jax import _composite, _sharding

_JAX_PLATFORMS = {"cpu": "cpu", "cuda": "CUDA"}
_lock = threading.Lock()
_registered = False


def register_targets():
    """Registers the build's FFI targets in JAX, once, for every platform it has."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        for platform, targets in _core.ffi_targets().items():
            for name, capsule in targets.items():
                try:
                    jax.ffi.register_ffi_target(name, capsule, platform=_JAX_PLATFORMS.get(platform, platform))
                except Exception:  # noqa: BLE001  (a jaxlib without that platform: its calls never run there)
                    if platform == "cpu":
                        raise
        _registered = True


# ---------------------------------------------------------------- the FFI calls
#
# `opts` is a hashable tuple of the static options (jax.custom_* nondiff argument):
# sparse: (axis, label_smoothing, z_loss, ignore_index or None); dense: (axis, label_smoothing, z_loss);
# a vocabulary-parallel shard's call (jax/_vocab_parallel.py) adds total_classes (dense) or
# (total_classes, absent_label) (sparse). axis is negative; the floats are what the kernel sees (float32).


def _attrs(name, opts):
    attrs = dict(axis=np.int64(opts[0]), label_smoothing=np.float32(opts[1]), z_loss=np.float32(opts[2]))
    if name.startswith("fused_xent_dense"):
        if len(opts) == 4:
            attrs.update(total_classes=np.int64(opts[3]))
        return attrs
    attrs.update(ignore_index=np.int64(0 if opts[3] is None else opts[3]), has_ignore_index=opts[3] is not None)
    if len(opts) == 6:
        attrs.update(total_classes=np.int64(opts[4]), absent_label=np.int64(opts[5]))
    return attrs


def _rows(z, axis):
    return jax.ShapeDtypeStruct(tuple(d for i, d in enumerate(z.shape) if i != axis % z.ndim), z.dtype)


@functools.lru_cache(maxsize=None)
def _workspace_bytes(kind, shape, axis, itemsize):
    axis %= len(shape)
    outer, inner = int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return _core.workspace_bytes(kind, outer, shape[axis], inner, itemsize)


def _workspace(name, z, axis):
    """The targets' last result: scratch memory for the CUDA kernels, allocated by XLA with the
    call's other buffers and dropped after it. Its size depends on the shape alone, so one lowering
    serves every platform (the CPU handlers leave it alone)."""
    kind = name[len("fused_xent_") :].removesuffix("_shard")
    return jax.ShapeDtypeStruct((_workspace_bytes(kind, tuple(z.shape), axis, z.dtype.itemsize),), np.uint8)


def _forward_ffi(name, opts, z, *operands):
    return _sharding.call(_run_forward, name, opts, z, *operands)


def _backward_ffi(name, opts, z, *operands):
    # The runner is part of what jax/_sharding.py caches a traced call by.
    runner = _run_backward_over_logits if _alias_gradient() else _run_backward
    return _sharding.call(runner, name, opts, z, *operands)


def _run_forward(name, opts, z, *operands):
    """The forward handler on whole arrays, or on one device's shard (jax/_sharding.py)."""
    row = _rows(z, opts[0])
    per_row = jax.ShapeDtypeStruct(row.shape, np.float64)  # float64 even without x64: the call returns it as asked
    # lse; a dense shard's call also gives its label sums
    extra = (per_row,) if name == "fused_xent_dense_forward_shard" else ()
    call = jax.ffi.ffi_call(name, (row, per_row, *extra, _workspace(name, z, opts[0])), vmap_method="sequential")
    return tuple(call(z, *operands, **_attrs(name, opts))[:-1])


def _alias_gradient():
    """Whether the backward writes the gradient over the logits' buffer. Not by default: XLA must
    then copy the logits first wherever they are still needed afterwards (a jit parameter that is
    not donated, Keras's train step, which returns the logits), and that copy cost more than the
    fresh output it saves (docs/xla.md#the-gradients-buffer). FUSED_XENT_JAX_ALIAS_GRADIENT=1,
    read when a function is traced, asks for the aliasing, for measurements."""
    return os.environ.get("FUSED_XENT_JAX_ALIAS_GRADIENT", "0") not in ("", "0")


def _run_backward(name, opts, z, *operands, aliases=None):
    out = jax.ShapeDtypeStruct(z.shape, z.dtype)
    call = jax.ffi.ffi_call(
        name, (out, _workspace(name, z, opts[0])), vmap_method="sequential", input_output_aliases=aliases
    )
    return call(z, *operands, **_attrs(name, opts))[0]


def _run_backward_over_logits(name, opts, z, *operands):
    return _run_backward(name, opts, z, *operands, aliases={0: 0})


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _softmax_parts(z, axis):
    z = z.astype(_acc(z.dtype))
    lse = jax.nn.logsumexp(z, axis=axis, keepdims=True)
    return z, lse, jnp.exp(z - lse)


# Composite gradients (dz = g*w*((sum q + 2 lambda lse) p - q), docs/derivation.md): only
# differentiated, for the second derivative; the first is the fused kernel.


def _sparse_gradient_composite(opts, z, labels, weights, g):
    axis, eps, lam, ignore_index = opts
    z, lse, p = _softmax_parts(z, axis)
    acc = z.dtype
    classes = z.shape[axis]
    valid = labels != ignore_index if ignore_index is not None else jnp.ones(labels.shape, bool)
    safe = jnp.where(valid, labels, 0)
    q = (1.0 - eps) * jax.nn.one_hot(safe, classes, axis=axis, dtype=acc) + eps / classes
    w = weights[safe].astype(acc) if weights.shape[0] else jnp.ones(labels.shape, acc)
    scale = jnp.expand_dims(g.astype(acc) * jnp.where(valid, w, 0.0), axis)
    return scale * ((1.0 + 2.0 * lam * lse) * p - q)


def _dense_gradient_composite(opts, z, t, g):
    axis, eps, lam = opts
    z, lse, p = _softmax_parts(z, axis)
    q = (1.0 - eps) * t.astype(z.dtype) + eps / z.shape[axis]
    a = jnp.sum(q, axis, keepdims=True) + 2.0 * lam * lse
    return jnp.expand_dims(g.astype(z.dtype), axis) * (a * p - q)


def _row_dot(a, b, axis, dtype):
    return jnp.sum(a.astype(_acc(dtype)) * b.astype(_acc(dtype)), axis).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sparse_forward(opts, z, labels, weights):
    return _forward_ffi("fused_xent_sparse_forward", opts, z, labels, weights)


@_sparse_forward.defjvp
def _sparse_forward_jvp(opts, primals, tangents):
    z, labels, weights = primals
    loss, lse = _sparse_forward(opts, z, labels, weights)
    grad = _sparse_backward(opts, z, labels, weights, lse, jnp.ones_like(loss))
    # lse is internal: its consumers (_sparse_backward) differentiate through z instead.
    return (loss, lse), (_row_dot(grad, tangents[0], opts[0], loss.dtype), jnp.zeros_like(lse))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sparse_backward(opts, z, labels, weights, lse, g):
    return _backward_ffi("fused_xent_sparse_backward", opts, z, labels, weights, lse, g)


@_sparse_backward.defjvp
def _sparse_backward_jvp(opts, primals, tangents):
    z, labels, weights, lse, g = primals
    dz, dg = tangents[0], tangents[4]
    out = _sparse_backward(opts, z, labels, weights, lse, g)
    _, dout = jax.jvp(lambda z, g: _sparse_gradient_composite(opts, z, labels, weights, g), (z, g), (dz, dg))
    return out, dout.astype(out.dtype)


# ---------------------------------------------------------------- the losses


def _handler_platforms():
    return tuple(p for p in _core.ffi_targets() if p in _JAX_PLATFORMS)


def _on_platforms(fused, composite, *operands):
    """fused(*operands) where a handler is registered, composite(*operands) elsewhere."""
    branches = {p: fused for p in _handler_platforms()}
    return jax.lax.platform_dependent(*operands, default=composite, **branches)


def sparse(opts, z, labels, weights):
    return _on_platforms(
        functools.partial(_fused_sparse, opts), functools.partial(_composite.sparse, opts), z, labels, weights
    )


def dense(opts, z, t):
    return _on_platforms(functools.partial(_fused_dense, opts), functools.partial(_composite.dense, opts), z, t)


def _kept_lse(lse):
    """The rows' float64 lse kept for the backward as the uint32 halves of each value (the
    handlers read either): so the residuals lax.platform_dependent joins across its branches
    hold no float64, which a platform without our handlers (TPU) may not have."""
    return jax.lax.bitcast_convert_type(lse, jnp.uint32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sparse(opts, z, labels, weights):
    return _sparse_forward(opts, z, labels, weights)[0]


def _sparse_vjp_forward(opts, z, labels, weights):
    loss, lse = _sparse_forward(opts, z, labels, weights)
    return loss, (z, labels, weights, _kept_lse(lse))


def _sparse_vjp_backward(opts, residuals, g):
    z, labels, weights, lse = residuals
    return _sparse_backward(opts, z, labels, weights, lse, g), None, None


_fused_sparse.defvjp(_sparse_vjp_forward, _sparse_vjp_backward)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _neg_log_softmax(axis, z, lse):
    """lse - z from the kernel's lse (float64; as kept, _kept_lse, recomputed from z); its
    derivative recomputes the softmax from z."""
    acc = _acc(z.dtype)
    row_lse = jax.nn.logsumexp(z.astype(acc), axis) if lse.dtype == jnp.uint32 else lse.astype(acc)
    return jnp.expand_dims(row_lse, axis) - z.astype(acc)


@_neg_log_softmax.defjvp
def _neg_log_softmax_jvp(axis, primals, tangents):
    z, lse = primals
    out = _neg_log_softmax(axis, z, lse)
    _, _, p = _softmax_parts(z, axis)
    dz = tangents[0].astype(p.dtype)
    return out, jnp.sum(p * dz, axis, keepdims=True) - dz


def _dense_label_gradient(opts, z, lse, g, t_dtype):
    """d loss / d t = -(1 - eps) * log_softmax(z), times g."""
    axis, eps, _ = opts
    scale = jnp.expand_dims(g.astype(_acc(z.dtype)) * (1.0 - eps), axis)
    return (scale * _neg_log_softmax(axis, z, lse)).astype(t_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dense_forward(opts, z, t):
    return _forward_ffi("fused_xent_dense_forward", opts, z, t)


@_dense_forward.defjvp
def _dense_forward_jvp(opts, primals, tangents):
    z, t = primals
    dz, dt = tangents
    loss, lse = _dense_forward(opts, z, t)
    ones = jnp.ones_like(loss)
    grad_z = _dense_backward(opts, z, t, lse, ones)
    grad_t = _dense_label_gradient(opts, z, lse, ones, t.dtype)
    dloss = _row_dot(grad_z, dz, opts[0], loss.dtype) + _row_dot(grad_t, dt, opts[0], loss.dtype)
    return (loss, lse), (dloss, jnp.zeros_like(lse))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dense_backward(opts, z, t, lse, g):
    return _backward_ffi("fused_xent_dense_backward", opts, z, t, lse, g)


@_dense_backward.defjvp
def _dense_backward_jvp(opts, primals, tangents):
    z, t, lse, g = primals
    dz, dt, _, dg = tangents
    out = _dense_backward(opts, z, t, lse, g)
    _, dout = jax.jvp(functools.partial(_dense_gradient_composite, opts), (z, t, g), (dz, dt, dg))
    return out, dout.astype(out.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_dense(opts, z, t):
    return _dense_forward(opts, z, t)[0]


def _dense_vjp_forward(opts, z, t):
    loss, lse = _dense_forward(opts, z, t)
    return loss, (z, t, _kept_lse(lse))


def _dense_vjp_backward(opts, residuals, g):
    z, t, lse = residuals
    return _dense_backward(opts, z, t, lse, g), _dense_label_gradient(opts, z, lse, g, t.dtype)


_fused_dense.defvjp(_dense_vjp_forward, _dense_vjp_backward)
