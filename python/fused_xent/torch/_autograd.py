"""Derivatives of the fused losses in every mode PyTorch has: reverse (autograd, torch.func.grad,
jacrev), forward (torch.autograd.forward_ad, torch.func.jvp, jacfwd), and their compositions.

Two ``torch.autograd.Function`` pairs wrap the custom ops. The loss's first derivative is the
fused backward op (``SparseGrad``/``DenseGrad``); that op's own derivatives, in either mode, are
the closed forms below (docs/derivation.md), written with torch ops on a logsumexp recomputed from
the logits, so PyTorch differentiates them further by itself. With s the row's upstream gradient
times its class weight, p = softmax(z), q the (smoothed) target and a = sum(q) + 2 lambda lse:

    dz          = s (a p - q)                                   (the fused backward op)
    H v         = s a (p * v) + s (2 lambda - a) (p . v) p      (Hessian of the loss along v)
    d dz / d s  = a p - q

The Hessian is symmetric, so H v is both the backward op's vector-Jacobian and Jacobian-vector
product in the logits.

With a softcap the loss reads the capped logits c = cap tanh(x / cap) of the logits x. With
sl = dc/dx = 1 - tanh^2, sl' = d sl / dx = -2 tanh sl / cap and g_c the gradient for c above
(softmax of c, lse of c), the fused op returns dx = sl g_c, and its derivatives are

    H_x v = sl H_c (sl v) + sl' g_c v                           (still symmetric)

with the products in (sl v) for the rows' and labels' terms: the closed forms above run on c
and on vectors carried into c's space by sl, and their result is carried back (_Cap). g_c is
computed from c, never as dx / sl (sl underflows for logits far beyond the cap).
"""

import torch

from fused_xent.torch import _ops


class Options:
    """The static options of a call, as the ops take them (axis, label_smoothing, z_loss[,
    ignore_index], softcap; softcap 0.0: none): one object, not a tuple, so that torch.func sees
    one non-tensor input rather than a pytree of them."""

    __slots__ = ("values",)

    def __init__(self, *values):
        self.values = values

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, index):
        return self.values[index]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_parts(z, axis):
    z = z.to(_acc(z.dtype))
    lse = torch.logsumexp(z, axis, keepdim=True)
    return z, lse, torch.exp(z - lse)


def _row_dot(a, b, axis):
    return (a * b.to(a.dtype)).sum(axis, keepdim=True)


def _sparse_parts(z, labels, weights, axis, eps, ignore_index):
    """(valid-row weights w, smoothed one-hot q) in z's (accumulation) dtype."""
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, 0).long()
    q = torch.zeros_like(z).scatter_(axis, safe.unsqueeze(axis), 1.0) * (1.0 - eps) + eps / z.shape[axis]
    w = weights[safe].to(z.dtype) if weights is not None else torch.ones_like(safe, dtype=z.dtype)
    return torch.where(valid, w, 0.0).unsqueeze(axis), q


def _hessian_product(s, a, lam, p, v, axis):
    return s * a * p * v + s * (2.0 * lam - a) * _row_dot(p, v, axis) * p


class _Cap:
    """The chain rule through the softcap c = cap tanh(x / cap), in the accumulation dtype:
    ``into`` carries a vector of the logits' space into c's (times sl), ``out_of`` carries a
    product computed in c's space back and adds the curvature term sl' g_c v. Without a cap
    both are the identity and c is x."""

    def __init__(self, x, cap):
        self.cap = cap
        self.capped = _ops.capped(x, cap)
        if cap:
            tanh = torch.tanh(x / cap)
            self.slope = 1.0 - tanh * tanh
            self.curvature = -2.0 * tanh * self.slope / cap

    def into(self, v):
        return v * self.slope if self.cap else v

    def out_of(self, product, gradient, v):
        """sl * product + sl' * gradient() * v; gradient: a function giving g_c (called only with a cap)."""
        return self.slope * product + self.curvature * gradient() * v if self.cap else product


def _refuse_nested_forward_mode():
    """A forward-mode transform around another one would see the tangents computed here as
    constants (torch.func keeps the tensors a Function saves at their own level) and get a wrong
    derivative: refused. Any number of reverse-mode transforms with at most one forward-mode
    transform among them is exact."""
    try:
        from torch._C._functorch import TransformType, get_interpreter_stack
    except ImportError:  # pragma: no cover  (older PyTorch: nothing to inspect)
        return
    forward_levels = sum(i.key() == TransformType.Jvp for i in (get_interpreter_stack() or []))
    if forward_levels > 1:
        raise NotImplementedError(
            "fused_xent.torch: forward mode over forward mode (e.g. jacfwd(jacfwd(f)) or torch.func.jvp of a "
            "jvp) is not supported; use reverse mode for all but one of them (jacfwd(jacrev(f)), "
            "torch.func.hessian, jacrev(jacfwd(f))): any number of reverse-mode transforms with at most one "
            "forward-mode transform is exact"
        )


def _refuse_dtensor(logits, what):
    """The second-order formulas below are torch ops on whole rows; on DTensors (which the first
    derivatives support, python/fused_xent/torch/_dtensor.py) they would mix plain tensors and
    DTensors. Refused with a clear error rather than DTensor's."""
    if any(cls.__name__ == "DTensor" for cls in type(logits).__mro__):
        raise NotImplementedError(
            f"fused_xent.torch: {what} on DTensor logits is not supported (the loss and its first "
            "derivative are); compute it on the local or full tensors"
        )


def _placed_like(grad, tensor):
    """A DTensor gradient laid out as its input (the labels' gradient follows the logits' placements)."""
    placements = getattr(tensor, "placements", None)
    if placements is None or getattr(grad, "placements", placements) == placements:
        return grad
    return grad.redistribute(tensor.device_mesh, placements)


def _zero_if_none(tangent, like):
    return torch.zeros_like(like) if tangent is None else tangent


# ---------------------------------------------------------------- sparse labels


class SparseLoss(torch.autograd.Function):
    """(loss, lse) of the fused forward op; lse is internal and not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, weights, options):
        return _ops.sparse_forward(logits, labels, weights, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, weights, options = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, labels, weights, output[1])
        ctx.save_for_forward(logits, labels, weights, output[1])
        ctx.options = options

    @staticmethod
    def backward(ctx, grad, _lse_grad):
        logits, labels, weights, lse = ctx.saved_tensors
        return SparseGrad.apply(logits, labels, weights, lse, grad, ctx.options), None, None, None

    @staticmethod
    def jvp(ctx, d_logits, _d_labels, _d_weights, _d_options):
        _refuse_nested_forward_mode()
        logits, labels, weights, lse = ctx.saved_tensors
        _refuse_dtensor(logits, "forward-mode differentiation")
        if d_logits is None:
            return torch.zeros(lse.shape, dtype=logits.dtype, device=logits.device), None
        ones = torch.ones(lse.shape, dtype=logits.dtype, device=logits.device)
        grad = SparseGrad.apply(logits, labels, weights, lse, ones, ctx.options)
        axis = ctx.options[0]
        return _row_dot(grad.to(_acc(grad.dtype)), d_logits, axis).squeeze(axis).to(logits.dtype), None


class SparseGrad(torch.autograd.Function):
    """dz = s (a p - q) by the fused backward op; its derivatives are closed forms in torch ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, weights, lse, grad_loss, options):
        return _ops._sparse_backward(logits, labels, weights, lse, grad_loss.contiguous(), *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, weights, _lse, grad_loss, options = inputs
        ctx.save_for_backward(logits, labels, weights, grad_loss)
        ctx.save_for_forward(logits, labels, weights, grad_loss)
        ctx.options = options

    @staticmethod
    def _parts(ctx):
        logits, labels, weights, grad_loss = ctx.saved_tensors
        _refuse_dtensor(logits, "a second derivative (double backward, or forward mode over the gradient)")
        axis, eps, lam, ignore_index, cap = ctx.options
        cap = _Cap(logits.to(_acc(logits.dtype)), cap)
        z, lse, p = _softmax_parts(cap.capped, axis)
        w, q = _sparse_parts(z, labels, weights, axis, eps, ignore_index)
        a = 1.0 + 2.0 * lam * lse
        s = grad_loss.to(p.dtype).unsqueeze(axis) * w
        return logits, grad_loss, axis, lam, p, w, q, a, s, cap

    @staticmethod
    def backward(ctx, v):
        logits, grad_loss, axis, lam, p, w, q, a, s, cap = SparseGrad._parts(ctx)
        v = v.to(p.dtype)
        u = cap.into(v)
        d_logits = cap.out_of(_hessian_product(s, a, lam, p, u, axis), lambda: s * (a * p - q), v)
        d_grad_loss = (w * (a * _row_dot(p, u, axis) - _row_dot(q, u, axis))).squeeze(axis)
        return d_logits.to(logits.dtype), None, None, None, d_grad_loss.to(grad_loss.dtype), None

    @staticmethod
    def jvp(ctx, d_logits, _d_labels, _d_weights, _d_lse, d_grad_loss, _d_options):
        _refuse_nested_forward_mode()
        logits, grad_loss, axis, lam, p, w, q, a, s, cap = SparseGrad._parts(ctx)
        d = _zero_if_none(d_logits, logits).to(p.dtype)
        out = _hessian_product(s, a, lam, p, cap.into(d), axis)
        if d_grad_loss is not None:
            out = out + d_grad_loss.to(p.dtype).unsqueeze(axis) * w * (a * p - q)
        return cap.out_of(out, lambda: s * (a * p - q), d).to(logits.dtype)


# ---------------------------------------------------------------- dense labels


def _dense_label_gradient(logits, grad, axis, eps, cap, dtype):
    """d loss / d t = g (1 - eps) (lse - z) = -g (1 - eps) log_softmax(z), z the (capped) logits,
    lse recomputed so that it is differentiable."""
    z, lse, _ = _softmax_parts(_ops.capped(logits.to(_acc(logits.dtype)), cap), axis)
    return (grad.to(z.dtype).unsqueeze(axis) * (1.0 - eps) * (lse - z)).to(dtype)


class DenseLoss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, options):
        return _ops.dense_forward(logits, labels, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, options = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, labels, output[1])
        ctx.save_for_forward(logits, labels, output[1])
        ctx.options = options

    @staticmethod
    def backward(ctx, grad, _lse_grad):
        logits, labels, lse = ctx.saved_tensors
        axis, eps, _, cap = ctx.options
        grad_logits = grad_labels = None
        if ctx.needs_input_grad[0]:
            grad_logits = DenseGrad.apply(logits, labels, lse, grad, ctx.options)
        if ctx.needs_input_grad[1]:
            grad_labels = _placed_like(_dense_label_gradient(logits, grad, axis, eps, cap, labels.dtype), labels)
        return grad_logits, grad_labels, None

    @staticmethod
    def jvp(ctx, d_logits, d_labels, _d_options):
        _refuse_nested_forward_mode()
        logits, labels, lse = ctx.saved_tensors
        _refuse_dtensor(logits, "forward-mode differentiation")
        axis, eps, _, cap = ctx.options
        ones = torch.ones(lse.shape, dtype=logits.dtype, device=logits.device)
        acc = _acc(logits.dtype)
        out = torch.zeros(lse.shape, dtype=acc, device=logits.device)
        if d_logits is not None:
            grad = DenseGrad.apply(logits, labels, lse, ones, ctx.options)
            out = out + _row_dot(grad.to(acc), d_logits, axis).squeeze(axis)
        if d_labels is not None:
            grad_t = _dense_label_gradient(logits, ones, axis, eps, cap, acc)
            out = out + _row_dot(grad_t, d_labels, axis).squeeze(axis)
        return out.to(logits.dtype), None


class DenseGrad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, lse, grad_loss, options):
        return _ops._dense_backward(logits, labels, lse, grad_loss.contiguous(), *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, _lse, grad_loss, options = inputs
        ctx.save_for_backward(logits, labels, grad_loss)
        ctx.save_for_forward(logits, labels, grad_loss)
        ctx.options = options

    @staticmethod
    def _parts(ctx):
        logits, labels, grad_loss = ctx.saved_tensors
        _refuse_dtensor(logits, "a second derivative (double backward, or forward mode over the gradient)")
        axis, eps, lam, cap = ctx.options
        cap = _Cap(logits.to(_acc(logits.dtype)), cap)
        z, lse, p = _softmax_parts(cap.capped, axis)
        q = (1.0 - eps) * labels.to(z.dtype) + eps / z.shape[axis]
        a = q.sum(axis, keepdim=True) + 2.0 * lam * lse
        g = grad_loss.to(p.dtype).unsqueeze(axis)
        return logits, labels, grad_loss, axis, eps, lam, p, q, a, g, cap

    @staticmethod
    def backward(ctx, v):
        logits, labels, grad_loss, axis, eps, lam, p, q, a, g, cap = DenseGrad._parts(ctx)
        v = v.to(p.dtype)
        u = cap.into(v)
        p_dot_u = _row_dot(p, u, axis)
        d_logits = cap.out_of(_hessian_product(g, a, lam, p, u, axis), lambda: g * (a * p - q), v)
        d_labels = g * (1.0 - eps) * (p_dot_u - u)
        d_grad_loss = (a * p_dot_u - _row_dot(q, u, axis)).squeeze(axis)
        return d_logits.to(logits.dtype), d_labels.to(labels.dtype), None, d_grad_loss.to(grad_loss.dtype), None

    @staticmethod
    def jvp(ctx, d_logits, d_labels, _d_lse, d_grad_loss, _d_options):
        _refuse_nested_forward_mode()
        logits, labels, grad_loss, axis, eps, lam, p, q, a, g, cap = DenseGrad._parts(ctx)
        d = _zero_if_none(d_logits, logits).to(p.dtype)
        out = _hessian_product(g, a, lam, p, cap.into(d), axis)
        if d_labels is not None:
            d_t = d_labels.to(p.dtype)
            out = out + g * (1.0 - eps) * (d_t.sum(axis, keepdim=True) * p - d_t)
        if d_grad_loss is not None:
            out = out + d_grad_loss.to(p.dtype).unsqueeze(axis) * (a * p - q)
        return cap.out_of(out, lambda: g * (a * p - q), d).to(logits.dtype)
