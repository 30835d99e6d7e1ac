import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


def tf_or_skip():
    return pytest.importorskip("tensorflow")


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
