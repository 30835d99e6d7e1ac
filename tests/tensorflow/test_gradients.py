"""First- and second-order gradients against finite differences (float64)."""

import numpy as np
import pytest

from tests._support import reference
from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402


def _max_error(theoretical, numerical):
    """Largest difference, relative to the Jacobian's scale (finite differences have relative error)."""
    return max(np.max(np.abs(t - n)) / max(1.0, np.max(np.abs(n))) for t, n in zip(theoretical, numerical))


def _logits(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape) * 2.0)


SPARSE_CASES = [
    {},
    {"label_smoothing": 0.25},
    {"z_loss": 0.1},
    {"ignore_index": 1},
    {"class_weights": [0.5, 2.0, 1.0, 3.0, 0.25]},
    {"label_smoothing": 0.1, "z_loss": 0.05, "ignore_index": 0, "class_weights": [1.0, 2.0, 3.0, 4.0, 5.0]},
]


def _case_id(case):
    return ",".join(case) or "defaults"


@pytest.mark.parametrize("options", SPARSE_CASES, ids=_case_id)
def test_sparse_first_order(options):
    labels = np.array([0, 1, 4, 2, 1, 3])
    weights = tf.constant(np.random.default_rng(1).normal(size=6))

    def loss(x):
        return tf.reduce_sum(weights * fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, **options))

    theoretical, numerical = tf.test.compute_gradient(loss, [_logits((6, 5))])
    assert _max_error(theoretical, numerical) < 1e-7


@pytest.mark.parametrize("options", SPARSE_CASES, ids=_case_id)
def test_sparse_second_order(options):
    labels = np.array([0, 1, 4, 2, 1, 3])
    direction = tf.constant(np.random.default_rng(2).normal(size=(6, 5)))

    def directional_derivative(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, **options) ** 2)
        return tf.reduce_sum(tape.gradient(loss, x) * direction)

    theoretical, numerical = tf.test.compute_gradient(directional_derivative, [_logits((6, 5))])
    assert _max_error(theoretical, numerical) < 1e-6


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3}, {"z_loss": 0.1}], ids=_case_id)
def test_dense_first_and_second_order_in_logits_and_labels(options):
    labels = tf.constant(np.random.default_rng(3).random((4, 5)))

    def loss(x, t):
        return tf.reduce_sum(fused_xent.softmax_cross_entropy_with_logits(t, x, **options) ** 2)

    theoretical, numerical = tf.test.compute_gradient(loss, [_logits((4, 5)), labels])
    assert _max_error(theoretical, numerical) < 1e-6

    direction = tf.constant(np.random.default_rng(4).normal(size=(4, 5)))

    def gradient_dot_direction(x, t):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(x, t)
        return tf.reduce_sum(tape.gradient(value, x) * direction)

    theoretical, numerical = tf.test.compute_gradient(gradient_dot_direction, [_logits((4, 5)), labels])
    assert _max_error(theoretical, numerical) < 1e-6


@pytest.mark.parametrize("axis", [0, -2])
def test_second_order_with_class_axis(axis):
    labels = np.array([[0, 2], [1, 1], [3, 0]])  # shape (3, 2): 4 classes on axis 1 (-2) or 0 of (4, 3, 2)

    def loss(x):
        per_example = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, axis=axis, label_smoothing=0.1)
        return tf.reduce_sum(per_example**2)

    shape = (3, 4, 2) if axis == -2 else (4, 3, 2)
    x = _logits(shape)

    def gradient_norm(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            value = loss(v)
        return tf.reduce_sum(tape.gradient(value, v) ** 2)

    theoretical, numerical = tf.test.compute_gradient(gradient_norm, [x])
    assert _max_error(theoretical, numerical) < 1e-6


def test_hessian_vector_product_matches_explicit_hessian():
    x = _logits((3, 4))
    labels = np.array([1, 0, 3])
    v = tf.constant(np.random.default_rng(5).normal(size=(3, 4)))
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, z_loss=0.2))
        grad = inner.gradient(loss, x)
    hvp = outer.gradient(grad, x, output_gradients=v)
    # Per row, the Hessian of lse + z lse^2 is (1 + 2 z lse)(diag(p) - p p^T) + 2 z p p^T.
    p = tf.nn.softmax(x).numpy()
    lse = tf.reduce_logsumexp(x, axis=-1).numpy()
    expected = []
    for row in range(3):
        pr = p[row]
        hessian = (1 + 0.4 * lse[row]) * (np.diag(pr) - np.outer(pr, pr)) + 0.4 * np.outer(pr, pr)
        expected.append(hessian @ v.numpy()[row])
    np.testing.assert_allclose(hvp.numpy(), np.array(expected), rtol=1e-5, atol=1e-6)


def test_gradient_penalty_trains_in_tf_function():
    w = tf.Variable(np.random.default_rng(6).normal(size=(3, 4)))
    inputs = tf.constant(np.random.default_rng(7).normal(size=(5, 3)))
    labels = tf.constant([0, 1, 2, 3, 1])

    @tf.function
    def penalised_loss():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                loss = tf.reduce_mean(fused_xent.sparse_softmax_cross_entropy_with_logits(labels, inputs @ w))
            penalty = tf.reduce_sum(inner.gradient(loss, inputs) ** 2)
            total = loss + penalty
        return total, outer.gradient(total, w)

    def reference_loss():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, inputs @ w))
            penalty = tf.reduce_sum(inner.gradient(loss, inputs) ** 2)
            total = loss + penalty
        return total, outer.gradient(total, w)

    ours, reference = penalised_loss(), reference_loss()
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-10)
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-8, atol=1e-12)


HALF_LABELS = [1, 2, 3, 0]
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _gradient_norm_gradient(x, accumulate):
    """d/dx |d loss/dx|^2: a second-order product H (2 grad) through the half-precision paths."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(fused_xent.sparse_softmax_cross_entropy_with_logits(HALF_LABELS, x))
        grad = inner.gradient(loss, x)
        norm = tf.reduce_sum(tf.cast(grad, accumulate) ** 2)
    return outer.gradient(norm, x)


def _float64_product(x64):
    """2 H grad, the float64 reference of _gradient_norm_gradient."""
    _, grad, hessian = reference.sparse_hessian(HALF_LABELS, x64)
    return np.einsum("rjk,rk->rj", hessian, 2 * grad)


def _assert_half_second_order_close(actual, x64, dtype, planted=1.0):
    """actual (computed in dtype) against 2 H grad in float64 at the same (rounded) logits.

    The half result rounds three times to dtype: the first-order gradient v = 2 grad it is fed
    (u |H| |v|), the two addends s p_j v_j and -s p_j (p . v) of the second-order gradient (cast
    to dtype, then summed), and that sum (u |result|); the rest is float32/float64. With
    terms_j = p_j (|v_j| + sum_k p_k |v_k|) >= (|H| |v|)_j and each addend, the error is below
    u (|result| + 2 terms) to first order (seen up to 0.55 of it over 40 seeds)."""
    v = 2 * reference.sparse(HALF_LABELS, x64)[1]
    expected = _float64_product(x64)
    p = np.exp(x64 - reference._lse(x64)[:, None])
    terms = p * (np.abs(v) + np.sum(p * np.abs(v), -1, keepdims=True))
    tol = UNIT_ROUNDOFF[dtype] * (np.abs(expected) + 2 * terms) + 2.0**-24
    error = np.abs(np.asarray(actual, np.float64) * planted - expected)
    assert (error <= tol).all(), (error / tol).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_second_order_matches_float64(dtype):
    x = tf.constant(np.random.default_rng(8).normal(size=(4, 6)), dtype)
    second = _gradient_norm_gradient(x, tf.float32)
    assert second.dtype == x.dtype and second.shape == x.shape
    x64 = tf.cast(x, tf.float64)  # the rounded logits: both see the same values
    # The same computation in float64 is the reference formula to rounding ...
    np.testing.assert_allclose(
        _gradient_norm_gradient(x64, tf.float64).numpy(), _float64_product(x64.numpy()), rtol=1e-12, atol=1e-15
    )
    # ... and the half result is it, to the roundings above.
    _assert_half_second_order_close(tf.cast(second, tf.float64).numpy(), x64.numpy(), dtype)


@pytest.mark.parametrize("dtype,planted", [("float16", 1.01), ("bfloat16", 1.03)])
def test_half_precision_second_order_check_rejects_a_planted_error(dtype, planted):
    """The float64 value rounded to dtype passes; scaled by `planted` it fails. bfloat16 has 8
    significant bits: its three roundings allow up to 3 u (1.2%) where the terms do not cancel,
    so 1% cannot be told from rounding there; 3% (8 units of roundoff) is caught."""
    x64 = tf.cast(tf.constant(np.random.default_rng(8).normal(size=(4, 6)), dtype), tf.float64).numpy()
    rounded = tf.cast(tf.cast(_float64_product(x64), dtype), tf.float64).numpy()
    _assert_half_second_order_close(rounded, x64, dtype)
    with pytest.raises(AssertionError):
        _assert_half_second_order_close(rounded, x64, dtype, planted=planted)


@pytest.mark.parametrize("ignore_index", [2**32, -(2**32) - 5, 2**70])
def test_hessian_vector_product_with_ignore_index_no_int32_label_can_hold(ignore_index):
    # 2**32 is 0 in int32: a cast of ignore_index would drop every row labelled 0.
    labels = tf.constant([0, 1, 4, 0, 2, 3], tf.int32)
    x = _logits((6, 5), seed=3)
    direction = tf.constant(np.random.default_rng(4).normal(size=(6, 5)))

    def hvp(**options):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, **options) ** 2)
            grad = inner.gradient(loss, x)
            directional = tf.reduce_sum(grad * direction)
        return loss, outer.gradient(directional, x)

    loss, product = hvp(ignore_index=ignore_index)
    expected_loss, expected_product = hvp()
    np.testing.assert_allclose(loss.numpy(), expected_loss.numpy(), rtol=1e-12)
    np.testing.assert_allclose(product.numpy(), expected_product.numpy(), rtol=1e-12, atol=1e-14)
