"""Assertion helpers of the tests: element-wise tolerances against the float64 reference
(tests/_support/reference.py) and the terms that size them."""

import numpy as np

from tests._support.reference import ToleranceError  # noqa: F401  (defined there; tests import it from here too)

# Output tolerances per logits dtype, relative to max(1, |reference|).
TOLERANCE = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def _representable(values, dtype_name):
    """The reference as the output dtype can hold it: beyond its range it is +-inf."""
    limit = {"float32": np.finfo(np.float32).max, "float16": 65504.0, "bfloat16": 3.3895e38}.get(dtype_name)
    if limit is None:
        return values
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(values) > limit, np.sign(values) * np.inf, values)


def assert_close(actual, expected, dtype_name, scale=1.0):
    actual = np.asarray(actual, np.float64)
    expected = _representable(np.asarray(expected, np.float64), dtype_name)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOLERANCE[dtype_name] * scale
    both_nan = np.isnan(actual) & np.isnan(expected)
    same_inf = np.isinf(actual) & (actual == expected)
    ok = both_nan | same_inf | (np.abs(actual - expected) <= tol * np.maximum(1.0, np.abs(expected)))
    if not ok.all():
        bad = np.argwhere(~ok)[:5]
        details = [(tuple(i), actual[tuple(i)], expected[tuple(i)]) for i in bad]
        raise AssertionError(f"{(~ok).sum()} of {ok.size} values differ beyond {tol}: {details}")


# --- Issue 14: element-wise tolerances --------------------------------------------------------
#
# assert_close above is absolute below |expected| = 1: a gradient entry of 1e-5 may be 0, or
# 15% off, and pass. assert_rows_close holds every element to its own magnitude instead:
#
#   |actual - expected| <= OUT_ULPS * u_out * |expected|
#                          + ACC_ULPS * u_acc * terms
#                          + ROW_ULPS * u_acc * row_scale
#                          + TINY
#
# u_out is the unit roundoff of the output dtype (rounding the result once), u_acc that of the
# arithmetic (float32 for float16/bfloat16, which the kernels accumulate in float32). `terms`
# is the magnitude of what the formula adds up to make the element (default |expected|: no
# cancellation); a gradient's label entry w*g*(s*p_y - q_y) cancels, so it gets the size of
# w*g*q_y there (target_terms() below), and only that entry. `row_scale` is the largest
# |expected| along the class axis (`axis=None` for per-row values such as losses: no floor); its
# few units keep entries far below the row's largest (p_j of e^-40) from needing full relative
# accuracy, and no more: at float32 a gradient entry of 1e-6 in a row whose largest is 1 must be
# right to about 25%, where assert_close lets it be 0.
# TINY is the spacing of the dtype's subnormals (the smallest normal for bfloat16).

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ARITHMETIC = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}
TINY = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-126}
OUT_ULPS = 2
ACC_ULPS = 32
ROW_ULPS = 4


def rows_tolerance(expected, dtype_name, axis=-1, terms=None, scale=1.0):
    """The allowed |actual - expected| per element (see the comment above)."""
    expected = np.asarray(expected, np.float64)
    magnitude = np.where(np.isfinite(expected), np.abs(expected), 0.0)
    terms = magnitude if terms is None else np.maximum(magnitude, np.where(np.isfinite(terms), np.abs(terms), 0.0))
    if axis is None or expected.ndim == 0 or expected.size == 0:
        row_scale = 0.0
    else:
        row_scale = np.max(magnitude, axis=axis, keepdims=True)
    u_out, u_acc = UNIT_ROUNDOFF[dtype_name], UNIT_ROUNDOFF[ARITHMETIC[dtype_name]]
    return scale * (
        OUT_ULPS * u_out * magnitude + ACC_ULPS * u_acc * terms + ROW_ULPS * u_acc * row_scale + TINY[dtype_name]
    )


def assert_rows_close(actual, expected, dtype_name, axis=-1, terms=None, scale=1.0, what="values", known=None):
    """Element-wise comparison with a float64 reference; NaN and +-inf must match exactly.

    `known` (broadcastable to `expected`) marks elements a known kernel issue may spoil: a
    difference there raises ToleranceError (what xfail(raises=ToleranceError) expects), and a
    difference anywhere else a plain AssertionError, which such an xfail does not excuse."""
    actual = np.asarray(actual, np.float64)
    expected = _representable(np.asarray(expected, np.float64), dtype_name)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = rows_tolerance(expected, dtype_name, axis, terms, scale)
    with np.errstate(invalid="ignore"):
        both_nan = np.isnan(actual) & np.isnan(expected)
        same_inf = np.isinf(actual) & (actual == expected)
        ok = both_nan | same_inf | (np.abs(actual - expected) <= tol)
    if not ok.all():
        bad = np.argwhere(~ok)[:6]
        details = [
            f"{tuple(int(k) for k in i)}: got {actual[tuple(i)]!r}, expected {expected[tuple(i)]!r}, "
            f"allowed {np.broadcast_to(tol, expected.shape)[tuple(i)]:.3g}"
            for i in bad
        ]
        message = f"{what} ({dtype_name}): {(~ok).sum()} of {ok.size} differ:\n  " + "\n  ".join(details)
        if known is not None and not np.broadcast_to(known, ok.shape)[~ok].all():
            raise AssertionError("outside the known-issue elements: " + message)
        raise ToleranceError(message)


def target_terms(
    labels, shape, axis=-1, ignore_index=None, label_smoothing=0.0, class_weights=None, grad_loss=None, z_loss=0.0
):
    """|w * g * q_j|, the target term of a sparse gradient, shaped like the logits (for `terms`)."""
    classes = shape[axis]
    labels = np.asarray(labels).astype(np.int64)
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    safe = np.where(ignored, 0, labels)
    weight = np.ones(labels.shape) if class_weights is None else np.asarray(class_weights, np.float64)[safe]
    weight = np.where(ignored, 0.0, weight)
    if grad_loss is not None:
        weight = weight * np.abs(np.asarray(grad_loss, np.float64))
    onehot = np.zeros(labels.shape + (classes,))
    np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
    q = (1 - label_smoothing) * onehot + label_smoothing / classes
    return np.moveaxis(np.abs(weight)[..., None] * q, -1, axis)


def dense_target_terms(labels, shape, axis=-1, label_smoothing=0.0, grad_loss=None):
    """|g * q_j| of a dense-label gradient, shaped like the logits."""
    t = np.moveaxis(np.broadcast_to(np.asarray(labels, np.float64), shape), axis, -1)
    q = (1 - label_smoothing) * t + label_smoothing / t.shape[-1]
    g = np.ones(q.shape[:-1]) if grad_loss is None else np.abs(np.asarray(grad_loss, np.float64))
    return np.moveaxis(np.abs(g[..., None] * q), -1, axis)


def label_gradient_terms(logits, grad_loss=None, label_smoothing=0.0, axis=-1):
    """|g (1 - eps)| (|lse| + |z_j|): the terms of the dense label gradient g (1 - eps)(lse - z_j)."""
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lse = m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        g = np.ones(z.shape[:-1]) if grad_loss is None else np.abs(np.asarray(grad_loss, np.float64))
        terms = (g * (1 - label_smoothing))[..., None] * (np.abs(lse) + np.abs(z))
    return np.moveaxis(terms, -1, axis)


def assert_float32_close(ours, theirs, rtol=2e-6, atol=1e-6, what=""):
    """float32 values computed two ways (ours and Keras's or tf_keras's): equal to a few float32 roundings."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=what)
