"""Float64 NumPy reference of softmax cross-entropy and its gradients, written
directly from the formulas (not from the kernels), for the tests to compare with."""

import numpy as np


class ToleranceError(AssertionError):
    """Raised by conftest.assert_rows_close; xfail(raises=ToleranceError) keeps other failures failures."""


def _max_and_log_sum(z):
    """(m, log sum_j exp(z_j - m)) with m the row max (0 where it is not finite): lse = m + log_sum.
    Kept apart because m + log_sum rounds away log_sum when |m| is huge (3e38 + log 2 == 3e38)."""
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return m[..., 0], np.log(np.sum(np.exp(z - m), axis=-1))


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
        loss = np.where(np.isposinf(z).any(-1), np.nan, loss)  # a +inf logit: NaN row (the kernels' rule, test_long_rows)
        p = np.exp((z - m[..., None]) - log_sum[..., None])
        grad = (weight * grad_loss)[..., None] * ((target_sum + 2 * z_loss * lse)[..., None] * p - q)
    return loss, grad


def sparse(labels, logits, axis=-1, ignore_index=None, label_smoothing=0.0, class_weights=None, z_loss=0.0,
           grad_loss=None):
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
