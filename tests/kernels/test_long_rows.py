"""Long rows, read in blocks: the CPU forward reads each block once, relative to the
running max of what came before (for the first block, the max of its first vector), and
falls back to two reads when a block's max jumps far above it, is +inf or NaN. Each row
below steers one of those paths."""

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support import reference
from tests._support.assertions import assert_rows_close, dense_target_terms, target_terms

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

CLASSES = 12000  # six blocks of 2048, the last one partial
BLOCK = 2048
DTYPES = [np.float32, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])


def _rows(dtype):
    rng = np.random.default_rng(11)
    z = rng.normal(size=(14, CLASSES)) * 2
    j = np.arange(CLASSES)
    z[0] = j * 0.02  # max rises every block, less than the fallback margin
    z[1, 3 * BLOCK + 7] = 150.0  # one block jumps far above the running max
    z[2, 4 * BLOCK + 1] = np.nan  # NaN in a later block
    z[3, 2 * BLOCK + 5] = np.inf  # +inf in a later block
    z[4, :BLOCK] = -np.inf  # first block all -inf: no reference max yet
    z[5, BLOCK : 2 * BLOCK] = -np.inf  # a later block all -inf
    z[6, BLOCK:] -= 300.0  # later blocks far below: their terms vanish
    z[7] = z[7] * 1e3 + 1e4  # large magnitudes
    z[8] = -j * 0.05  # max in the first element
    z[9, -1] = 60.0  # the max in the last, partial block
    z[10, 2 * BLOCK :] += 63.0  # a rise just under the fallback margin
    z[11, 2 * BLOCK :] += 65.0  # and just over it
    z[12, 700] = 90.0  # the first block rises far above its first vector
    z[13, :8] = -np.inf  # first vector all -inf: no reference max yet
    if np.dtype(dtype) == np.float16:
        z = np.where(np.isfinite(z), np.clip(z, -6e4, 6e4), z)
        z[7] = rng.normal(size=CLASSES) * 50 + 1e3
    return z.astype(dtype)


def _check_finite(loss, options):
    # Smoothing puts weight on every class: a -inf logit makes that loss +inf.
    finite = [0, 1, 6, 8, 9, 10, 11, 12] + ([] if options else [4, 5, 13])
    assert np.isfinite(loss[finite]).all(), loss


def _name(dtype):
    return np.dtype(dtype).name


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.25, "z_loss": 1e-3}], ids=["plain", "smooth_zloss"])
def test_sparse_long_rows(dtype, options):
    logits = _rows(dtype)
    labels = np.random.default_rng(12).integers(0, CLASSES, size=len(logits))
    labels[1] = 3 * BLOCK + 7
    labels[4], labels[5], labels[13] = BLOCK + 3, 0, 100  # not on a -inf logit
    grad_loss = np.linspace(-1.0, 2.0, len(logits)).astype(np.float32)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(
        labels, logits, grad_loss=grad_loss.astype(dtype), **options
    )
    expected = {k: float(np.float32(v)) for k, v in options.items()}
    ref_loss, ref_grad = reference.sparse(
        labels, logits.astype(np.float64), grad_loss=grad_loss.astype(dtype).astype(np.float64), **expected
    )
    name = _name(dtype)
    terms = target_terms(labels, logits.shape, grad_loss=grad_loss.astype(dtype), **expected)
    assert_rows_close(loss, ref_loss, name, axis=None, what="loss")
    assert_rows_close(grad, ref_grad, name, terms=terms, what="gradient")
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    assert np.isnan(loss[3])
    _check_finite(loss, options)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.25, "z_loss": 1e-3}], ids=["plain", "smooth_zloss"])
def test_dense_long_rows(dtype, options):
    logits = _rows(dtype)
    rng = np.random.default_rng(13)
    labels = rng.random(size=logits.shape)
    labels[:, ::7] = 0.0
    labels[4, :BLOCK] = 0.0  # no target mass on the -inf logits
    labels[5, BLOCK : 2 * BLOCK] = 0.0
    labels[13, :8] = 0.0
    labels = (labels / labels.sum(-1, keepdims=True)).astype(dtype)
    grad_loss = np.linspace(-1.0, 2.0, len(logits)).astype(dtype)
    loss, grad = fxnp.softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss, **options)
    expected = {k: float(np.float32(v)) for k, v in options.items()}
    ref_loss, ref_grad, _ = reference.dense(
        labels.astype(np.float64), logits.astype(np.float64), grad_loss=grad_loss.astype(np.float64), **expected
    )
    name = _name(dtype)
    terms = dense_target_terms(
        labels.astype(np.float64),
        logits.shape,
        grad_loss=grad_loss,
        label_smoothing=expected.get("label_smoothing", 0.0),
    )
    assert_rows_close(loss, ref_loss, name, axis=None, what="loss")
    assert_rows_close(grad, ref_grad, name, terms=terms, what="gradient")
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    _check_finite(loss, options)


@pytest.mark.parametrize("dtype", [np.float32] + DTYPES[1:], ids=_name)
def test_gradients_large_enough_to_stream(dtype):
    # Gradients over 8 MiB are written with streaming stores, whole cache lines only,
    # plain stores at the row's ends; an odd row length puts every row start at another alignment.
    rng = np.random.default_rng(14)
    shape = (9, 600001)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    labels = rng.integers(0, shape[1], size=shape[0])
    labels[:4] = [0, shape[1] - 1, 17, shape[1] - 20]  # in the plain-stored partial lines at the ends
    dense = rng.random(size=shape)
    dense = (dense / dense.sum(-1, keepdims=True)).astype(dtype)
    grad_loss = np.linspace(0.5, 1.5, shape[0]).astype(dtype)
    name = _name(dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss)
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64), grad_loss=grad_loss.astype(np.float64))
    assert_rows_close(loss, ref_loss, name, axis=None, what="loss")
    assert_rows_close(grad, ref_grad, name, terms=target_terms(labels, shape, grad_loss=grad_loss), what="gradient")
    loss, grad = fxnp.softmax_cross_entropy_with_logits(dense, logits, grad_loss=grad_loss)
    ref_loss, ref_grad, _ = reference.dense(
        dense.astype(np.float64), logits.astype(np.float64), grad_loss=grad_loss.astype(np.float64)
    )
    assert_rows_close(loss, ref_loss, name, axis=None, what="loss")
    terms = dense_target_terms(dense.astype(np.float64), shape, grad_loss=grad_loss)
    assert_rows_close(grad, ref_grad, name, terms=terms, what="gradient")


def test_logits_near_float_max():
    # lse near 3e38: its float64 low part is ~1e31, so it must be subtracted, not exponentiated.
    # (A row of all 3e38 is left out: the float64 reference itself rounds log(C) away there.)
    logits = np.random.default_rng(15).normal(size=(3, CLASSES)).astype(np.float32)
    logits[0, 5] = 3e38
    logits[1, 2 * BLOCK + 9] = -3e38
    logits[2, 3 * BLOCK + 1] = 2.5e38
    labels = np.array([5, 7, 3 * BLOCK + 1])
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=np.ones(3, np.float32))
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64))
    assert_rows_close(loss, ref_loss, "float32", axis=None, what="loss")
    assert_rows_close(grad, ref_grad, "float32", terms=target_terms(labels, logits.shape), what="gradient")
