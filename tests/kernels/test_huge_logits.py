"""Rows whose max logit is huge: lse = m + log_sum, rounded to float64, loses log_sum once |m| is
beyond about 2^53 log_sum (tied maxima of 1e17: lse == m, so each got p = exp(m - lse) = 1 and
the gradient was 1 - 1 = 0 at the label instead of -1/2). The CPU backward sums such rows again
(kRoundedLse in cc/core/cpu_kernels_target.cc). The HLO lowering and the CUDA kernels still take
p from the rounded lse (README, Limits)."""

import math

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support import reference
from tests._support.assertions import assert_rows_close, target_terms
from tests._support.runners import sparse_loss_and_gradient

CLASSES = [3, 40, 3000]  # row groups, one block, blocks of 2048
HUGE = {np.float32: [1e9, 1e17, 3e38], np.float64: [1e9, 1e17, 1e300]}


def tied_maxima(classes, dtype, big):
    """Rows with two tied maxima `big` (classes 0 and 1), one just below, the rest 0; labels 0."""
    z = np.zeros((4, classes), dtype)
    z[:, 0] = z[:, 1] = big
    z[:, 2] = dtype(big) * dtype(1 - 1e-3)
    return z, np.zeros(4, np.int64)


def check(loss, grad, z, labels, dtype):
    name = np.dtype(dtype).name
    assert_rows_close(loss, np.full(4, math.log(2)), name, axis=None, what="loss")
    expected = np.zeros(z.shape)
    expected[:, 0], expected[:, 1] = -0.5, 0.5
    assert_rows_close(grad, expected, name, terms=target_terms(labels, z.shape), what="gradient")
    ref_loss, ref_grad = reference.sparse(labels, z.astype(np.float64))  # the reference agrees
    np.testing.assert_allclose(ref_grad, expected, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", CLASSES)
def test_tied_huge_maxima_numpy(classes, dtype):
    for big in HUGE[dtype]:
        z, labels = tied_maxima(classes, dtype, big)
        loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, z)
        check(loss, grad, z, labels, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tied_huge_maxima_dense_numpy(dtype):
    for big in HUGE[dtype]:
        z, labels = tied_maxima(40, dtype, big)
        loss, grad = fxnp.softmax_cross_entropy_with_logits(np.eye(40, dtype=dtype)[labels], z)
        check(loss, grad, z, labels, dtype)


@pytest.mark.parametrize("lowering", [None, "custom_call"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [3, 3000])
def test_tied_huge_maxima_tensorflow(classes, dtype, lowering, monkeypatch):
    z, labels = tied_maxima(classes, dtype, 1e17)
    loss, grad = sparse_loss_and_gradient(labels, z, lowering, monkeypatch)
    check(loss, grad, z, labels, dtype)
