"""PyTorch's own cross-entropy API on the fused kernels: ``cross_entropy`` and ``CrossEntropyLoss``.

They take the arguments of ``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss``
and give their values, gradients and (for bad input) exception types, with PyTorch's semantics:
the class dimension is 1 (0 for an unbatched input of shape (C,)); a target shaped like the input
holds class probabilities, any other target class indices; ``weight`` weighs each class, and
``reduction="mean"`` divides by the summed weights of the targets not ignored (by the number of
rows for probability targets); with ``label_smoothing`` ε as well, a row's loss is
``(1 - ε) w[y] (-log p_y) + ε/C sum_c w_c (-log p_c)``, PyTorch's rule, not the one of the
TensorFlow-style functions of fused_xent.torch (``w[y]`` times the whole smoothed loss, Keras's).

Beyond PyTorch: ``z_loss`` adds ``z_loss * logsumexp(z)**2`` per row (times the row's class weight
for class indices); ``softcap`` computes the loss on the capped logits ``softcap * tanh(z / softcap)``
(Gemma 2/3), the gradient being for z; int32 targets are accepted as well as int64 and uint8; a
``weight`` that requires grad gets its gradient with class-index targets too. Where they differ from PyTorch: a
``-inf`` logit whose target probability is 0 adds 0 (PyTorch: NaN), and on a GPU a class index
outside [0, C) that is not ``ignore_index`` gives NaN for its row (PyTorch's CUDA kernels assert;
on the CPU both raise IndexError). The kernels take ``label_smoothing`` as a float32.
"""

import math

import torch

import fused_xent.torch as fused  # the package's fused functions, read at call time (it imports this module)
from fused_xent import _checks
from fused_xent.torch import _autograd, _ops

__all__ = ["CrossEntropyLoss", "cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")
_CLASS_TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


# ---------------------------------------------------------------- argument checks (PyTorch's exception types)


def _scalar_type(dtype):
    """PyTorch's name of a dtype in its messages: Float, Long, Half, BFloat16, ..."""
    return torch.empty(0, dtype=dtype).type().replace("torch.", "").replace("Tensor", "")


def _tensor(name, value, optional=False):
    if (value is None and optional) or isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"cross_entropy(): argument '{name}' must be Tensor, not {type(value).__name__}")


def _reduction(value):
    if value not in _REDUCTIONS:
        raise ValueError(f"{value} is not a valid value for reduction")
    return value


def _label_smoothing(value):
    """PyTorch applies a label_smoothing only when it is > 0 (up to 1): 0, less and NaN are none.
    Returned as the float32 value the kernels see, which every path then uses."""
    number = _checks.plain_number(value)
    if number is None:
        raise TypeError(f"label_smoothing must be a float, got {value!r}")
    if number > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {number}")
    return _checks.kernel_float(number) if number > 0.0 else 0.0


def _ignore_index(value):
    number = _checks.plain_integer(value)
    if number is None:
        raise TypeError(f"cross_entropy(): argument 'ignore_index' must be int, not {type(value).__name__}")
    return number


def _input(input):
    name = _ops.dtype_name(input.dtype)
    if name not in _checks.FLOAT_NAMES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {name}")
    if input.ndim == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    return input


def _weight_shape(weight, classes, prefix=""):
    if weight is not None and (weight.ndim != 1 or weight.shape[0] != classes):
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )


def _class_target(input, target):
    """The class indices, shaped like the input without its class dimension (PyTorch's checks)."""
    if target.dtype not in _CLASS_TARGET_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long, Int or Byte, but got {_scalar_type(target.dtype)}")
    if input.ndim == 1:
        if target.ndim > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.ndim == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        return target.reshape(())
    batch = target.shape[0] if target.ndim else 0
    if batch != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({batch}).")
    if input.ndim == 2 and target.ndim != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    return target


def _class_weight(weight, input, classes):
    _weight_shape(weight, classes)
    if weight is not None and weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {_scalar_type(input.dtype)} but found {_scalar_type(weight.dtype)}")
    return weight


def _check_class_range(labels, classes, ignore_index):
    """IndexError for a class index outside [0, C) that is not ignore_index, as PyTorch's CPU
    kernels raise. CPU tensors only (elsewhere it would wait for the device); not while
    torch.compile traces (the kernels raise ValueError then)."""
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (labels < 0) | (labels >= classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    try:
        found = bool(bad.any())
    except RuntimeError:  # a tensor of a torch.func transform: no values to read here
        return
    if found:
        raise IndexError(f"Target {labels[bad][0].item()} is out of bounds.")


# ---------------------------------------------------------------- helpers


def _acc(dtype):
    """The dtype rows are weighted and summed in: float32 for the 16-bit dtypes."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_dim(input):
    return 0 if input.ndim == 1 else 1


def _along_class_dim(weight, input):
    """weight shaped to broadcast along the input's class dimension."""
    shape = [1] * input.ndim
    shape[_class_dim(input)] = weight.shape[0]
    return weight.reshape(shape)


def _reduced(rows, denominator, reduction, dtype):
    """rows (in their accumulation dtype) reduced as asked, in `dtype`."""
    if reduction == "none":
        return rows.to(dtype)
    if reduction == "sum":
        return rows.sum().to(dtype)
    return (rows.sum() / denominator).to(dtype)


# ---------------------------------------------------------------- the loss


def cross_entropy(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None
):
    """``torch.nn.functional.cross_entropy``, fused: the same arguments, values and gradients.

    ``input`` is (N, C), (N, C, d1, ..., dk) or (C,) logits; ``target`` either class indices
    (int64, uint8 or int32) shaped like the input without C, or class probabilities shaped like
    the input. ``weight`` (C,) weighs each class; ``ignore_index`` (class indices only) marks
    targets that add nothing; ``reduction`` is "none", "mean" or "sum"; ``label_smoothing`` mixes
    the target with the uniform distribution. ``z_loss`` (keyword, not in PyTorch) adds
    ``z_loss * logsumexp(z)**2`` per row, weighted like the row. ``softcap`` (keyword, not in
    PyTorch; None: no cap) gives the loss of ``softcap * tanh(input / softcap)``, as
    ``F.cross_entropy`` of those capped logits, computed in the kernels. See the module's notes for
    PyTorch's weighted mean and its rule for weight with label smoothing.

    Everything runs in the fused kernels, except class indices with both ``weight`` and
    ``label_smoothing``: the kernels have no per-class weights for the smoothing term, which is
    then ``sum_c w_c (lse - z_c) = W lse - z.w`` from the kernel's row logsumexp and one more pass
    over the logits (a matrix-vector product; its outer product in the backward).
    """
    input, target = _tensor("input", input), _tensor("target", target)
    weight = _tensor("weight", weight, optional=True)
    reduction = _reduction(reduction)
    smoothing = _label_smoothing(label_smoothing)
    z_loss = _checks.z_loss(z_loss)
    cap = _ops.softcap(softcap)
    ignore_index = _ignore_index(ignore_index)
    _input(input)
    if input.shape == target.shape:  # PyTorch's rule: probabilities when the shapes are equal
        rows, denominator, dtype = _probability_rows(input, target, weight, ignore_index, smoothing, z_loss, cap)
    else:
        rows, denominator, dtype = _class_rows(input, target, weight, ignore_index, smoothing, z_loss, cap)
    return _reduced(rows, denominator, reduction, dtype)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss``, fused (see ``cross_entropy``): the same constructor (weight,
    the deprecated size_average and reduce, ignore_index, reduction, label_smoothing) and the
    keywords ``z_loss`` and ``softcap``. An instance of ``torch.nn.CrossEntropyLoss``, so code
    that checks for one accepts it."""

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index=-100,
        reduce=None,
        reduction="mean",
        label_smoothing=0.0,
        *,
        z_loss=0.0,
        softcap=None,
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = _checks.z_loss(z_loss)
        _checks.softcap(softcap)
        self.softcap = None if softcap is None else float(softcap)

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )

    def extra_repr(self):
        parts = [f"z_loss={self.z_loss}"] if self.z_loss else []
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts)


# ---------------------------------------------------------------- class probabilities


def _probability_rows(input, target, weight, ignore_index, smoothing, z_loss, cap):
    """(per-row loss, mean's denominator, result dtype) for class-probability targets."""
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {_scalar_type(target.dtype)}"
        )
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    class_dim, classes = _class_dim(input), input.shape[_class_dim(input)]
    _weight_shape(weight, classes, prefix="cross_entropy: ")
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    rows_count = input.numel() // classes if input.numel() else 0  # PyTorch: mean of no element is NaN
    if classes == 0:
        return (input * target).sum(class_dim).to(_acc(dtype)), rows_count, dtype
    if weight is None:
        rows = fused.softmax_cross_entropy_with_logits(
            target, input, axis=class_dim, label_smoothing=smoothing, z_loss=z_loss, softcap=cap or None
        )
        return rows.to(_acc(dtype)), rows_count, dtype
    # -sum_c w_c q_c log p_c is the kernel's loss for labels w * q, q the smoothed target.
    smoothed = target * (1.0 - smoothing) + smoothing / classes if smoothing else target
    # eps/C * w_c can fall below float16's normals: those labels (and so the logits) in float32
    logits = input.float() if smoothing and input.dtype == torch.float16 else input
    rows = fused.softmax_cross_entropy_with_logits(
        smoothed * _along_class_dim(weight, input), logits, axis=class_dim, z_loss=z_loss, softcap=cap or None
    )
    return rows.to(_acc(dtype)), rows_count, dtype


# ---------------------------------------------------------------- class indices


def _class_rows(input, target, weight, ignore_index, smoothing, z_loss, cap):
    """(per-row loss, mean's denominator, result dtype) for class-index targets."""
    target = _class_target(input, target)
    class_dim, classes = _class_dim(input), input.shape[_class_dim(input)]
    weight = _class_weight(weight, input, classes)
    ignore = _checks.ignore_index_for(ignore_index, _ops.dtype_name(target.dtype))
    labels = target.to(torch.int32) if target.dtype == torch.uint8 else target  # the kernels read int32/int64
    _check_class_range(labels, classes, ignore)
    valid = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
    acc = _acc(input.dtype)
    if classes == 0:  # every target is ignored (others raised): rows of nothing
        return input.sum(class_dim).to(acc), valid.sum().to(acc), input.dtype
    if weight is None:
        rows = fused.sparse_softmax_cross_entropy_with_logits(
            labels,
            input,
            axis=class_dim,
            ignore_index=ignore,
            label_smoothing=smoothing,
            z_loss=z_loss,
            softcap=cap or None,
        )
        return rows.to(acc), valid.sum().to(acc), input.dtype
    _, _, label_weight = _label_parts(labels, weight, ignore, acc)
    if smoothing:
        options = _autograd.Options(class_dim, smoothing, _checks.kernel_float(z_loss), ignore, cap)
        rows = _weighted_smoothing(input, labels, weight, options)
    else:
        nll = fused.sparse_softmax_cross_entropy_with_logits(
            labels, input, axis=class_dim, ignore_index=ignore, z_loss=z_loss, softcap=cap or None
        )
        rows = nll.to(acc) * label_weight
    # where, not the product alone: an ignored row's gradient stays 0 when the mean's 1/0 is inf
    return torch.where(valid, rows, 0.0), label_weight.sum(), input.dtype


# ---------------------------------------------------------------- weight with label smoothing
#
# PyTorch's rule, per row not ignored (eps the smoothing, lam the z-loss, W = sum_c w_c):
#     loss = (1 - eps) w_y (lse - z_y) + eps/C sum_c w_c (lse - z_c) + lam w_y lse^2
#          = (1 - eps) w_y nll + eps/C (W lse - z.w) + lam w_y lse^2
# The kernels weigh whole rows, not the classes of the smoothing term: the fused op gives nll and
# lse (float64), and z.w is one more pass over the logits (a matrix-vector product). Its gradient,
# with p = softmax(z) and a = (1 - eps) w_y + eps W / C + 2 lam w_y lse,
#     d loss / dz = a p - (1 - eps) w_y e_y - eps/C w
#                 = a (p - e_y)  +  (eps W / C + 2 lam w_y lse) e_y  -  eps/C w,
# is the fused backward op at the row scale a, then two corrections in place: one element per row
# and a pass adding the outer product of the rows' upstream gradients and w. No gradient buffer
# but the op's. With a softcap, z is the capped logits cap tanh(x / cap): the op's gradient is
# already for x, and the two corrections are carried to x by the cap's slope 1 - tanh(x / cap)^2.


def _weighted_smoothing(input, labels, weight, options):
    """The rows' loss (accumulation dtype). Under torch.compile, or for a weight that requires grad,
    a graph of torch ops that autograd differentiates (Dynamo traces the custom op, not a Function);
    otherwise the Function below."""
    if torch.compiler.is_compiling() or weight.requires_grad:
        return _weighted_smoothing_graph(input, labels, weight, options)
    return _WeightedSmoothing.apply(input, labels, weight, options)[0]


def _class_dot(z, weight):
    """sum_c w_c z_c along the class dimension (1, or 0 for a vector), as a matrix-vector product."""
    if z.ndim <= 2:
        return z @ weight
    rows = weight @ z.reshape(z.shape[0], z.shape[1], math.prod(z.shape[2:]))  # (N, C, D) -> (N, D)
    return rows.reshape(z.shape[:1] + z.shape[2:])


def _label_parts(labels, weight, ignore, dtype):
    """(whether a row counts, its label made safe to index with, w_y (0 where it does not count))."""
    valid = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, 0)
    return valid, safe, torch.where(valid, weight[safe].to(dtype), 0.0)


def _smoothing_rows(z, nll, lse, label_weight, weight, options):
    """The rows' loss from nll and lse (float tensors of z's dtype) and z.w."""
    class_dim, eps, lam = options[:3]
    smooth = weight.sum() * lse - _class_dot(z, weight)
    rows = (1.0 - eps) * label_weight * nll + (eps / z.shape[class_dim]) * smooth
    return rows + lam * label_weight * lse * lse if lam else rows


def _weighted_smoothing_graph(input, labels, weight, options):
    """The rows' loss as torch ops on the fused op's outputs: lse is the kernel's float64 value,
    made differentiable as (lse - z_y) + z_y, whose gradient is softmax(z)."""
    class_dim, _, _, ignore, cap = options
    acc = _acc(input.dtype)
    if torch.compiler.is_compiling():  # as the public functions: Dynamo traces the custom op
        nll, lse = _ops.sparse_forward(input, labels, None, class_dim, 0.0, 0.0, ignore, cap)
    else:
        unweighted = _autograd.Options(class_dim, 0.0, 0.0, ignore, cap)
        nll, lse = _autograd.SparseLoss.apply(input, labels, None, unweighted)
    valid, safe, label_weight = _label_parts(labels, weight, ignore, acc)
    z, nll = _ops.capped(input.to(acc), cap), nll.to(acc)
    through_nll = nll + z.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    lse = lse.to(acc) + (through_nll - through_nll.detach())
    return torch.where(valid, _smoothing_rows(z, nll, lse, label_weight, weight.to(acc), options), 0.0)


def _smoothing_gradient(input, labels, weight, kernel_lse, lse, grad, options):
    """d sum(rows * grad) / dz by the fused backward op and the two corrections (see above).
    `lse` is the kernel's (kernel_lse, float64) or, for second derivatives, one autograd can
    differentiate; the op is the differentiable SparseGrad Function either way."""
    class_dim, eps, lam, ignore, cap = options
    acc = _acc(input.dtype)
    valid, safe, label_weight = _label_parts(labels, weight, ignore, acc)
    weight = weight.to(acc)
    grad = torch.where(valid, grad.to(acc), 0.0)
    at_label = grad * (eps * weight.sum() / input.shape[class_dim] + 2.0 * lam * label_weight * lse)
    scale = grad * (1.0 - eps) * label_weight + at_label
    unweighted = _autograd.Options(class_dim, 0.0, 0.0, ignore, cap)
    out = _autograd.SparseGrad.apply(input, labels, None, kernel_lse, scale, unweighted)
    index = safe.unsqueeze(class_dim)
    at_label, per_class = at_label.unsqueeze(class_dim), _along_class_dim(weight, input)
    if cap:  # the corrections are for the capped logits: times the cap's slope
        slope = _ops.cap_slope(input.to(acc), cap)
        at_label, per_class = at_label * slope.gather(class_dim, index), per_class * slope
    out.scatter_add_(class_dim, index, at_label.to(out.dtype))
    return out.addcmul_(grad.unsqueeze(class_dim), per_class, value=-eps / input.shape[class_dim])


class _WeightedSmoothing(torch.autograd.Function):
    """(rows, lse): the rows' loss from the fused op and z.w; lse is internal, not differentiable.
    The backward is _smoothing_gradient; with create_graph it uses an lse recomputed from the
    logits, so that the z-loss term's second derivative is there too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, labels, weight, options):
        class_dim, _, _, ignore, cap = options
        acc = _acc(input.dtype)
        nll, lse = _ops.sparse_forward(input, labels, None, class_dim, 0.0, 0.0, ignore, cap)
        valid, _, label_weight = _label_parts(labels, weight, ignore, acc)
        z = _ops.capped(input.to(acc), cap)
        rows = _smoothing_rows(z, nll.to(acc), lse.to(acc), label_weight, weight.to(acc), options)
        return torch.where(valid, rows, 0.0), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, labels, weight, options = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, labels, weight, output[1])
        ctx.save_for_forward(input, labels, weight, output[1])
        ctx.options = options

    @staticmethod
    def backward(ctx, grad, _lse_grad):
        input, labels, weight, kernel_lse = ctx.saved_tensors
        lse = kernel_lse.to(_acc(input.dtype))
        if torch.is_grad_enabled():  # create_graph: an lse that autograd differentiates
            lse = torch.logsumexp(_ops.capped(input.to(lse.dtype), ctx.options[4]), ctx.options[0])
        gradient = _smoothing_gradient(input, labels, weight, kernel_lse, lse, grad, ctx.options)
        return gradient, None, None, None

    @staticmethod
    def jvp(ctx, d_input, _d_labels, _d_weight, _d_options):
        input, labels, weight, kernel_lse = ctx.saved_tensors
        acc, class_dim = _acc(input.dtype), ctx.options[0]
        if d_input is None:
            return torch.zeros(kernel_lse.shape, dtype=acc, device=input.device), None
        ones = torch.ones(kernel_lse.shape, dtype=acc, device=input.device)
        gradient = _smoothing_gradient(input, labels, weight, kernel_lse, kernel_lse.to(acc), ones, ctx.options)
        return (gradient.to(acc) * d_input.to(acc)).sum(class_dim), None
