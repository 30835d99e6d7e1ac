"""Rows whose loss is +inf because a target weight sits on a -inf logit stay
+inf, with finite gradients, on every path (NumPy binding, TensorFlow op, both
XLA lowerings): with label_smoothing = 1 the labels carry no weight, and a
float64 row whose first block of 2048 logits is all -inf still sums its labels'
gaps. Both gave NaN (0 * inf, and -inf - -inf) before."""

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support import reference
from tests._support.assertions import assert_close
from tests._support.runners import tf_or_skip

SIZES = [3, 40, 3000]  # row groups, one short row, blocks of 2048


def _smoothing_case(classes, dtype):
    z = np.random.default_rng(classes).normal(size=(2, classes)).astype(dtype)
    z[0, 1] = -np.inf  # the label of row 0
    labels = np.array([1, 0])
    return z, labels


def _first_block_case(dtype):
    z = np.zeros((2, 3000), dtype)
    z[0, :2048] = -np.inf
    t = np.zeros((2, 3000), dtype)
    t[0, 5] = t[0, 2500] = 0.5  # half the target on a -inf logit of the first block
    t[1, 7] = 1.0
    return z, t


def _check(loss, grad, ref_loss, ref_grad, dtype):
    assert loss[0] == np.inf, loss
    assert np.isfinite(loss[1]) and np.isfinite(grad).all(), (loss, grad)
    assert_close(loss, ref_loss, dtype, scale=4)
    assert_close(grad, ref_grad, dtype, scale=4)


@pytest.mark.parametrize("classes", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_full_smoothing_with_infinite_label_logit_numpy(classes, dtype):
    z, labels = _smoothing_case(classes, dtype)
    ref = reference.sparse(labels, z.astype(np.float64), label_smoothing=1.0)
    _check(*fxnp.sparse_softmax_cross_entropy_with_logits(labels, z, label_smoothing=1.0), *ref, dtype)
    t = np.eye(classes, dtype=dtype)[labels]
    ref = reference.dense(t.astype(np.float64), z.astype(np.float64), label_smoothing=1.0)[:2]
    _check(*fxnp.softmax_cross_entropy_with_logits(t, z, label_smoothing=1.0), *ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_first_block_all_infinite_with_label_weight_numpy(dtype):
    z, t = _first_block_case(dtype)
    ref = reference.dense(t.astype(np.float64), z.astype(np.float64))[:2]
    _check(*fxnp.softmax_cross_entropy_with_logits(t, z), *ref, dtype)


@pytest.mark.parametrize("lowering", [None, "custom_call", "hlo"], ids=["eager", "xla-custom_call", "xla-hlo"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_both_cases_in_tensorflow(dtype, lowering, monkeypatch):
    tf = tf_or_skip()
    import fused_xent

    if lowering:
        if fused_xent.build_info()["xla"] is None:
            pytest.skip("built without XLA")
        if lowering == "custom_call" and fused_xent.build_info()["xla"] != "custom_call":
            pytest.skip("no XLA FFI handlers in this build")
        monkeypatch.setenv("FUSED_XENT_XLA_LOWERING", lowering)

    def loss_and_grad(fn, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = fn(z)
        return loss, tape.gradient(loss, z, output_gradients=tf.ones_like(loss))

    run = tf.function(loss_and_grad, jit_compile=bool(lowering), autograph=False)
    for classes in SIZES:
        z, labels = _smoothing_case(classes, dtype)
        fn = lambda x: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, label_smoothing=1.0)  # noqa: E731
        loss, grad = (np.asarray(r) for r in run(fn, tf.constant(z)))
        _check(loss, grad, *reference.sparse(labels, z.astype(np.float64), label_smoothing=1.0), dtype)
    z, t = _first_block_case(dtype)
    fn = lambda x: fused_xent.softmax_cross_entropy_with_logits(tf.constant(t), x)  # noqa: E731
    loss, grad = (np.asarray(r) for r in run(fn, tf.constant(z)))
    _check(loss, grad, *reference.dense(t.astype(np.float64), z.astype(np.float64))[:2], dtype)
