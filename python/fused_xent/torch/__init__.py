"""The fused kernels in PyTorch: ``torch.library`` custom ops with registered autograd.

``sparse_softmax_cross_entropy_with_logits`` and ``softmax_cross_entropy_with_logits``
take the arguments of the TensorFlow functions of the same names and return the
per-example loss. They work eagerly, under ``torch.autograd`` and under
``torch.compile`` (the ops have fake implementations, so they stay whole in the
graph), on CPU tensors and, in builds with CUDA, on CUDA tensors.

The first derivative with respect to the logits is the fused backward kernel, in
reverse mode (``backward()``, ``torch.func.grad``, ``jacrev``) and forward mode
(``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``). Higher derivatives
(``create_graph=True``, Hessians, Hessian-vector products forward over reverse) use
closed forms in torch ops for that kernel's derivative: exact, but not fused. Any
number of reverse-mode transforms with at most one forward-mode transform among
them is supported; forward over forward raises ``NotImplementedError``. The gradient
with respect to dense labels is ``g * (1 - eps) * (logsumexp(z) - z)``, computed with
torch ops. Under ``torch.compile`` only reverse mode is available.

``softcap=cap`` (Gemma 2/3's final-logit cap) computes the loss on ``cap * tanh(z / cap)``
inside the kernels; every derivative above is with respect to the uncapped logits, and the
closed forms include the cap's slope and curvature. ``None`` (the default) is no cap.

A label outside ``[0, C)`` that is not ``ignore_index`` raises ``ValueError``
on the CPU; on a GPU it gives NaN for its row. Gradients with respect to
``class_weights`` are not computed (they are constants).
"""

import sys

import numpy as np
import torch

from fused_xent import _checks
from fused_xent.torch import _autograd, _ops
from fused_xent.torch._native import CrossEntropyLoss, cross_entropy

__all__ = [
    "CrossEntropyLoss",
    "cross_entropy",
    "release_cached_memory",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
]


def _dtensor_rules(logits):
    """Registers the ops' DTensor rules (torch/_dtensor.py) when DTensor logits first arrive: their
    module imports torch.distributed.tensor (~1.5 s), which programs without DTensors never pay."""
    api = sys.modules.get("torch.distributed.tensor")
    if api is not None and isinstance(logits, api.DTensor):
        import fused_xent.torch._dtensor  # noqa: F401


def _float_logits(logits):
    _dtensor_rules(logits)
    logits = torch.as_tensor(logits)
    _checks.logits_dtype(_ops.dtype_name(logits.dtype))
    _checks.logits_rank(logits.ndim, logits)
    return logits


def _class_weights(class_weights, classes, device):
    if class_weights is None:
        return None
    dtype = getattr(class_weights, "dtype", None)
    if dtype is not None:
        _checks.class_weight_dtype(_ops.dtype_name(dtype) if isinstance(dtype, torch.dtype) else np.dtype(dtype).name)
    try:
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"class_weights must be a vector of floats: {error}") from None
    _checks.class_weight_shape(weights.shape, classes)
    if not torch.compiler.is_compiling():  # traced values are checked by the CPU kernels
        try:
            values = weights.detach().cpu().numpy()
        except RuntimeError:  # a tensor of a torch.func transform: no values to read here
            values = None
        _checks.class_weight_values(values)
    return weights.detach().contiguous()


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

    The PyTorch twin of ``fused_xent.sparse_softmax_cross_entropy_with_logits``:
    the same arguments (labels int32/int64 shaped like ``logits`` without
    ``axis``; ``ignore_index``, ``label_smoothing``, ``class_weights``,
    ``z_loss``) and the same values. ``softcap`` (a number > 0, or None for
    none) caps the logits first: the loss is that of ``softcap * tanh(logits / softcap)``,
    its gradient is for ``logits``. Returns the loss, shaped like ``labels``,
    in the logits' dtype, on their device.
    """
    logits = _float_logits(logits)
    labels = torch.as_tensor(labels, device=logits.device)
    _checks.sparse_label_dtype(_ops.dtype_name(labels.dtype))
    axis = _checks.axis(axis, logits.ndim) % logits.ndim
    _checks.sparse_shapes(labels.shape, logits.shape, axis)
    weights = _class_weights(class_weights, logits.shape[axis], logits.device)
    smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    ignore_index = _checks.ignore_index_for(ignore_index, _ops.dtype_name(labels.dtype))
    cap = _ops.softcap(softcap)
    if torch.compiler.is_compiling():  # Dynamo traces the custom ops (reverse mode), not Functions with a jvp
        return _ops.sparse_forward(logits, labels, weights, axis, smoothing, z_loss, ignore_index, cap)[0]
    options = _autograd.Options(axis, smoothing, z_loss, ignore_index, cap)
    return _autograd.SparseLoss.apply(logits, labels, weights, options)[0]  # (loss, lse)


def softmax_cross_entropy_with_logits(labels, logits, axis=-1, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Per-example softmax cross-entropy with a distribution as labels, fused.

    The PyTorch twin of ``fused_xent.softmax_cross_entropy_with_logits``:
    ``labels`` are cast to the logits' dtype and broadcast to their shape; the
    gradient flows to both ``logits`` and ``labels``. ``softcap`` as in
    ``sparse_softmax_cross_entropy_with_logits``.
    """
    logits = _float_logits(logits)
    axis = _checks.axis(axis, logits.ndim) % logits.ndim
    labels = torch.as_tensor(labels, device=logits.device).to(logits.dtype)
    _checks.dense_label_shape(labels.shape, logits.shape)
    labels = labels.expand(logits.shape)
    smoothing, z_loss = _checks.kernel_options(label_smoothing, z_loss)
    cap = _ops.softcap(softcap)
    if torch.compiler.is_compiling():
        return _ops.dense_forward(logits, labels, axis, smoothing, z_loss, cap)[0]
    options = _autograd.Options(axis, smoothing, z_loss, cap)
    return _autograd.DenseLoss.apply(logits, labels, options)[0]  # (loss, lse)


def release_cached_memory():
    """Drops the CPU gradient buffer the backward keeps for reuse (the last large gradient's
    memory, reused once nothing else references it: fresh memory costs page faults)."""
    _ops._gradient_buffer.release()
