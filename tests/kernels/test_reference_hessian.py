"""The float64 Hessian-vector references (reference.sparse_hvp, dense_hvp) that the second-order
tests compare with, checked against central differences of reference.py's first-order gradients,
and shown to reject a 1% error. NumPy only: no kernels run here."""

import numpy as np
import pytest

from tests._support import reference

C = 5
SPARSE_OPTIONS = [
    {},
    {"label_smoothing": 0.25},
    {"z_loss": 0.0625},
    {"ignore_index": 1},
    {"label_smoothing": 0.125, "z_loss": 0.03125, "ignore_index": -100, "class_weights": [0.5, 2.0, 1.0, 3.0, 0.25]},
]
# Central differences with h = 1e-5: truncation h^2/6 |g'''| ~ 1e-9 for these O(10) derivatives,
# cancellation ~ 1e-16 |g| / h ~ 1e-10; 1e-7 of max(1, |value|) leaves margin and is 1e5 times
# below a 1% error.
H, FD_TOL = 1e-5, 1e-7


def _central(f, z, v):
    return (f(z + H * v) - f(z - H * v)) / (2 * H)


def _close(actual, expected, tol=FD_TOL):
    return np.all(np.abs(actual - expected) <= tol * np.maximum(1.0, np.abs(expected)))


def _case(seed=0, rows=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, C)) * 3.0, rng.normal(size=(rows, C))


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_sparse_hvp_matches_differences_of_the_reference_gradient(options, power):
    z, v = _case()
    labels = np.array([0, 3, options.get("ignore_index", 1), 4, 1, 2])  # an ignored row if any

    def grad_total(x):
        loss, _ = reference.sparse(labels, x, **options)
        return reference.sparse(labels, x, grad_loss=power * loss ** (power - 1), **options)[1]

    total, hv = reference.sparse_hvp(labels, z, v, power=power, **options)
    np.testing.assert_allclose(total, np.sum(reference.sparse(labels, z, **options)[0] ** power), rtol=1e-14)
    numerical = _central(grad_total, z, v)
    assert np.abs(hv).max() > 0.1
    assert _close(hv, numerical)
    assert not _close(hv * (1 + 0.01 * (np.arange(hv.size) == np.argmax(np.abs(hv))).reshape(hv.shape)), numerical)
    # axis=0 is the same numbers transposed
    np.testing.assert_array_equal(reference.sparse_hvp(labels, z.T, v.T, axis=0, power=power, **options)[1], hv.T)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.375, "z_loss": 0.0625}], ids=["defaults", "options"])
def test_dense_hvp_and_label_derivative_match_differences(options, power):
    z, v = _case(1)
    t = np.random.default_rng(2).dirichlet(np.ones(C), size=6)

    def grad_total(x, labels):
        loss, _, _ = reference.dense(labels, x, **options)
        return reference.dense(labels, x, grad_loss=power * loss ** (power - 1), **options)[1]

    _, hv, d_labels = reference.dense_hvp(t, z, v, power=power, **options)
    assert _close(hv, _central(lambda x: grad_total(x, t), z, v))
    # d(grad_total . v)/dt_ij, one label entry at a time
    numerical = np.zeros_like(t)
    for index in np.ndindex(t.shape):
        e = np.zeros_like(t)
        e[index] = 1.0
        numerical[index] = np.sum(_central(lambda s: grad_total(z, s), t, e) * v)  # noqa: B023
    assert _close(d_labels, numerical)
    planted = d_labels.copy()
    planted.flat[np.argmax(np.abs(planted))] *= 1.01
    assert not _close(planted, numerical)


def test_magnitudes_bound_the_values():
    """magnitudes=True (the `terms` of assert_rows_close) is at least each value's size."""
    z, v = _case(3)
    labels = np.array([0, 3, 1, 4, 1, 2])
    options = SPARSE_OPTIONS[-1]
    for power in (1, 2):
        values = reference.sparse_hvp(labels, z, v, power=power, **options)
        sizes = reference.sparse_hvp(labels, z, v, power=power, magnitudes=True, **options)
        assert all(np.all(s >= np.abs(x) * (1 - 1e-12)) for x, s in zip(values, sizes))
        t = np.random.default_rng(4).dirichlet(np.ones(C), size=6)
        values = reference.dense_hvp(t, z, v, 0.375, 0.0625, power=power)
        sizes = reference.dense_hvp(t, z, v, 0.375, 0.0625, power=power, magnitudes=True)
        assert all(np.all(s >= np.abs(x) * (1 - 1e-12)) for x, s in zip(values, sizes))
