"""Final-logit softcap in the TensorFlow functions, the linear head and their gradients: the loss of
cap * tanh(x / cap), eager, in graphs and under XLA (custom call and HLO lowering), against the
float64 composite (tests/_support/reference) and, for second and third derivatives, against
TensorFlow differentiating tf.tanh and tf.nn's cross-entropy itself."""

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import assert_close
from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402

CAP = 4.0
MODES = ["eager", "graph", "xla_custom_call", "xla_hlo"]


def _run(mode, fn, monkeypatch):
    if mode == "eager":
        return fn
    if mode.startswith("xla"):
        if mode == "xla_custom_call" and fused_xent.build_info()["xla"] != "custom_call":
            pytest.skip("this build has no XLA FFI handlers")
        monkeypatch.setenv("FUSED_XENT_XLA_LOWERING", mode[len("xla_") :])
    return tf.function(fn, jit_compile=mode.startswith("xla"))


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = tf.constant((rng.standard_normal(shape) * 6).astype(np.float64), dtype)
    label_shape = [d for i, d in enumerate(shape) if i != axis % len(shape)]
    return logits, rng.integers(0, shape[axis], label_shape)


def _scale(dtype):
    return {"float64": 64.0, "float32": 8.0}.get(dtype.name, 1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [tf.float64, tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape,axis", [((6, 40), -1), ((3, 7, 5), 1)])
def test_sparse_values_and_gradient(mode, dtype, shape, axis, monkeypatch):
    logits, labels = _data(shape, axis, dtype)
    options = dict(label_smoothing=0.125, z_loss=0.0009765625, ignore_index=int(labels.reshape(-1)[1]))

    def step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, z, axis=axis, softcap=CAP, **options)
        return loss, tape.gradient(loss, z)

    loss, grad = _run(mode, step, monkeypatch)(logits)
    expected_loss, expected_grad = reference.sparse_softcap(
        labels, tf.cast(logits, tf.float64).numpy(), CAP, axis=axis, **options
    )
    assert_close(tf.cast(loss, tf.float64).numpy(), expected_loss, dtype.name, scale=_scale(dtype))
    assert_close(tf.cast(grad, tf.float64).numpy(), expected_grad, dtype.name, scale=_scale(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
def test_dense_values_and_gradients(mode, dtype, monkeypatch):
    logits, _ = _data((5, 30), -1, dtype)
    labels = tf.nn.softmax(tf.constant(np.random.default_rng(2).standard_normal((5, 30)), dtype))

    def step(z, t):
        with tf.GradientTape() as tape:
            tape.watch([z, t])
            loss = fused_xent.softmax_cross_entropy_with_logits(t, z, softcap=CAP, label_smoothing=0.125)
        return (loss, *tape.gradient(loss, [z, t]))

    loss, grad, grad_labels = _run(mode, step, monkeypatch)(logits, labels)
    expected = reference.dense_softcap(
        tf.cast(labels, tf.float64).numpy(), tf.cast(logits, tf.float64).numpy(), CAP, label_smoothing=0.125
    )
    for actual, wanted in zip((loss, grad, grad_labels), expected):
        assert_close(tf.cast(actual, tf.float64).numpy(), wanted, dtype.name, scale=_scale(dtype))


def _composite_sparse(labels, z, options):
    capped = CAP * tf.tanh(z / CAP)
    eps, lam = options["label_smoothing"], options["z_loss"]
    log_p = tf.nn.log_softmax(capped)
    q = (1 - eps) * tf.one_hot(labels, z.shape[-1], dtype=z.dtype) + eps / z.shape[-1]
    return -tf.reduce_sum(q * log_p, -1) + lam * tf.reduce_logsumexp(capped, -1) ** 2


@pytest.mark.parametrize("mode", ["eager", "xla_custom_call", "xla_hlo"])
def test_second_and_third_derivatives(mode, monkeypatch):
    """The Grad op's gradient with a cap (slope and its derivative) to third order, float64,
    against TensorFlow differentiating the composite."""
    logits, labels = _data((4, 9), -1, tf.float64, seed=4)
    options = dict(label_smoothing=0.25, z_loss=0.125)
    v = tf.constant(np.random.default_rng(6).standard_normal((4, 9)))

    def derivatives(loss_fn, z):
        with tf.GradientTape() as third:
            third.watch(z)
            with tf.GradientTape() as second:
                second.watch(z)
                with tf.GradientTape() as first:
                    first.watch(z)
                    loss = tf.reduce_sum(loss_fn(z) * tf.range(1.0, 5.0, dtype=tf.float64))
                grad = first.gradient(loss, z)
                along = tf.reduce_sum(grad * v)
            hvp = second.gradient(along, z)
            cubic = tf.reduce_sum(hvp * tf.sin(z))
        return grad, hvp, third.gradient(cubic, z)

    ours = _run(
        mode,
        lambda z: derivatives(
            lambda x: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP, **options), z
        ),
        monkeypatch,
    )(logits)
    theirs = derivatives(lambda x: _composite_sparse(labels, x, options), logits)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_linear_head_with_softcap():
    rng = np.random.default_rng(7)
    hidden = tf.constant(rng.standard_normal((12, 8)), tf.float64)
    weight = tf.constant(rng.standard_normal((8, 50)), tf.float64)
    bias = tf.constant(rng.standard_normal(50), tf.float64)
    labels = rng.integers(0, 50, 12)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([hidden, weight, bias])
            loss = fn()
        return (loss, *tape.gradient(loss, [hidden, weight, bias]))

    ours = grads(lambda: fused_xent.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=CAP, chunk_size=4))
    logits = lambda: tf.matmul(hidden, weight) + bias  # noqa: E731
    theirs = grads(lambda: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, CAP * tf.tanh(logits() / CAP)))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    capped = fused_xent.linear_logits(hidden, weight, bias=bias, softcap=CAP)
    np.testing.assert_allclose(capped.numpy(), (CAP * tf.tanh(logits() / CAP)).numpy(), rtol=1e-14)


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf"), "cap", True])
def test_bad_softcap_is_refused(value):
    logits, labels = _data((2, 5), -1, tf.float32)
    with pytest.raises(ValueError, match="softcap must be None"):
        fused_xent.sparse_softmax_cross_entropy_with_logits(labels, logits, softcap=value)
    with pytest.raises(ValueError, match="softcap must be None"):
        fused_xent.softmax_cross_entropy_with_logits(tf.one_hot(labels, 5), logits, softcap=value)
    with pytest.raises(ValueError, match="softcap must be None"):
        fused_xent.linear_cross_entropy(tf.zeros([2, 3]), tf.zeros([3, 5]), labels, softcap=value)


def test_the_op_refuses_a_negative_cap():
    from fused_xent._tf.loader import load_op_library

    with pytest.raises(tf.errors.InvalidArgumentError, match="softcap must be finite and >= 0"):
        load_op_library().fused_xent_sparse_softmax_cross_entropy(
            tf.zeros([2, 3]), tf.zeros([2], tf.int64), tf.zeros([0]), softcap=-1.0
        )
