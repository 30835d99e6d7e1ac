"""The ``torch.library`` custom ops behind fused_xent.torch, and their autograd rules.

CPU tensors go to the C++ core without copies (NumPy views of contiguous tensors;
bfloat16 as its raw 16-bit pattern); CUDA tensors go to ``fused_xent.cuda``, on
PyTorch's current stream. On both, the forward op returns the loss and the float64 row
logsumexp (lse, not differentiable) and the backward op reads that lse, so a training step
runs the forward kernel once. The first derivative is the fused backward op; higher ones
differentiate a composite of torch ops for that op's output (exact, not fused; it recomputes
lse from the logits and never differentiates through the lse input).

Every op takes ``softcap`` last (float, 0.0: no cap; its default, so calls that leave it out
keep their meaning): the kernels compute the loss on cap * tanh(z / cap) and the gradient for z.
"""

import math
import threading
from typing import Optional

import numpy as np
import torch

from fused_xent import _checks, _core


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def softcap(value):
    """``_checks.softcap(value)``: the cap the kernels see (0.0 for None), its check and message.
    While torch.compile traces, a valid cap is taken without _checks' NumPy float32 comparison,
    which Dynamo would trace as a tensor (a data-dependent branch); anything else goes to
    _checks, which raises its ValueError."""
    if value is not None and torch.compiler.is_compiling():
        number = _checks.plain_number(value)
        cap = _checks.kernel_float(number) if number is not None and number > 0 else 0.0
        if math.isfinite(cap) and cap >= _FLOAT32_TINY:
            return cap
    return _checks.softcap(value)


# ---------------------------------------------------------------- kernels (CPU: the core; CUDA: fused_xent.cuda)


def _host(t):
    """A NumPy view of a contiguous CPU tensor (bfloat16: its bits; the core reads the dtype by name)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _fresh(shape, dtype):
    """An uninitialised CPU tensor in memory NumPy allocates: it asks the kernel for huge pages
    for large arrays, so a fresh gradient of 100+ MB costs a few hundred page faults, not tens of
    thousands (measured at 1024x32000 float32: forward + backward 59 ms with torch.empty, 18 ms so)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype))


class _GradientBuffer:
    """The last large gradient's memory, handed out again once no tensor uses it.

    Memory fresh from the operating system costs page faults and zeroing on first touch: at
    8192x32000 float32 a training step took 326 ms with a fresh gradient and 176 ms reusing the
    last one's memory (benchmarks/bench_torch_native.py's step). Only the storage is kept, not
    the tensor, so a gradient's tensor stays uniquely owned (autograd may steal it into a
    ``.grad``); the storage is free when this cache is its only owner: no tensor, view or NumPy
    array over it is left. At most one is kept; ``release()`` drops it."""

    MIN_BYTES = 16 << 20

    def __init__(self):
        self._lock = threading.Lock()
        self._storage = None

    def take(self, shape, dtype):
        with self._lock:
            storage = self._storage
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            if storage is not None and storage.nbytes() == size and torch._C._storage_Use_Count(storage._cdata) == 1:
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            t = _fresh(shape, dtype)
            self._storage = t.untyped_storage() if size >= self.MIN_BYTES else self._storage
            return t

    def release(self):
        with self._lock:
            self._storage = None


_gradient_buffer = _GradientBuffer()


def _empty(shape, dtype):
    """A CPU tensor for a gradient: the last large one's memory when it is free, else fresh."""
    return _gradient_buffer.take(tuple(shape), dtype)


def _reduced(shape, axis):
    return tuple(d for i, d in enumerate(shape) if i != axis)


def _host_call(logits, labels, layout, eps, lam, cap):
    """The keywords every CPU binding takes: contiguous tensors as NumPy views, the layout, the
    options (cap: the softcap, 0.0 for none)."""
    outer, classes, inner, _ = layout
    return dict(
        dtype=dtype_name(logits.dtype),
        logits=_host(logits),
        labels=_host(labels),
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=eps,
        z_loss=lam,
        softcap=cap,
    )


def _sparse_options(weights, eps, lam, ignore_index, cap):
    return dict(label_smoothing=eps, z_loss=lam, ignore_index=ignore_index, class_weights=weights, **_cuda_cap(cap))


def _cuda_cap(cap):
    """fused_xent.cuda's keyword for a softcap: passed only when there is one, so that calls
    without a cap are the same as before the option existed."""
    return {"softcap": cap} if cap else {}


def _host_grad_loss(grad_loss, logits, reduced):
    return _host(grad_loss.to(logits.dtype).expand(reduced).contiguous())


def _sparse_forward_kernel(logits, labels, weights, axis, eps, lam, ignore_index, cap):
    """(loss, lse): the loss and the float64 row logsumexp the backward reads."""
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.sparse_forward(labels, logits, axis=axis, **_sparse_options(weights, eps, lam, ignore_index, cap))
    logits, labels = logits.contiguous(), labels.contiguous()
    layout = _checks.layout(tuple(logits.shape), axis)
    reduced = layout[3]
    loss, lse = torch.empty(reduced, dtype=logits.dtype), torch.empty(reduced, dtype=torch.float64)
    _core.sparse_forward(
        **_host_call(logits, labels, layout, eps, lam, cap),
        ignore_index=ignore_index,
        class_weights=None if weights is None else _host(weights.cpu()),
        loss=_host(loss),
        lse=_host(lse),
    )
    return loss, lse


def _sparse_backward_kernel(logits, labels, weights, lse, grad_loss, axis, eps, lam, ignore_index, cap):
    """The gradient of sum(loss * grad_loss) for the logits, from the forward's lse."""
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.sparse_backward(
            labels, logits, lse, grad_loss, axis=axis, **_sparse_options(weights, eps, lam, ignore_index, cap)
        )
    logits, labels = logits.contiguous(), labels.contiguous()
    layout = _checks.layout(tuple(logits.shape), axis)
    reduced = layout[3]
    grad = _empty(tuple(logits.shape), logits.dtype)
    _core.sparse_backward(
        **_host_call(logits, labels, layout, eps, lam, cap),
        ignore_index=ignore_index,
        class_weights=None if weights is None else _host(weights.cpu()),
        lse=_host(lse.contiguous()),
        grad_loss=_host_grad_loss(grad_loss, logits, reduced),
        grad_logits=_host(grad),
    )
    return grad


def _dense_labels(logits, labels):
    return labels.to(logits.dtype).expand(logits.shape).contiguous()


def _dense_forward_kernel(logits, labels, axis, eps, lam, cap):
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.dense_forward(labels, logits, axis=axis, label_smoothing=eps, z_loss=lam, **_cuda_cap(cap))
    logits = logits.contiguous()
    labels = _dense_labels(logits, labels)
    layout = _checks.layout(tuple(logits.shape), axis)
    reduced = layout[3]
    loss, lse = torch.empty(reduced, dtype=logits.dtype), torch.empty(reduced, dtype=torch.float64)
    _core.dense_forward(
        **_host_call(logits, labels, layout, eps, lam, cap),
        loss=_host(loss),
        lse=_host(lse),
    )
    return loss, lse


def _dense_backward_kernel(logits, labels, lse, grad_loss, axis, eps, lam, cap):
    if logits.is_cuda:
        from fused_xent import cuda

        return cuda.dense_backward(
            labels, logits, lse, grad_loss, axis=axis, label_smoothing=eps, z_loss=lam, **_cuda_cap(cap)
        )
    logits = logits.contiguous()
    labels = _dense_labels(logits, labels)
    layout = _checks.layout(tuple(logits.shape), axis)
    reduced = layout[3]
    grad = _empty(tuple(logits.shape), logits.dtype)
    _core.dense_backward(
        **_host_call(logits, labels, layout, eps, lam, cap),
        lse=_host(lse.contiguous()),
        grad_loss=_host_grad_loss(grad_loss, logits, reduced),
        grad_logits=_host(grad),
    )
    return grad


# ---------------------------------------------------------------- the custom ops
# Forward ops return (loss, lse), lse the float64 row logsumexp: not differentiable, it only
# carries the forward's work to the backward ops, which take it as TensorFlow's and JAX's do.


@torch.library.custom_op("fused_xent::sparse_forward", mutates_args=())
def sparse_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    axis: int,
    label_smoothing: float,
    z_loss: float,
    ignore_index: Optional[int],
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _sparse_forward_kernel(logits, labels, weights, axis, label_smoothing, z_loss, ignore_index, softcap)


@torch.library.custom_op("fused_xent::sparse_backward", mutates_args=())
def _sparse_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    axis: int,
    label_smoothing: float,
    z_loss: float,
    ignore_index: Optional[int],
    softcap: float = 0.0,
) -> torch.Tensor:
    return _sparse_backward_kernel(
        logits, labels, weights, lse, grad_loss, axis, label_smoothing, z_loss, ignore_index, softcap
    )


@torch.library.custom_op("fused_xent::dense_forward", mutates_args=())
def dense_forward(
    logits: torch.Tensor, labels: torch.Tensor, axis: int, label_smoothing: float, z_loss: float, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dense_forward_kernel(logits, labels, axis, label_smoothing, z_loss, softcap)


@torch.library.custom_op("fused_xent::dense_backward", mutates_args=())
def _dense_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    axis: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    return _dense_backward_kernel(logits, labels, lse, grad_loss, axis, label_smoothing, z_loss, softcap)


def _fake_forward(logits, axis):
    reduced = _reduced(logits.shape, axis)
    return logits.new_empty(reduced), logits.new_empty(reduced, dtype=torch.float64)


@sparse_forward.register_fake
def _(logits, labels, weights, axis, label_smoothing, z_loss, ignore_index, softcap=0.0):
    return _fake_forward(logits, axis)


@dense_forward.register_fake
def _(logits, labels, axis, label_smoothing, z_loss, softcap=0.0):
    return _fake_forward(logits, axis)


@_sparse_backward.register_fake
def _(logits, labels, weights, lse, grad_loss, axis, label_smoothing, z_loss, ignore_index, softcap=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_dense_backward.register_fake
def _(logits, labels, lse, grad_loss, axis, label_smoothing, z_loss, softcap=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# Composite gradients (dz = g*w*((sum q + 2 lambda lse) p - q), docs/derivation.md): only
# differentiated, for second derivatives; the first is the fused kernel. With a softcap the
# logits x are capped first, z = cap tanh(x / cap), and the gradient is carried back to x by
# the cap's slope 1 - tanh(x / cap)^2, as the kernels do.


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def capped(x, cap):
    """The logits the kernels read: cap * tanh(x / cap), or x itself (cap 0). Call it with x in
    the accumulation dtype."""
    return cap * torch.tanh(x / cap) if cap else x


def cap_slope(x, cap):
    """d capped / dx = 1 - tanh(x / cap)^2 (x in the accumulation dtype; cap > 0)."""
    tanh = torch.tanh(x / cap)
    return 1.0 - tanh * tanh


def _times_slope(gradient, x, cap):
    """A gradient for the capped logits carried back to the logits x."""
    return gradient * cap_slope(x, cap) if cap else gradient


def _sparse_gradient_composite(x, labels, weights, g, axis, eps, lam, ignore_index, cap):
    x = x.to(_acc(x.dtype))
    z = capped(x, cap)
    lse = torch.logsumexp(z, axis, keepdim=True)
    p = torch.exp(z - lse)
    classes = z.shape[axis]
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, 0).long()
    q = torch.zeros_like(z).scatter_(axis, safe.unsqueeze(axis), 1.0) * (1.0 - eps) + eps / classes
    w = weights[safe].to(z.dtype) if weights is not None else torch.ones_like(safe, dtype=z.dtype)
    scale = (g.to(z.dtype) * torch.where(valid, w, 0.0)).unsqueeze(axis)
    return _times_slope(scale * ((1.0 + 2.0 * lam * lse) * p - q), x, cap)


def _dense_gradient_composite(x, t, g, axis, eps, lam, cap):
    x = x.to(_acc(x.dtype))
    z = capped(x, cap)
    lse = torch.logsumexp(z, axis, keepdim=True)
    p = torch.exp(z - lse)
    q = (1.0 - eps) * t.to(z.dtype) + eps / z.shape[axis]
    a = q.sum(axis, keepdim=True) + 2.0 * lam * lse
    return _times_slope(g.to(z.dtype).unsqueeze(axis) * (a * p - q), x, cap)


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


def _with_softcap(options, count):
    """The op's static options, the softcap last: a call that leaves it out (its default) has none."""
    options = tuple(options)
    return options + (0.0,) * (count - len(options))


# sparse: loss -> fused backward op (on the forward's lse); its own backward -> the composite,
# which recomputes lse from the logits (the lse input gets no gradient).


def _sparse_forward_setup(ctx, inputs, output):
    logits, labels, weights, *options = inputs
    lse = output[1]
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, weights, lse)
    ctx.options = _with_softcap(options, 5)


def _sparse_forward_grad(ctx, grad, _lse_grad):  # lse is not differentiable: _lse_grad is unused
    logits, labels, weights, lse = ctx.saved_tensors
    grad_logits = _sparse_backward(logits, labels, weights, lse, grad.contiguous(), *ctx.options)
    return (grad_logits,) + (None,) * 7


def _sparse_backward_setup(ctx, inputs, output):
    logits, labels, weights, _lse, grad_loss, *options = inputs
    ctx.save_for_backward(logits, labels, weights, grad_loss)
    ctx.options = _with_softcap(options, 5)


def _sparse_backward_grad(ctx, cotangent):
    logits, labels, weights, grad_loss = ctx.saved_tensors
    axis, eps, lam, ignore_index, cap = ctx.options
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[4])
    d_logits, d_grad_loss = _composite_vjp(
        lambda z, g: _sparse_gradient_composite(z, labels, weights, g, axis, eps, lam, ignore_index, cap),
        (logits, grad_loss),
        wanted,
        cotangent,
    )
    return (_cast(d_logits, logits), None, None, None, _cast(d_grad_loss, grad_loss)) + (None,) * 5


sparse_forward.register_autograd(_sparse_forward_grad, setup_context=_sparse_forward_setup)
_sparse_backward.register_autograd(_sparse_backward_grad, setup_context=_sparse_backward_setup)


# dense: as sparse for the logits; the labels' gradient g * (1 - eps) * (lse - z) with torch ops
# (log_softmax of the (capped) logits, so that it is differentiable in turn).


def _dense_label_gradient(logits, labels, grad, axis, eps, cap):
    neg_log_p = -torch.log_softmax(capped(logits.to(_acc(logits.dtype)), cap), axis)
    return ((grad.to(neg_log_p.dtype) * (1.0 - eps)).unsqueeze(axis) * neg_log_p).to(labels.dtype)


def _dense_forward_setup(ctx, inputs, output):
    logits, labels, *options = inputs
    lse = output[1]
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.options = _with_softcap(options, 4)


def _dense_forward_grad(ctx, grad, _lse_grad):
    logits, labels, lse = ctx.saved_tensors
    axis, eps, lam, cap = ctx.options
    grad_logits = grad_labels = None
    if ctx.needs_input_grad[0]:
        grad_logits = _dense_backward(logits, labels, lse, grad.contiguous(), axis, eps, lam, cap)
    if ctx.needs_input_grad[1]:
        grad_labels = _dense_label_gradient(logits, labels, grad, axis, eps, cap)
    return grad_logits, grad_labels, None, None, None, None


def _dense_backward_setup(ctx, inputs, output):
    logits, labels, _lse, grad_loss, *options = inputs
    ctx.save_for_backward(logits, labels, grad_loss)
    ctx.options = _with_softcap(options, 4)


def _dense_backward_grad(ctx, cotangent):
    logits, labels, grad_loss = ctx.saved_tensors
    axis, eps, lam, cap = ctx.options
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    d_z, d_t, d_g = _composite_vjp(
        lambda z, t, g: _dense_gradient_composite(z, t, g, axis, eps, lam, cap),
        (logits, labels, grad_loss),
        wanted,
        cotangent,
    )
    return _cast(d_z, logits), _cast(d_t, labels), None, _cast(d_g, grad_loss), None, None, None, None


dense_forward.register_autograd(_dense_forward_grad, setup_context=_dense_forward_setup)
_dense_backward.register_autograd(_dense_backward_grad, setup_context=_dense_backward_setup)
