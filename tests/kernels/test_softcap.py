"""Final-logit softcap in the CPU kernels (through fused_xent.numpy and the bindings): the loss of
cap * tanh(x / cap) and its gradient for x, against the float64 composite (tests/_support/reference),
on every path a row can take (contiguous, strided, few classes, long rows, 16-bit types, shards)."""

import numpy as np
import pytest

from fused_xent import _core
from fused_xent import numpy as fxn
from tests._support import reference
from tests._support.assertions import assert_close

DTYPES = ["float64", "float32", "float16", "bfloat16"]
# Shapes with the class axis last and not; few classes (rows vectorized together without a cap),
# a long row (blocks of L1), and odd sizes (vector tails).
SHAPES = [((7, 33), -1), ((64, 5), -1), ((3, 40000), -1), ((4, 9, 6), 1), ((2, 17, 3), 0)]
OPTIONS = [
    {},
    dict(label_smoothing=0.125, z_loss=0.0009765625),
    dict(ignore_index=2, class_weights=True, label_smoothing=0.25),
]


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _data(shape, axis, dtype, seed=0, scale=12.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * scale).astype(_dtype(dtype))
    classes = shape[axis]
    label_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    labels = rng.integers(0, classes, label_shape)
    return logits, labels


def _options(options, classes, rng_seed=1):
    options = dict(options)
    if options.pop("class_weights", False):
        options["class_weights"] = np.random.default_rng(rng_seed).uniform(0.5, 2.0, classes).astype(np.float32)
    return options


def _scale(dtype, cap):
    # The kernel rounds the capped logits (|z| < cap) to its arithmetic once: cap ulps of them.
    return {"float64": 64.0, "float32": 8.0}.get(dtype, 1.0) * max(1.0, cap / 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("cap", [3.0, 30.0])
def test_sparse_equals_the_capped_composite(dtype, shape, axis, options, cap):
    logits, labels = _data(shape, axis, dtype)
    options = _options(options, shape[axis])
    loss, grad = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits, axis=axis, softcap=cap, **options)
    expected_loss, expected_grad = reference.sparse_softcap(
        labels, logits.astype(np.float64), cap, axis=axis, **options
    )
    assert_close(loss, expected_loss, dtype, scale=_scale(dtype, cap))
    assert_close(grad, expected_grad, dtype, scale=_scale(dtype, cap))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("cap", [3.0, 30.0])
def test_dense_equals_the_capped_composite(dtype, shape, axis, cap):
    logits, _ = _data(shape, axis, dtype)
    rng = np.random.default_rng(3)
    labels = rng.uniform(0, 1, shape)
    labels = (labels / labels.sum(axis, keepdims=True)).astype(_dtype(dtype))
    options = dict(label_smoothing=0.125, z_loss=0.0009765625)
    loss, grad = fxn.softmax_cross_entropy_with_logits(labels, logits, axis=axis, softcap=cap, **options)
    expected = reference.dense_softcap(labels.astype(np.float64), logits.astype(np.float64), cap, axis=axis, **options)
    assert_close(loss, expected[0], dtype, scale=_scale(dtype, cap))
    assert_close(grad, expected[1], dtype, scale=_scale(dtype, cap))


def test_extreme_logits():
    """+-inf logits read as +-cap (slope 0), huge ones saturate, NaN stays NaN (its row only)."""
    cap = 5.0
    logits = np.array(
        [[np.inf, 0.0, 1.0, -np.inf], [1e30, -1e30, 3.0, 0.0], [np.nan, 1.0, 2.0, 3.0], [1e-30, -2e-30, 0.0, 1e-8]],
        np.float32,
    )
    labels = np.array([0, 1, 2, 3])
    loss, grad = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits, softcap=cap)
    expected_loss, expected_grad = reference.sparse_softcap(labels, logits.astype(np.float64), cap)
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    keep = [0, 1, 3]
    assert_close(loss[keep], expected_loss[keep], "float32", scale=4)
    assert_close(grad[keep], expected_grad[keep], "float32", scale=4)
    assert grad[0, 0] == 0 and grad[0, 3] == 0 and grad[1, 0] == 0 and grad[1, 1] == 0  # saturated: slope 0


def test_slope_keeps_its_relative_accuracy_near_saturation():
    """Where tanh is near 1, 1 - tanh^2 would cancel in float32; the kernel's 4e / (1 + e)^2 does not."""
    cap = 2.0
    logits = np.array([[9.0, 0.0, -1.0]], np.float32)  # slope at 9: 4.9e-4
    _, grad = fxn.sparse_softmax_cross_entropy_with_logits(np.array([1]), logits, softcap=cap)
    _, expected = reference.sparse_softcap(np.array([1]), logits.astype(np.float64), cap)
    assert abs(grad[0, 0] - expected[0, 0]) <= 4e-6 * abs(expected[0, 0])


def test_no_cap_is_bitwise_the_uncapped_kernel():
    logits, labels = _data((16, 1000), -1, "float32")
    plain = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    none = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits, softcap=None)
    for a, b in zip(plain, none):
        assert np.array_equal(a, b)
    capped = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits, softcap=30.0)
    assert not np.array_equal(plain[0], capped[0])


@pytest.mark.parametrize("value", [0, 0.0, -1.0, np.nan, np.inf, 1e300, "a", True, [3.0], 1e-45])
def test_bad_softcap_is_refused(value):
    logits, labels = _data((2, 5), -1, "float32")
    with pytest.raises(ValueError, match="softcap must be None"):
        fxn.sparse_softmax_cross_entropy_with_logits(labels, logits, softcap=value)
    with pytest.raises(ValueError, match="softcap must be None"):
        fxn.softmax_cross_entropy_with_logits(np.eye(5)[labels], logits, softcap=value)


def test_bindings_refuse_a_negative_cap():
    logits, labels = _data((2, 5), -1, "float32")
    loss, lse = np.empty(2, np.float32), np.empty(2)
    with pytest.raises(ValueError, match="softcap must be finite and >= 0"):
        _core.sparse_forward("float32", logits, labels, 2, 5, 1, 0.0, 0.0, None, None, loss, lse, softcap=-1.0)


@pytest.mark.parametrize("inner", [1, 3])
def test_shards_of_capped_rows_combine_to_the_whole_row(inner):
    """Vocabulary-parallel shards with a cap: each shard's (loss part, lse) combined as
    docs/distributed.md says gives the capped whole row's loss; the gradient shard by shard."""
    cap, rows, classes, shards = 4.0, 6, 20, 4
    rng = np.random.default_rng(5)
    z = rng.standard_normal((rows, classes)) * 6
    y = rng.integers(0, classes, rows)
    expected_loss, expected_grad = reference.sparse_softcap(y, z, cap)
    width = classes // shards
    # the kernels' buffers: shard s's classes as [outer, width, inner], labels local or absent (-7)
    blocks = [
        np.ascontiguousarray(z[:, s * width : (s + 1) * width].reshape(rows // inner, inner, width).transpose(0, 2, 1))
        for s in range(shards)
    ]
    here = [(y >= s * width) & (y < (s + 1) * width) for s in range(shards)]
    locals_ = [np.where(here[s], y - s * width, -7) for s in range(shards)]
    layout = dict(outer=rows // inner, classes=width, inner=inner, label_smoothing=0.0, z_loss=0.0)
    shard = dict(ignore_index=None, class_weights=None, total_classes=classes, absent_label=-7, softcap=cap)
    parts, lses = [], []
    for block, local in zip(blocks, locals_):
        loss, lse = np.empty(rows), np.empty(rows)
        _core.sparse_forward("float64", block, local, loss=loss, lse=lse, **layout, **shard)
        parts.append(loss)
        lses.append(lse)
    lse = np.logaddexp.reduce(np.stack(lses), axis=0)
    combined = sum(p + q * (lse - shard_lse) for p, q, shard_lse in zip(parts, here, lses))
    np.testing.assert_allclose(combined, expected_loss, rtol=1e-12)
    for s, (block, local) in enumerate(zip(blocks, locals_)):
        grad = np.empty_like(block)
        _core.sparse_backward(
            "float64", block, local, lse=lse, grad_loss=np.ones(rows), grad_logits=grad, **layout, **shard
        )
        got = grad.transpose(0, 2, 1).reshape(rows, width)
        np.testing.assert_allclose(got, expected_grad[:, s * width : (s + 1) * width], rtol=1e-10, atol=1e-15)


def test_comparison_rejects_an_uncapped_loss():
    """The reference and tolerance above tell a capped loss from an uncapped one (a test that can fail)."""
    logits, labels = _data((7, 33), -1, "float32")
    loss, _ = fxn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    expected_loss, _ = reference.sparse_softcap(labels, logits.astype(np.float64), 30.0)
    with pytest.raises(AssertionError):
        assert_close(loss, expected_loss, "float32", scale=_scale("float32", 30.0))
