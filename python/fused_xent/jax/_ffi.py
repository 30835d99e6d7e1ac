"""The XLA FFI calls behind fused_xent.jax, and their derivative rules.

``sparse(opts, logits, labels, weights)`` and ``dense(opts, logits, labels)`` give the
per-example loss; their first derivative is the fused backward kernel (a ``jax.custom_jvp``
whose tangent primitive transposes into it), higher ones differentiate a composite of
jax.numpy ops for that kernel's output (exact, not fused). The forward keeps each row's logsumexp in float64
for the backward: an internal value, so ``jax_enable_x64`` may stay off.
"""

import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

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
# sparse: (axis, label_smoothing, z_loss, ignore_index or None, softcap);
# dense: (axis, label_smoothing, z_loss, softcap); a vocabulary-parallel shard's call
# (jax/_vocab_parallel.py) has total_classes (dense) or (total_classes, absent_label) (sparse)
# before softcap. axis is negative; the floats are what the kernel sees (float32; softcap 0: none).


def _attrs(name, opts):
    attrs = dict(
        axis=np.int64(opts[0]),
        label_smoothing=np.float32(opts[1]),
        z_loss=np.float32(opts[2]),
        softcap=np.float32(opts[-1]),
    )
    shard = name.endswith("_shard")
    if name.startswith("fused_xent_dense"):
        if shard:
            attrs.update(total_classes=np.int64(opts[3]))
        return attrs
    attrs.update(ignore_index=np.int64(0 if opts[3] is None else opts[3]), has_ignore_index=opts[3] is not None)
    if shard:
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
    """The backward handler; aliases={0: 0} writes the gradient over z's buffer (where z is a
    temporary nothing reads afterwards, as the copy of an uneven class shard's valid columns)."""
    out = jax.ShapeDtypeStruct(z.shape, z.dtype)
    call = jax.ffi.ffi_call(
        name, (out, _workspace(name, z, opts[0])), vmap_method="sequential", input_output_aliases=aliases
    )
    return call(z, *operands, **_attrs(name, opts))[0]


def _run_backward_over_logits(name, opts, z, *operands, aliases=None):
    return _run_backward(name, opts, z, *operands, aliases={0: 0})


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _softmax_parts(z, axis):
    z = z.astype(_acc(z.dtype))
    lse = jax.nn.logsumexp(z, axis=axis, keepdims=True)
    return z, lse, jnp.exp(z - lse)


# Composite gradients (dz = g*w*((sum q + 2 lambda lse) p - q), docs/derivation.md): only
# differentiated, for the second derivative; the first is the fused kernel.


def _sparse_gradient_composite(opts, x, labels, weights, g):
    axis, eps, lam, ignore_index, cap = opts
    z, lse, p = _softmax_parts(_composite.capped(x, cap), axis)
    acc = z.dtype
    classes = z.shape[axis]
    valid = labels != ignore_index if ignore_index is not None else jnp.ones(labels.shape, bool)
    safe = jnp.where(valid, labels, 0)
    q = (1.0 - eps) * jax.nn.one_hot(safe, classes, axis=axis, dtype=acc) + eps / classes
    w = weights[safe].astype(acc) if weights.shape[0] else jnp.ones(labels.shape, acc)
    scale = jnp.expand_dims(g.astype(acc) * jnp.where(valid, w, 0.0), axis)
    return _times_slope(scale * ((1.0 + 2.0 * lam * lse) * p - q), x, cap)


def _dense_gradient_composite(opts, x, t, g):
    axis, eps, lam, cap = opts
    z, lse, p = _softmax_parts(_composite.capped(x, cap), axis)
    q = (1.0 - eps) * t.astype(z.dtype) + eps / z.shape[axis]
    a = jnp.sum(q, axis, keepdims=True) + 2.0 * lam * lse
    return _times_slope(jnp.expand_dims(g.astype(z.dtype), axis) * (a * p - q), x, cap)


def _times_slope(gradient, x, cap):
    """The gradient for the capped logits carried back to the logits x."""
    return gradient * _composite.cap_slope(x, cap) if cap else gradient


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


# ---------------------------------------------------------------- the losses' derivative
#
# The losses are custom_jvp functions whose tangent is _LOSS_TANGENT, a primitive linear in the
# tangent it is given: evaluated (forward mode), the row dot of the fused gradient with that
# tangent; transposed (reverse mode), the fused backward kernel with the cotangent as the
# upstream gradient. So jit(grad) runs the same two kernels a custom_vjp would (the forward
# keeps z and its lse; no extra pass over the logits), and jax.jvp, jacfwd and
# forward-over-reverse work too.

_LOSS_TANGENT = Primitive("fused_xent_loss_tangent")


def _gradient(kind, opts, residuals, g):
    """The gradient of sum(loss * g) for the logits (or, kind "dense_labels", the dense labels)."""
    if kind == "sparse":
        return _sparse_backward(opts, *residuals, g)
    z, t, lse = residuals
    if kind == "dense":
        return _dense_backward(opts, z, t, lse, g)
    return _dense_label_gradient(opts, z, lse, g, t.dtype)


def _tangent_value(dx, *residuals, kind, opts):
    z = residuals[0]
    ones = jnp.ones(_rows(z, opts[0]).shape, z.dtype)
    return _row_dot(_gradient(kind, opts, residuals, ones), dx, opts[0], z.dtype)


def _tangent_abstract(dx, *residuals, kind, opts):
    z = residuals[0]
    return jax.core.ShapedArray(_rows(z, opts[0]).shape, z.dtype)


def _tangent_transpose(ct, dx, *residuals, kind, opts):
    if type(ct) is ad.Zero:
        return [ad.Zero(dx.aval), *([None] * len(residuals))]
    return [_gradient(kind, opts, residuals, ct.astype(residuals[0].dtype)), *([None] * len(residuals))]


def _tangent_jvp(primals, tangents, *, kind, opts):
    """Second order (jacfwd of jacfwd, forward over forward): the fused gradient's derivative along
    the tangents of z (and of dense labels) comes from its own custom_jvp, a composite. The
    tangents of class weights and of the internal lse are ignored, as in the first derivative."""
    dx, *residuals = primals
    out = _LOSS_TANGENT.bind(dx, *residuals, kind=kind, opts=opts)
    d_out = jnp.zeros_like(out)
    if type(tangents[0]) is not ad.Zero:
        d_out = d_out + _LOSS_TANGENT.bind(tangents[0], *residuals, kind=kind, opts=opts)
    varying = (0,) if kind == "sparse" else (0, 1)  # residual positions: z, and dense labels
    moving = [i for i in varying if type(tangents[1 + i]) is not ad.Zero]
    if moving:

        def value(*moved):
            current = list(residuals)
            for i, x in zip(moving, moved):
                current[i] = x
            return _tangent_value(dx, *current, kind=kind, opts=opts)

        d_out = d_out + jax.jvp(value, tuple(residuals[i] for i in moving), tuple(tangents[1 + i] for i in moving))[1]
    return out, d_out


def _tangent_batch(args, dims, *, kind, opts):
    """vmap: a batch axis is one more row axis (opts' axis counts from the end); class weights
    that differ per element take one call per element."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def leading(a, d):
        return jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)

    weights_index = 3 if kind == "sparse" else None
    if weights_index is not None and dims[weights_index] is not None:
        stacked = [leading(a, d) for a, d in zip(args, dims)]
        return jax.lax.map(lambda ops: _LOSS_TANGENT.bind(*ops, kind=kind, opts=opts), stacked), 0
    moved = [a if i == weights_index else leading(a, d) for i, (a, d) in enumerate(zip(args, dims))]
    return _LOSS_TANGENT.bind(*moved, kind=kind, opts=opts), 0


_LOSS_TANGENT.def_abstract_eval(_tangent_abstract)
_LOSS_TANGENT.def_impl(functools.partial(jax.jit, static_argnames=("kind", "opts"))(_tangent_value))
mlir.register_lowering(_LOSS_TANGENT, mlir.lower_fun(_tangent_value, multiple_results=False))
ad.primitive_transposes[_LOSS_TANGENT] = _tangent_transpose
ad.primitive_jvps[_LOSS_TANGENT] = _tangent_jvp
batching.primitive_batchers[_LOSS_TANGENT] = _tangent_batch


def _is_zero(tangent):
    return type(tangent) is SymbolicZero


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused_sparse(opts, z, labels, weights):
    return _sparse_forward(opts, z, labels, weights)[0]


def _fused_sparse_jvp(opts, primals, tangents):
    z, labels, weights = primals
    loss, lse = _sparse_forward(opts, z, labels, weights)
    if _is_zero(tangents[0]):
        return loss, jnp.zeros_like(loss)
    residuals = (z, labels, weights, _kept_lse(lse))
    return loss, _LOSS_TANGENT.bind(tangents[0], *residuals, kind="sparse", opts=opts)


_fused_sparse.defjvp(_fused_sparse_jvp, symbolic_zeros=True)


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
    """d loss / d t = -(1 - eps) * log_softmax(z), times g (z capped, if a cap is set)."""
    axis, eps, _, cap = opts
    scale = jnp.expand_dims(g.astype(_acc(z.dtype)) * (1.0 - eps), axis)
    return (scale * _neg_log_softmax(axis, _composite.capped(z, cap), lse)).astype(t_dtype)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused_dense(opts, z, t):
    return _dense_forward(opts, z, t)[0]


def _fused_dense_jvp(opts, primals, tangents):
    z, t = primals
    loss, lse = _dense_forward(opts, z, t)
    residuals = (z, t, _kept_lse(lse))
    out = jnp.zeros_like(loss)
    for kind, tangent in (("dense", tangents[0]), ("dense_labels", tangents[1])):
        if not _is_zero(tangent):
            out = out + _LOSS_TANGENT.bind(tangent, *residuals, kind=kind, opts=opts)
    return loss, out


_fused_dense.defjvp(_fused_dense_jvp, symbolic_zeros=True)
