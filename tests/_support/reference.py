"""Float64 NumPy reference of softmax cross-entropy and its gradients, written
directly from the formulas (not from the kernels), for the tests to compare with."""

import numpy as np


class ToleranceError(AssertionError):
    """Raised by tests._support.assertions.assert_rows_close; xfail(raises=ToleranceError) keeps other failures failures."""


def _max_and_log_sum(z):
    """(m, log sum_j exp(z_j - m)) with m the row max (0 where it is not finite): lse = m + log_sum.
    Kept apart because m + log_sum rounds away log_sum when |m| is huge (3e38 + log 2 == 3e38).
    The max's own terms (exactly 1) are counted apart and log_sum taken as log1p of the others:
    log(1 + 1e-10) in float64 would be 1e-6 off, a small loss's error, not the kernels'."""
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = z - m
        tie = d == 0
        ties = tie.sum(-1)
        rest = np.sum(np.where(tie, 0.0, np.exp(d)), axis=-1)
        log_sum = np.where(ties >= 1, np.log1p(np.maximum(ties - 1, 0) + rest), np.log(rest))
        return m[..., 0], log_sum


def _gradient_core(p, q, a):
    """a p_j - q_j per element. Where p_j > 1/2 (one class at most), p_j - 1 is taken as minus the
    sum of the other p_k, so that a confidently right row's small gradient is exact too."""
    dominant = p > 0.5
    others = np.sum(np.where(dominant, 0.0, p), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.where(dominant, a * -others + (a - q), a * p - q)


def _lse(z):
    m, log_sum = _max_and_log_sum(z)
    return m + log_sum


def _products(q, z):
    """sum_j q_j z_j with 0 * +-inf taken as 0."""
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(q == 0, 0.0, q * z), axis=-1)


def _finish(z, q, weight, z_loss, grad_loss):
    # lse * sum(q) - sum_j q_j z_j, written as sum(q) * log_sum + sum_j q_j (m - z_j) and
    # p_j = exp((z_j - m) - log_sum): the same numbers, without rounding log_sum into a huge m.
    m, log_sum = _max_and_log_sum(z)
    lse = m + log_sum
    target_sum = q.sum(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        loss = weight * (log_sum * target_sum + _products(q, m[..., None] - z) + (z_loss * lse**2 if z_loss else 0.0))
        loss = np.where(
            np.isposinf(z).any(-1), np.nan, loss
        )  # a +inf logit: NaN row (the kernels' rule, test_long_rows)
        p = np.exp((z - m[..., None]) - log_sum[..., None])
        grad = (weight * grad_loss)[..., None] * _gradient_core(p, q, (target_sum + 2 * z_loss * lse)[..., None])
    return loss, grad


def sparse(
    labels, logits, axis=-1, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0, grad_loss=None
):
    """Returns (loss, grad_logits) in float64."""
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    labels = np.asarray(labels).astype(np.int64)
    classes = z.shape[-1]
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    safe = np.where(ignored, 0, labels)
    onehot = np.zeros(z.shape)
    np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
    q = (1 - label_smoothing) * onehot + label_smoothing / classes
    weight = np.ones(labels.shape) if class_weights is None else np.asarray(class_weights, np.float64)[safe]
    weight = np.where(ignored, 0.0, weight)
    g = np.ones(labels.shape) if grad_loss is None else np.asarray(grad_loss, np.float64)
    loss, grad = _finish(z, q, weight, z_loss, g)
    loss = np.where(ignored, 0.0, loss)  # ignored rows are 0 whatever their logits
    grad = np.where(ignored[..., None], 0.0, grad)
    return loss, np.moveaxis(grad, -1, axis)


def dense(labels, logits, axis=-1, label_smoothing=0.0, z_loss=0.0, grad_loss=None):
    """Returns (loss, grad_logits, grad_labels) in float64."""
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    t = np.moveaxis(np.broadcast_to(np.asarray(labels, np.float64), np.shape(logits)), axis, -1)
    classes = z.shape[-1]
    q = (1 - label_smoothing) * t + label_smoothing / classes
    g = np.ones(z.shape[:-1]) if grad_loss is None else np.asarray(grad_loss, np.float64)
    m, log_sum = _max_and_log_sum(z)
    loss, grad = _finish(z, q, np.ones(z.shape[:-1]), z_loss, g)
    with np.errstate(invalid="ignore"):
        grad_labels = (g * (1 - label_smoothing))[..., None] * ((m[..., None] - z) + log_sum[..., None])
        grad_labels = np.where(np.isposinf(z).any(-1, keepdims=True), np.nan, grad_labels)
    return loss, np.moveaxis(grad, -1, axis), np.moveaxis(grad_labels, -1, axis)


# --- Second order (issue 14): the Hessian written out, H = d(grad)/dz, per row ----------------
#
# A row's loss is L = w (S lse - q.z + lam lse^2) with S = sum_j q_j, so grad L = w (a p - q) with
# a = S + 2 lam lse, and since d lse/dz = p, dp/dz = diag(p) - p p^T:
#     H = w (a (diag(p) - p p^T) + 2 lam p p^T).
# For total = sum L^2: grad = 2 L grad L and H_total v = 2 (grad L . v) grad L + 2 L H v.


def _hessian(z, q, weight, z_loss, magnitudes=False):
    """(loss, grad, H) per row of class-last z; H has shape rows + (C, C).
    magnitudes=True: the same formulas with every term's absolute value (nothing cancels), the
    size of what a kernel adds up (`terms` of assertions.assert_rows_close)."""
    loss, grad = _finish(z, q, weight, z_loss, np.ones(z.shape[:-1]))
    m, log_sum = _max_and_log_sum(z)
    lse = m + log_sum
    p = np.exp((z - m[..., None]) - log_sum[..., None])
    a = q.sum(-1) + 2 * z_loss * lse
    outer = p[..., :, None] * p[..., None, :]
    diag = p[..., :, None] * np.eye(z.shape[-1])
    sign = -1.0
    if magnitudes:
        weight, a, sign = np.abs(weight), np.abs(a), 1.0
        loss = weight * (q.sum(-1) * np.abs(lse) + np.sum(q * np.abs(z), -1) + z_loss * lse**2)
        grad = weight[..., None] * (a[..., None] * p + q)
    h = weight[..., None, None] * (a[..., None, None] * (diag + sign * outer) + 2 * z_loss * outer)
    return loss, grad, h


def _sparse_targets(labels, shape, ignore_index, label_smoothing, class_weights):
    labels = np.asarray(labels).astype(np.int64)
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    safe = np.where(ignored, 0, labels)
    onehot = np.zeros(shape)
    np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
    q = (1 - label_smoothing) * onehot + label_smoothing / shape[-1]
    weight = np.ones(labels.shape) if class_weights is None else np.asarray(class_weights, np.float64)[safe]
    return q, np.where(ignored, 0.0, weight)


def sparse_hessian(
    labels, logits, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0, magnitudes=False
):
    """(loss, grad, H) in float64, classes on the last axis."""
    z = np.asarray(logits, np.float64)
    q, weight = _sparse_targets(labels, z.shape, ignore_index, label_smoothing, class_weights)
    return _hessian(z, q, weight, z_loss, magnitudes)


def _squared_hvp(loss, grad, h, v, power):
    hv = np.einsum("...jk,...k->...j", h, v)
    if power == 1:
        return np.sum(loss), hv
    directional = np.sum(grad * v, -1, keepdims=True)
    return np.sum(loss**2), 2 * directional * grad + 2 * loss[..., None] * hv


def sparse_hvp(labels, logits, v, axis=-1, power=2, magnitudes=False, **options):
    """(total, H_total v) for total = sum(loss**power), power 1 or 2, in float64
    (magnitudes=True: the sizes of their terms, as in _hessian)."""
    z, v = (np.moveaxis(np.asarray(a, np.float64), axis, -1) for a in (logits, v))
    v = np.abs(v) if magnitudes else v
    total, hv = _squared_hvp(*sparse_hessian(labels, z, magnitudes=magnitudes, **options), v, power)
    return total, np.moveaxis(hv, -1, axis)


def dense_hvp(labels, logits, v, label_smoothing=0.0, z_loss=0.0, power=2, magnitudes=False):
    """(total, H_total v, d(grad_total . v)/dlabels) for total = sum(loss**power), classes last.
    grad L . v = a (p.v) - q.v with q = (1 - eps) t + eps / C, so d/dt_j = (1 - eps)(p.v - v_j)
    (a depends on t through S); grad_t L = (1 - eps)(lse - z_j)."""
    z, t, v = (np.asarray(a, np.float64) for a in (logits, labels, v))
    q = (1 - label_smoothing) * t + label_smoothing / z.shape[-1]
    v = np.abs(v) if magnitudes else v
    sign = 1.0 if magnitudes else -1.0
    loss, grad, h = _hessian(z, q, np.ones(z.shape[:-1]), z_loss, magnitudes)
    total, hv = _squared_hvp(loss, grad, h, v, power)
    lse = _lse(z)[..., None]
    p = np.exp(z - lse)
    d_labels = (1 - label_smoothing) * (np.sum(p * v, -1, keepdims=True) + sign * v)
    if power == 2:
        grad_labels = (1 - label_smoothing) * ((np.abs(lse) + np.abs(z)) if magnitudes else (lse - z))
        d_labels = 2 * np.sum(grad * v, -1, keepdims=True) * grad_labels + 2 * loss[..., None] * d_labels
    return total, hv, d_labels


# --- Final-logit softcap (issue 29): the composite, cap * tanh(x / cap) then cross-entropy ---------


def softcapped(logits, cap):
    """(capped logits, d capped / d logits) in float64, by NumPy's tanh."""
    x = np.asarray(logits, np.float64)
    tanh = np.tanh(x / cap)
    return cap * tanh, 1.0 - tanh * tanh


def sparse_softcap(labels, logits, cap, axis=-1, grad_loss=None, **options):
    """(loss, grad_logits) in float64 of the loss of the capped logits: the chain rule by hand."""
    z, slope = softcapped(logits, cap)
    loss, grad = sparse(labels, z, axis=axis, grad_loss=grad_loss, **options)
    return loss, grad * slope


def dense_softcap(labels, logits, cap, axis=-1, grad_loss=None, **options):
    """(loss, grad_logits, grad_labels) in float64 of the loss of the capped logits."""
    z, slope = softcapped(logits, cap)
    loss, grad, grad_labels = dense(labels, z, axis=axis, grad_loss=grad_loss, **options)
    return loss, grad * slope, grad_labels
