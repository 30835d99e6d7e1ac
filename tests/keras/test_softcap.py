"""softcap on the Keras 3 losses, metrics and layers (TensorFlow backend here; JAX and PyTorch in
tests/keras/test_losses_backends.py): equal to Keras's own loss of cap * tanh(logits / cap), kept
in get_config, refused with probabilities, and training through it gives the composite's gradients."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
import fused_xent  # noqa: E402
from fused_xent import layers as fused_layers  # noqa: E402
from fused_xent import losses as fused_losses  # noqa: E402
from fused_xent import metrics as fused_metrics  # noqa: E402
from tests._support import keras_versions  # noqa: E402

CAP = 2.5


def _data(seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((6, 4, 7)) * 4).astype(np.float32)
    y = rng.integers(0, 7, (6, 4))
    soft = rng.random((6, 4, 7)).astype(np.float32)
    return z, y, soft / soft.sum(-1, keepdims=True), rng.random((6, 4)).astype(np.float32)


def _capped(z):
    return CAP * np.tanh(z.astype(np.float64) / CAP)


@pytest.mark.parametrize(
    "reduction", keras_versions.reductions(["sum_over_batch_size", "sum", "mean_with_sample_weight", "none"])
)
def test_losses_equal_keras_on_capped_logits(reduction):
    z, y, soft, sw = _data()
    ours = fused_losses.SparseCategoricalCrossentropy(from_logits=True, softcap=CAP, reduction=reduction)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    np.testing.assert_allclose(ours(y, z, sw), theirs(y, _capped(z).astype(np.float32), sw), rtol=2e-6, atol=1e-6)
    ours = fused_losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, softcap=CAP, reduction=reduction)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, reduction=reduction)
    np.testing.assert_allclose(ours(soft, z, sw), theirs(soft, _capped(z).astype(np.float32), sw), rtol=2e-6, atol=1e-6)


def test_metrics_equal_keras_on_capped_logits():
    z, y, soft, _ = _data(1)
    for ours, theirs, labels in [
        (
            fused_metrics.SparseCategoricalCrossentropy(from_logits=True, softcap=CAP),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
            y,
        ),
        (
            fused_metrics.CategoricalCrossentropy(from_logits=True, softcap=CAP),
            keras.metrics.CategoricalCrossentropy(from_logits=True),
            soft,
        ),
    ]:
        ours.update_state(labels, z)
        theirs.update_state(labels, _capped(z).astype(np.float32))
        np.testing.assert_allclose(ours.result(), theirs.result(), rtol=2e-6)
        assert ours.get_config()["softcap"] == CAP


def test_config_round_trip_and_none_by_default():
    loss = fused_losses.SparseCategoricalCrossentropy(from_logits=True, softcap=CAP)
    again = fused_losses.SparseCategoricalCrossentropy.from_config(loss.get_config())
    assert again.softcap == CAP
    assert fused_losses.CategoricalCrossentropy().get_config()["softcap"] is None


@pytest.mark.parametrize("cls", [fused_losses.SparseCategoricalCrossentropy, fused_losses.CategoricalCrossentropy])
def test_softcap_needs_logits_and_a_positive_cap(cls):
    with pytest.raises(ValueError, match="needs `from_logits=True`"):
        cls(softcap=CAP)
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="`softcap` must be None or a finite number > 0"):
            cls(from_logits=True, softcap=bad)


def test_linear_layer_with_softcap_trains_like_dense_and_capped_loss():
    """LinearCrossEntropy(softcap) equals Dense + Keras's loss of the capped logits: loss and every
    gradient; its logits() are the capped logits."""
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((16, 8)).astype(np.float32)
    labels = rng.integers(0, 30, 16)
    head = fused_layers.LinearCrossEntropy(
        30, use_bias=True, softcap=CAP, add_loss=False, bias_initializer="glorot_uniform"
    )
    head.build((None, 8))
    with tf.GradientTape() as tape:
        ours = tf.reduce_mean(head(hidden, labels))
    ours_grads = tape.gradient(ours, [head.kernel, head.bias])
    with tf.GradientTape() as tape:
        logits = tf.matmul(hidden, head.kernel) + head.bias
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, CAP * tf.tanh(logits / CAP))
    theirs_grads = tape.gradient(theirs, [head.kernel, head.bias])
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    for a, b in zip(ours_grads, theirs_grads):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(
        head.logits(hidden), CAP * tf.tanh((tf.matmul(hidden, head.kernel) + head.bias) / CAP), rtol=1e-6
    )
    assert fused_layers.LinearCrossEntropy.from_config(head.get_config())._options["softcap"] == CAP


def test_comparison_rejects_an_uncapped_loss():
    z, y, _, _ = _data()
    ours = fused_losses.SparseCategoricalCrossentropy(from_logits=True)(y, z)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, _capped(z).astype(np.float32))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-6)


def test_fused_xent_namespace_passes_softcap():
    z, y, _, _ = _data()
    direct = fused_xent.sparse_softmax_cross_entropy_with_logits(y, z, softcap=CAP)
    assert np.all(np.isfinite(direct))
