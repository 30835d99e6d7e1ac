"""The fused kernels in PyTorch: ``torch.library`` custom ops with registered autograd.

``sparse_softmax_cross_entropy_with_logits`` and ``softmax_cross_entropy_with_logits``
take the arguments of the TensorFlow functions of the same names and return the
per-example loss. They work eagerly, under ``torch.autograd`` and under
``torch.compile`` (the ops have fake implementations, so they stay whole in the
graph). CPU tensors go to the C++ core without copies (NumPy views of contiguous
tensors; bfloat16 as its raw 16-bit pattern); CUDA tensors go to
``fused_xent.cuda`` in builds with CUDA, on PyTorch's current stream.

The first derivative with respect to the logits is the fused backward kernel
(op ``fused_xent::sparse_backward`` / ``fused_xent::dense_backward``, which
recomputes the row's logsumexp rather than keeping it). Higher derivatives
(``create_graph=True``: Hessians, gradient penalties) differentiate a composite
of torch ops for that gradient: exact, but not fused. The gradient with respect
to dense labels is ``g * (1 - eps) * (logsumexp(z) - z)``, computed with torch ops.

A label outside ``[0, C)`` that is not ``ignore_index`` raises ``ValueError``
on the CPU; on a GPU it gives NaN for its row. Gradients with respect to
``class_weights`` are not computed (they are constants).
"""

import numbers
from typing import Optional

import numpy as np
import torch

from fused_xent import _core
from fused_xent._arguments import check_axis, check_smoothing, check_sparse_shapes, check_weight_values, check_z_loss
from fused_xent.numpy import _checked_ignore_index, _layout

__all__ = ["softmax_cross_entropy_with_logits", "sparse_softmax_cross_entropy_with_logits"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _name(dtype):
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- arguments (messages as in _ops.py)


def _float_logits(logits):
    logits = torch.as_tensor(logits)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {_name(logits.dtype)}")
    if logits.ndim == 0:
        raise ValueError(f"`logits` cannot be a scalar. Received logits={logits}")
    return logits


def _check_smoothing(label_smoothing):
    return float(np.float32(check_smoothing(label_smoothing)))  # what the kernel sees


def _check_z_loss(z_loss):
    return float(np.float32(check_z_loss(z_loss)))


def _normalized_axis(axis, rank):
    return check_axis(axis, rank) % rank


def _class_weights(class_weights, classes, device):
    if class_weights is None:
        return None
    dtype = getattr(class_weights, "dtype", None)
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise TypeError(f"class_weights must be floating point, got {_name(dtype)}")
    if dtype is not None and not isinstance(dtype, torch.dtype) and not np.issubdtype(dtype, np.floating):
        raise TypeError(f"class_weights must be floating point, got {np.dtype(dtype).name}")
    try:
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"class_weights must be a vector of floats: {error}") from None
    if weights.ndim != 1:
        raise ValueError(f"class_weights must be a vector (one weight per class), got shape {tuple(weights.shape)}")
    if weights.shape[0] != classes:
        raise ValueError(f"class_weights has {weights.shape[0]} entries but logits have {classes} classes")
    if not torch.compiler.is_compiling():  # traced values are checked by the CPU kernels
        check_weight_values(weights.detach().cpu().numpy())
    return weights.detach().contiguous()


# ---------------------------------------------------------------- kernels (CPU: the core; CUDA: fused_xent.cuda)


def _host(t):
    """A NumPy view of a contiguous CPU tensor (bfloat16: its bits; the core reads the dtype by name)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _empty(shape, dtype):
    """An uninitialised CPU tensor in memory NumPy allocates: it asks the kernel for huge pages
    for large arrays, so a fresh gradient of 100+ MB costs a few hundred page faults, not tens of
    thousands (measured at 1024x32000 float32: forward + backward 59 ms with torch.empty, 18 ms so)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype))


def _reduced(shape, axis):
    return tuple(d for i, d in enumerate(shape) if i != axis)


def _sparse_kernel(logits, labels, weights, axis, eps, lam, ignore_index, grad_loss):
    """(loss, grad_logits or None): the forward, or with grad_loss the backward (which recomputes the forward)."""
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.sparse_softmax_cross_entropy_with_logits(
            labels, logits, axis=axis, ignore_index=ignore_index, label_smoothing=eps, class_weights=weights,
            z_loss=lam, grad_loss=grad_loss, compute_gradient=grad_loss is not None,
        )
    logits, labels = logits.contiguous(), labels.contiguous()
    outer, classes, inner, reduced = _layout(tuple(logits.shape), axis)
    loss = torch.empty(reduced, dtype=logits.dtype)
    grad = None if grad_loss is None else _empty(tuple(logits.shape), logits.dtype)
    g = None if grad_loss is None else _host(grad_loss.to(logits.dtype).expand(reduced).contiguous())
    _core.sparse(
        _name(logits.dtype), _host(logits), _host(labels), outer, classes, inner, eps, lam, ignore_index,
        None if weights is None else _host(weights.cpu()), _host(loss), np.empty(reduced, np.float64),
        g, None if grad is None else _host(grad),
    )
    return loss, grad


def _dense_kernel(logits, labels, axis, eps, lam, grad_loss):
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.softmax_cross_entropy_with_logits(
            labels, logits, axis=axis, label_smoothing=eps, z_loss=lam, grad_loss=grad_loss,
            compute_gradient=grad_loss is not None,
        )
    logits = logits.contiguous()
    labels = labels.to(logits.dtype).expand(logits.shape).contiguous()
    outer, classes, inner, reduced = _layout(tuple(logits.shape), axis)
    loss = torch.empty(reduced, dtype=logits.dtype)
    grad = None if grad_loss is None else _empty(tuple(logits.shape), logits.dtype)
    g = None if grad_loss is None else _host(grad_loss.to(logits.dtype).expand(reduced).contiguous())
    _core.dense(
        _name(logits.dtype), _host(logits), _host(labels), outer, classes, inner, eps, lam,
        _host(loss), np.empty(reduced, np.float64), g, None if grad is None else _host(grad),
    )
    return loss, grad


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("fused_xent::sparse_forward", mutates_args=())
def _sparse_forward(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor],
    axis: int, label_smoothing: float, z_loss: float, ignore_index: Optional[int],
) -> torch.Tensor:
    return _sparse_kernel(logits, labels, weights, axis, label_smoothing, z_loss, ignore_index, None)[0]


@torch.library.custom_op("fused_xent::sparse_backward", mutates_args=())
def _sparse_backward(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], grad_loss: torch.Tensor,
    axis: int, label_smoothing: float, z_loss: float, ignore_index: Optional[int],
) -> torch.Tensor:
    return _sparse_kernel(logits, labels, weights, axis, label_smoothing, z_loss, ignore_index, grad_loss)[1]


@torch.library.custom_op("fused_xent::dense_forward", mutates_args=())
def _dense_forward(
    logits: torch.Tensor, labels: torch.Tensor, axis: int, label_smoothing: float, z_loss: float
) -> torch.Tensor:
    return _dense_kernel(logits, labels, axis, label_smoothing, z_loss, None)[0]


@torch.library.custom_op("fused_xent::dense_backward", mutates_args=())
def _dense_backward(
    logits: torch.Tensor, labels: torch.Tensor, grad_loss: torch.Tensor, axis: int, label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    return _dense_kernel(logits, labels, axis, label_smoothing, z_loss, grad_loss)[1]


@_sparse_forward.register_fake
def _(logits, labels, weights, axis, label_smoothing, z_loss, ignore_index):
    return logits.new_empty(_reduced(logits.shape, axis))


@_dense_forward.register_fake
def _(logits, labels, axis, label_smoothing, z_loss):
    return logits.new_empty(_reduced(logits.shape, axis))


@_sparse_backward.register_fake
def _(logits, labels, weights, grad_loss, axis, label_smoothing, z_loss, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_dense_backward.register_fake
def _(logits, labels, grad_loss, axis, label_smoothing, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# Composite gradients (dz = g*w*((sum q + 2 lambda lse) p - q), docs/derivation.md): only
# differentiated, for second derivatives; the first is the fused kernel.


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sparse_gradient_composite(z, labels, weights, g, axis, eps, lam, ignore_index):
    z = z.to(_acc(z.dtype))
    lse = torch.logsumexp(z, axis, keepdim=True)
    p = torch.exp(z - lse)
    classes = z.shape[axis]
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, 0).long()
    q = torch.zeros_like(z).scatter_(axis, safe.unsqueeze(axis), 1.0) * (1.0 - eps) + eps / classes
    w = weights[safe].to(z.dtype) if weights is not None else torch.ones_like(safe, dtype=z.dtype)
    scale = (g.to(z.dtype) * torch.where(valid, w, 0.0)).unsqueeze(axis)
    return scale * ((1.0 + 2.0 * lam * lse) * p - q)


def _dense_gradient_composite(z, t, g, axis, eps, lam):
    z = z.to(_acc(z.dtype))
    lse = torch.logsumexp(z, axis, keepdim=True)
    p = torch.exp(z - lse)
    q = (1.0 - eps) * t.to(z.dtype) + eps / z.shape[axis]
    a = q.sum(axis, keepdim=True) + 2.0 * lam * lse
    return g.to(z.dtype).unsqueeze(axis) * (a * p - q)


def _composite_vjp(composite, primals, wanted, cotangent):
    """Gradients of <cotangent, composite(*primals)> for primals[i] with wanted[i]; differentiable
    in turn when the outer backward builds a graph (create_graph=True)."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [p if (create and p.requires_grad) else p.detach().requires_grad_(w) for p, w in zip(primals, wanted)]
        out = composite(*inputs)
        targets = [x for x, w in zip(inputs, wanted) if w]
        grads = iter(torch.autograd.grad(out, targets, cotangent.to(out.dtype), create_graph=create, allow_unused=True))
    return [next(grads) if w else None for w in wanted]


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


# sparse: loss -> fused backward op; its own backward -> the composite.


def _sparse_forward_setup(ctx, inputs, output):
    logits, labels, weights, axis, eps, lam, ignore_index = inputs
    ctx.save_for_backward(logits, labels, weights)
    ctx.options = (axis, eps, lam, ignore_index)


def _sparse_forward_grad(ctx, grad):
    logits, labels, weights = ctx.saved_tensors
    grad_logits = _sparse_backward(logits, labels, weights, grad.contiguous(), *ctx.options)
    return grad_logits, None, None, None, None, None, None


def _sparse_backward_setup(ctx, inputs, output):
    logits, labels, weights, grad_loss, *options = inputs
    ctx.save_for_backward(logits, labels, weights, grad_loss)
    ctx.options = tuple(options)


def _sparse_backward_grad(ctx, cotangent):
    logits, labels, weights, grad_loss = ctx.saved_tensors
    axis, eps, lam, ignore_index = ctx.options
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    d_logits, d_grad_loss = _composite_vjp(
        lambda z, g: _sparse_gradient_composite(z, labels, weights, g, axis, eps, lam, ignore_index),
        (logits, grad_loss), wanted, cotangent,
    )
    return _cast(d_logits, logits), None, None, _cast(d_grad_loss, grad_loss), None, None, None, None


_sparse_forward.register_autograd(_sparse_forward_grad, setup_context=_sparse_forward_setup)
_sparse_backward.register_autograd(_sparse_backward_grad, setup_context=_sparse_backward_setup)


# dense: as sparse for the logits; the labels' gradient g * (1 - eps) * (lse - z) with torch ops.


def _dense_label_gradient(logits, labels, grad, axis, eps):
    neg_log_p = -torch.log_softmax(logits.to(_acc(logits.dtype)), axis)
    return ((grad.to(neg_log_p.dtype) * (1.0 - eps)).unsqueeze(axis) * neg_log_p).to(labels.dtype)


def _dense_forward_setup(ctx, inputs, output):
    logits, labels, axis, eps, lam = inputs
    ctx.save_for_backward(logits, labels)
    ctx.options = (axis, eps, lam)


def _dense_forward_grad(ctx, grad):
    logits, labels = ctx.saved_tensors
    axis, eps, lam = ctx.options
    grad_logits = grad_labels = None
    if ctx.needs_input_grad[0]:
        grad_logits = _dense_backward(logits, labels, grad.contiguous(), axis, eps, lam)
    if ctx.needs_input_grad[1]:
        grad_labels = _dense_label_gradient(logits, labels, grad, axis, eps)
    return grad_logits, grad_labels, None, None, None


def _dense_backward_setup(ctx, inputs, output):
    logits, labels, grad_loss, *options = inputs
    ctx.save_for_backward(logits, labels, grad_loss)
    ctx.options = tuple(options)


def _dense_backward_grad(ctx, cotangent):
    logits, labels, grad_loss = ctx.saved_tensors
    axis, eps, lam = ctx.options
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    d_z, d_t, d_g = _composite_vjp(
        lambda z, t, g: _dense_gradient_composite(z, t, g, axis, eps, lam),
        (logits, labels, grad_loss), wanted, cotangent,
    )
    return _cast(d_z, logits), _cast(d_t, labels), _cast(d_g, grad_loss), None, None, None


_dense_forward.register_autograd(_dense_forward_grad, setup_context=_dense_forward_setup)
_dense_backward.register_autograd(_dense_backward_grad, setup_context=_dense_backward_setup)


# ---------------------------------------------------------------- public functions


def sparse_softmax_cross_entropy_with_logits(
    labels, logits, *, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0, axis=-1
):
    """Per-example softmax cross-entropy with integer class labels, fused.

    The PyTorch twin of ``fused_xent.sparse_softmax_cross_entropy_with_logits``:
    the same arguments (labels int32/int64 shaped like ``logits`` without
    ``axis``; ``ignore_index``, ``label_smoothing``, ``class_weights``,
    ``z_loss``) and the same values. Returns the loss, shaped like ``labels``,
    in the logits' dtype, on their device.
    """
    logits = _float_logits(logits)
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64 class indices, got {_name(labels.dtype)}")
    axis = _normalized_axis(axis, logits.ndim)
    check_sparse_shapes(labels.shape, logits.shape, axis)
    weights = _class_weights(class_weights, logits.shape[axis], logits.device)
    smoothing, z_loss = _check_smoothing(label_smoothing), _check_z_loss(z_loss)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    ignore_index = _checked_ignore_index(ignore_index, np.dtype(_name(labels.dtype)))
    return _sparse_forward(logits, labels, weights, axis, smoothing, z_loss, ignore_index)


def softmax_cross_entropy_with_logits(labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0):
    """Per-example softmax cross-entropy with a distribution as labels, fused.

    The PyTorch twin of ``fused_xent.softmax_cross_entropy_with_logits``:
    ``labels`` are cast to the logits' dtype and broadcast to their shape; the
    gradient flows to both ``logits`` and ``labels``.
    """
    logits = _float_logits(logits)
    axis = _normalized_axis(axis, logits.ndim)
    labels = torch.as_tensor(labels, device=logits.device).to(logits.dtype)
    if labels.shape != logits.shape:
        try:
            broadcast = torch.broadcast_shapes(labels.shape, logits.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != logits.shape:
            raise ValueError(
                f"logits and labels must be broadcastable: logits_size={list(logits.shape)} "
                f"labels_size={list(labels.shape)}"
            )
        labels = labels.expand(logits.shape)
    smoothing, z_loss = _check_smoothing(label_smoothing), _check_z_loss(z_loss)
    return _dense_forward(logits, labels, axis, smoothing, z_loss)
