"""Confidently right rows: the loss log(1 + rest) is tiny and must keep its relative accuracy (and its
sign), and so must the label's gradient -(1 - p_y), on every path (README "Guarantees").

The exact values come from float64 sums of the other classes' terms (math.fsum), never from
log(sum): in float64, log(1 + 1e-12) is itself 1e-4 off."""

import math

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support.runners import sparse_loss_and_gradient

CLASSES = [2, 10, 31, 32, 33, 1000, 5000, 70000]
MARGINS = [6.0, 12.0, 20.0, 26.0]  # label logit above the others: losses from 1e-1 down to 1e-10


def confident_logits(classes, dtype, seed=0):
    """One row per margin: small random logits, the label's raised by the margin."""
    rng = np.random.default_rng(seed + classes)
    z = rng.normal(size=(len(MARGINS), classes)) * 0.5
    labels = rng.integers(0, classes, size=len(MARGINS))
    z[np.arange(len(MARGINS)), labels] += MARGINS
    return z.astype(dtype), labels


def exact(z, labels):
    """(loss, label gradient) per row in float64: log1p and -sum of the other p_j, from fsum."""
    z = np.asarray(z, np.float64)
    loss, grad = [], []
    for row, y in zip(z, labels):
        others = np.delete(row, y) - row[y]  # y holds the max: every term is < 1
        rest = math.fsum(np.exp(others))
        log_sum = math.log1p(rest)
        loss.append(log_sum)
        grad.append(-math.fsum(np.exp(others - log_sum)))  # p_y - 1 = -(sum of the others' p_j)
    return np.array(loss), np.array(grad)


def assert_relative(actual, expected, rel, what):
    actual = np.asarray(actual, np.float64)
    error = np.abs(actual - expected) / np.abs(expected)
    assert (error <= rel).all(), f"{what}: relative errors {error} (allowed {rel}); got {actual}, exact {expected}"


UNIT_ROUNDOFF = {np.float32: 2.0**-24, np.float64: 2.0**-53}


def allowed_relative(z, labels, dtype):
    """8 ulps for the logs, 4 log2(C) for the sums of C terms, plus |z_j - z_y| ulps: each
    exp(z_j - z_y) is computed in the logits' precision, and rounding z_j - z_y moves it by that
    many ulps (relative)."""
    z = np.asarray(z, np.float64)
    spread = z[np.arange(len(labels)), labels] - z.min(axis=-1)
    return (8 + 4 * np.log2(z.shape[-1]) + spread) * UNIT_ROUNDOFF[dtype]


def check(loss, grad_rows, z, labels, dtype):
    exact_loss, exact_grad = exact(z, labels)
    rel = allowed_relative(z, labels, dtype)
    assert (np.asarray(loss) >= 0).all(), loss
    assert_relative(loss, exact_loss, rel, "loss")
    label_grad = np.asarray(grad_rows, np.float64)[np.arange(len(labels)), labels]
    assert (label_grad < 0).all(), label_grad
    # lse reaches the backward as one float64, m + log_sum: z_y - lse is exact to half an ulp of
    # lse, so the label gradient -(1 - p_y) ~ -log_sum is exact to that absolute error too.
    lse = np.asarray(z, np.float64)[np.arange(len(labels)), labels] + exact_loss
    allowed = np.spacing(np.abs(lse)) + rel * np.abs(exact_grad)
    error = np.abs(label_grad - exact_grad)
    assert (error <= allowed).all(), f"label gradient: errors {error} (allowed {allowed}); got {label_grad}"


def test_check_rejects_planted_errors():
    z, labels = confident_logits(1000, np.float32)
    loss, grad = exact(z, labels)
    grad_rows = np.zeros(z.shape)
    grad_rows[np.arange(len(labels)), labels] = grad
    check(loss.astype(np.float32), grad_rows, z, labels, np.float32)
    with pytest.raises(AssertionError, match="loss"):
        check(loss * (1 + 2e-5), grad_rows, z, labels, np.float32)
    with pytest.raises(AssertionError):  # the sign of a tiny loss
        check(np.where(loss < 1e-8, -loss, loss), grad_rows, z, labels, np.float32)
    grad_rows[0, labels[0]] *= 1 + 2e-5
    with pytest.raises(AssertionError, match="label gradient"):
        check(loss, grad_rows, z, labels, np.float32)


def test_issue_example_is_positive_and_exact():
    """zeros(40) with 22 at the label: the loss was -1.19e-7 (true 1.09e-8) and its gradient positive."""
    z = np.zeros((1, 40), np.float32)
    z[0, 5] = 22
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(np.array([5]), z)
    check(loss, grad, z, [5], np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", CLASSES)
def test_numpy_sparse(classes, dtype):
    z, labels = confident_logits(classes, dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, z)
    check(loss, grad, z, labels, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [10, 33, 5000])
def test_numpy_dense_one_hot(classes, dtype):
    z, labels = confident_logits(classes, dtype)
    onehot = np.eye(classes, dtype=dtype)[labels]
    loss, grad = fxnp.softmax_cross_entropy_with_logits(onehot, z)
    check(loss, grad, z, labels, dtype)


@pytest.mark.parametrize("classes", [10, 1000])
def test_numpy_class_axis_first(classes):
    """Strided rows (class axis not last) take the scalar path."""
    z, labels = confident_logits(classes, np.float32)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, np.ascontiguousarray(z.T), axis=0)
    check(loss, grad.T, z, labels, np.float32)


@pytest.mark.parametrize("lowering", [None, "custom_call", "hlo"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [10, 1000, 70000])
def test_tensorflow(classes, dtype, lowering, monkeypatch):
    z, labels = confident_logits(classes, dtype)
    loss, grad = sparse_loss_and_gradient(labels, z, lowering, monkeypatch)
    check(loss, grad, z, labels, dtype)
