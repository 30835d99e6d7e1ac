"""fused_xent.losses in model.compile/fit/evaluate/predict, also under mixed precision,
against the same training with Keras's own losses."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from fused_xent import losses as fused_losses  # noqa: E402

FEATURES, CLASSES, SAMPLES = 12, 4, 256


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    scores = x @ rng.normal(size=(FEATURES, CLASSES)) + 0.5 * rng.normal(size=(SAMPLES, CLASSES))
    return x, np.argmax(scores, -1)


def _model(activation=None):
    return keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(CLASSES, activation)]
    )


def _train(loss, activation=None, one_hot=False, optimizer=None, epochs=3, **fit_kwargs):
    """Seeded training; returns (loss history, weights, evaluation, predictions)."""
    x, y = _data()
    if one_hot:
        y = np.eye(CLASSES, dtype=np.float32)[y]
    keras.utils.set_random_seed(0)
    model = _model(activation)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss=loss, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, **fit_kwargs)
    evaluation = model.evaluate(x, y, verbose=0)
    predictions = model.predict(x[:16], verbose=0)
    return history.history["loss"], model.get_weights(), evaluation, predictions


def _assert_same_training(ours, theirs, rtol, atol):
    (loss, weights, evaluation, predictions), (loss_k, weights_k, evaluation_k, predictions_k) = ours, theirs
    np.testing.assert_allclose(loss, loss_k, rtol=rtol)
    np.testing.assert_allclose(evaluation, evaluation_k, rtol=rtol)
    for w, w_k in zip(weights, weights_k):
        np.testing.assert_allclose(w, w_k, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(predictions, np.float32), np.asarray(predictions_k, np.float32), atol=atol)


def test_fit_sparse_logits_matches_keras():
    ours = _train(fused_losses.SparseCategoricalCrossentropy(from_logits=True))
    theirs = _train(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert ours[0][-1] < 0.8 * ours[0][0]  # it learns
    _assert_same_training(ours, theirs, rtol=1e-4, atol=1e-4)


def test_fit_categorical_softmax_output_matches_keras():
    ours = _train(fused_losses.CategoricalCrossentropy(label_smoothing=0.1), "softmax", one_hot=True)
    theirs = _train(keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "softmax", one_hot=True)
    _assert_same_training(ours, theirs, rtol=1e-4, atol=1e-4)


def test_class_weights_train_like_fit_class_weight():
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0, 3: 1.5}
    ours = _train(
        fused_losses.SparseCategoricalCrossentropy(from_logits=True, class_weights=list(class_weight.values()))
    )
    theirs = _train(keras.losses.SparseCategoricalCrossentropy(from_logits=True), class_weight=class_weight)
    _assert_same_training(ours[:2] + theirs[2:], theirs, rtol=1e-4, atol=1e-4)  # evaluate has no class_weight


# ---------------------------------------------------------------- mixed precision

HALF = {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}
TOLERANCE = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}  # per-element losses round to the half type


@pytest.fixture(params=sorted(HALF))
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _trace_loss(loss, model):
    """The graph of loss(y, model(x)) and the name of the model's (half precision) logits in it."""
    names = {}

    @tf.function
    def step(x, y):
        logits = model(x)
        names["logits"] = logits.name
        return loss(y, logits)

    graph = step.get_concrete_function(tf.TensorSpec([None, FEATURES]), tf.TensorSpec([None], tf.int64)).graph
    return graph, names["logits"]


def _casts_of(graph, tensor_name):
    return [op for op in graph.get_operations() if op.type == "Cast" and any(t.name == tensor_name for t in op.inputs)]


def test_mixed_precision_reads_half_logits_without_float32_copy(policy):
    model = _model()
    graph, logits = _trace_loss(fused_losses.SparseCategoricalCrossentropy(from_logits=True), model)
    fused = [op for op in graph.get_operations() if op.type.startswith("FusedXent>")]
    assert [op.inputs[0].name for op in fused] == [logits]
    assert fused[0].inputs[0].dtype == HALF[policy]
    assert _casts_of(graph, logits) == []
    keras_graph, keras_logits = _trace_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True), model)
    assert [op.outputs[0].dtype for op in _casts_of(keras_graph, keras_logits)] == [tf.float32]  # what we avoid


@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_mixed_precision_values_and_gradients_match_keras(policy, loss_class):
    x, y = _data()
    if loss_class.startswith("Categorical"):
        y = np.eye(CLASSES, dtype=np.float32)[y]
    logits = tf.cast(_model()(x) * 4.0, HALF[policy])
    results = []
    for module in [fused_losses, keras.losses]:
        loss = getattr(module, loss_class)(from_logits=True)
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(y, logits)
        results.append((value, tape.gradient(value, logits)))
    (value, grad), (expected, expected_grad) = results
    assert value.dtype == expected.dtype == tf.float32 and grad.dtype == expected_grad.dtype == HALF[policy]
    np.testing.assert_allclose(float(value), float(expected), rtol=TOLERANCE[policy])
    scale = float(tf.reduce_max(tf.abs(tf.cast(expected_grad, tf.float32))))
    np.testing.assert_allclose(
        tf.cast(grad, tf.float32), tf.cast(expected_grad, tf.float32), atol=TOLERANCE[policy] * scale
    )


def test_mixed_precision_fit_matches_keras(policy):
    def optimizer():
        adam = keras.optimizers.Adam(1e-2)
        return keras.optimizers.LossScaleOptimizer(adam) if policy == "mixed_float16" else adam

    ours = _train(fused_losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=optimizer(), epochs=2)
    theirs = _train(keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=optimizer(), epochs=2)
    assert np.all(np.isfinite(ours[0])) and ours[0][-1] < ours[0][0]
    np.testing.assert_allclose(ours[0], theirs[0], rtol=2 * TOLERANCE[policy])
    np.testing.assert_allclose(ours[2], theirs[2], rtol=2 * TOLERANCE[policy], atol=2e-2)


def test_mixed_precision_softmax_output_keeps_its_logits(policy):
    """Keras casts a half softmax output to float32 and so loses its logits (and clips
    saturated probabilities); ours reads the half logits, as Keras does in float32."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x * 8.0)
    assert outputs.dtype == HALF[policy]
    value = fused_losses.SparseCategoricalCrossentropy(reduction=None)(y, outputs)
    exact = tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(outputs._keras_logits, tf.float32))
    np.testing.assert_allclose(value, exact, rtol=TOLERANCE[policy], atol=1e-3)
    clipped = keras.losses.SparseCategoricalCrossentropy(reduction=None)(y, outputs)
    assert float(tf.reduce_max(clipped)) < float(tf.reduce_max(exact)) - 1.0  # the difference this test is about
