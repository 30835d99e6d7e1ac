"""The comparison helpers can fail: planted errors in reference gradients are caught by
assert_rows_close (tests/_support/assertions.py), and the first of them slips through the older assert_close.
Nothing here runs the kernels: the 'actual' values are the float64 reference rounded to the
dtype, then damaged on purpose."""

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import ToleranceError, assert_close, assert_rows_close, target_terms

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if ml_dtypes else [])


def _rounded(values, dtype_name):
    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    return np.asarray(values).astype(dtype).astype(np.float64)


def _row(dtype_name, classes=1000, seed=0):
    """A C=1000 gradient row (and its neighbours) from the reference, as the dtype holds it."""
    rng = np.random.default_rng(seed)
    spread = 8.0 if dtype_name == "float64" else 3.0  # float64: entries below 1e-12 too
    logits = _rounded(rng.normal(size=(3, classes)) * spread, dtype_name)
    labels = np.array([17, 500, 999])
    loss, grad = reference.sparse(labels, logits)
    return labels, logits, loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_rounding_passes(dtype):
    labels, logits, loss, grad = _row(dtype)
    terms = target_terms(labels, logits.shape)
    assert_rows_close(_rounded(grad, dtype), grad, dtype, terms=terms)
    assert_rows_close(_rounded(loss, dtype), loss, dtype, axis=None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeroed_small_probabilities_are_caught_and_assert_close_missed_them(dtype):
    labels, logits, _, grad = _row(dtype)
    terms = target_terms(labels, logits.shape)
    actual = _rounded(grad, dtype)
    # Entries below assert_close's absolute tolerance, but not so small that a few
    # roundings of the row's largest value cover them.
    small = np.abs(grad) < {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    small &= np.abs(grad) > 8 * np.finfo(np.float64 if dtype == "float64" else np.float32).eps
    assert small.sum() >= 20, small.sum()  # many entries of the rows
    actual[small] = 0.0
    assert_close(actual, grad, dtype)  # the old comparison lets every one of them be 0
    with pytest.raises(ToleranceError, match=r"differ"):
        assert_rows_close(actual, grad, dtype, terms=terms)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_percent_error_in_one_small_entry_is_caught(dtype):
    labels, logits, _, grad = _row(dtype)
    terms = target_terms(labels, logits.shape)
    actual = _rounded(grad, dtype)
    # The smallest entry the dtype can hold to better than 1% (its rounding is 2^-11 or 2^-8
    # for float16/bfloat16, so those get 2% and 4%) and that is above the row's floor.
    error = {"float64": 0.01, "float32": 0.01, "float16": 0.02, "bfloat16": 0.04}[dtype]
    candidates = np.argwhere((np.abs(grad) > 1e-5) & (np.abs(grad) < 1e-3))
    index = tuple(candidates[0])
    actual[index] = _rounded(grad[index] * (1 + error), dtype)
    with pytest.raises(ToleranceError, match=r"1 of 3000 differ"):
        assert_rows_close(actual, grad, dtype, terms=terms)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_flipped_sign_is_caught(dtype):
    labels, logits, _, grad = _row(dtype)
    terms = target_terms(labels, logits.shape)
    actual = _rounded(grad, dtype)
    index = tuple(np.argwhere((np.abs(grad) > 1e-4) & (np.abs(grad) < 1e-2))[0])
    actual[index] = -actual[index]
    with pytest.raises(ToleranceError, match=r"1 of 3000 differ"):
        assert_rows_close(actual, grad, dtype, terms=terms)


def test_label_entry_of_a_confident_row_may_be_off_by_roundings_of_its_terms_only():
    """p_y - 1 of a confident row cancels: it gets the rounding of 1, and no other entry does."""
    logits = np.zeros((1, 40))
    logits[0, 3] = 12.0
    labels = np.array([3])
    _, grad = reference.sparse(labels, logits)
    terms = target_terms(labels, logits.shape)
    actual = grad.astype(np.float32).astype(np.float64)
    actual[0, 3] += 2.0**-24  # half a unit of 1 in float32: what rounding p_y costs
    assert_rows_close(actual, grad, "float32", terms=terms)
    actual[0, 5] += 2.0**-24  # the same absolute error on an off-label entry (2.4e-7 of 6e-6)
    with pytest.raises(ToleranceError):
        assert_rows_close(actual, grad, "float32", terms=terms)


def test_small_loss_is_held_to_its_own_magnitude():
    """A loss of 1.1e-8 computed as -1e-8 (issue 14's case a) is caught; a rounding is not."""
    logits = np.zeros((1, 40))
    logits[0, 3] = 22.0
    loss, _ = reference.sparse(np.array([3]), logits)
    assert 1e-8 < loss[0] < 2e-8
    assert_rows_close(np.float32(loss), loss, "float32", axis=None)
    assert_close(-loss, loss, "float32")  # the old comparison accepts the wrong sign
    with pytest.raises(ToleranceError):
        assert_rows_close(-loss, loss, "float32", axis=None)


def test_nan_and_infinity_patterns_must_match():
    expected = np.array([[1.0, np.nan, np.inf], [-np.inf, 0.5, 0.25]])
    assert_rows_close(expected.copy(), expected, "float32")
    for index, value in [((0, 1), 0.0), ((0, 2), 1e30), ((1, 0), np.nan), ((1, 1), np.nan), ((0, 2), -np.inf)]:
        actual = expected.copy()
        actual[index] = value
        with pytest.raises(ToleranceError):
            assert_rows_close(actual, expected, "float32")
