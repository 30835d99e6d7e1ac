"""fused_xent.tf_keras against tf_keras's own losses and metrics (Keras 2): values, fit and evaluate
with sample_weight and class_weight, mixed precision, the Keras 3 classes refused under tf_keras,
and .keras, .h5 and SavedModel reloads in fresh interpreters."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tests._support.assertions import assert_float32_close  # noqa: E402

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")
import fused_xent  # noqa: E402
from fused_xent.tf_keras import losses as tk_losses  # noqa: E402
from fused_xent.tf_keras import metrics as tk_metrics  # noqa: E402

CLASSES = 5
Reduction = tf_keras.losses.Reduction


def _inputs(seed=0, shape=(6, 4)):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape + (CLASSES,)) * 2).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    probabilities.reshape(-1, CLASSES)[0] = np.eye(CLASSES)[0]  # a saturated row: clipping shows
    labels = rng.integers(0, CLASSES, size=shape)
    soft = rng.dirichlet(np.ones(CLASSES), size=shape).astype(np.float32)
    weights = {
        "none": None,
        "per_sample": rng.uniform(0.1, 2.0, size=(shape[0],)).astype(np.float32),
        "per_element": rng.uniform(0.0, 2.0, size=shape).astype(np.float32),
    }
    return logits, probabilities, labels, soft, weights


def _value_and_gradient(loss, y_true, y_pred, sample_weight):
    y_pred = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        value = loss(y_true, y_pred, sample_weight=sample_weight)
    return value.numpy(), tape.gradient(value, y_pred).numpy()


def _assert_same(ours, theirs, y_true, y_pred, sample_weight, what):
    value, grad = _value_and_gradient(ours, y_true, y_pred, sample_weight)
    expected, expected_grad = _value_and_gradient(theirs, y_true, y_pred, sample_weight)
    assert_float32_close(value, expected, what=what)
    assert_float32_close(grad, expected_grad, rtol=2e-5, atol=2e-6, what=what + " gradient")


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("reduction", [Reduction.AUTO, Reduction.SUM, Reduction.NONE])
@pytest.mark.parametrize("weights", ["none", "per_sample", "per_element"])
def test_sparse_matches_tf_keras(reduction, weights):
    logits, probabilities, labels, _, sample_weights = _inputs()
    labels[0, :2] = 2  # some ignored elements
    for kwargs, y_pred in [
        (dict(from_logits=True), logits),
        (dict(from_logits=False), probabilities),
        (dict(from_logits=True, ignore_class=2), logits),
    ]:
        _assert_same(
            tk_losses.SparseCategoricalCrossentropy(reduction=reduction, **kwargs),
            tf_keras.losses.SparseCategoricalCrossentropy(reduction=reduction, **kwargs),
            labels,
            y_pred,
            sample_weights[weights],
            f"{kwargs}",
        )


@pytest.mark.parametrize("reduction", [Reduction.AUTO, Reduction.SUM, Reduction.NONE])
@pytest.mark.parametrize("weights", ["none", "per_sample", "per_element"])
def test_categorical_matches_tf_keras(reduction, weights):
    logits, probabilities, labels, soft, sample_weights = _inputs()
    for kwargs, y_true, y_pred in [
        (dict(from_logits=True, label_smoothing=0.1), soft, logits),
        (dict(from_logits=False), np.eye(CLASSES, dtype=np.float32)[labels], probabilities),
        (dict(from_logits=True, axis=1), np.moveaxis(soft, -1, 1), np.moveaxis(logits, -1, 1)),
    ]:
        _assert_same(
            tk_losses.CategoricalCrossentropy(reduction=reduction, **kwargs),
            tf_keras.losses.CategoricalCrossentropy(reduction=reduction, **kwargs),
            y_true,
            y_pred,
            sample_weights[weights],
            f"{kwargs}",
        )


def test_extras_equal_their_definitions():
    """axis, label_smoothing and class_weights of the sparse loss, against tf_keras's losses of the same meaning."""
    logits, _, labels, _, weights = _inputs()
    onehot = np.eye(CLASSES, dtype=np.float32)[labels]
    moved = np.moveaxis(logits, -1, 1)
    sample_weight = weights["per_element"]
    class_weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    cases = [
        (dict(axis=1), moved, tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), labels, None),
        (
            dict(label_smoothing=0.2),
            logits,
            tf_keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2),
            onehot,
            None,
        ),
        (
            dict(class_weights=class_weights),
            logits,
            tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            labels,
            class_weights[labels],
        ),
    ]
    for extra, y_pred, theirs, their_true, their_weight in cases:
        ours = tk_losses.SparseCategoricalCrossentropy(from_logits=True, **extra)
        expected = theirs(their_true, logits, sample_weight * (1 if their_weight is None else their_weight))
        assert_float32_close(ours(labels, y_pred, sample_weight), expected, what=str(extra))


# ---------------------------------------------------------------- fit and evaluate


def _data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(6, 3)) + rng.normal(size=(96, 3)), -1)
    return x, y, rng.uniform(0.05, 3.0, size=96).astype(np.float32)


def _train(loss, metrics=(), one_hot=False, **fit_kwargs):
    """Seeded tf_keras training: (fit history, weights, evaluate with sample weights)."""
    x, y, sample_weight = _data()
    if one_hot:
        y = np.eye(3, dtype=np.float32)[y]
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [tf_keras.Input((6,)), tf_keras.layers.Dense(8, activation="tanh"), tf_keras.layers.Dense(3)]
    )
    model.compile(optimizer=tf_keras.optimizers.SGD(0.2), loss=loss, weighted_metrics=list(metrics))
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, **fit_kwargs)
    evaluation = model.evaluate(x, y, sample_weight=sample_weight, verbose=0, return_dict=True)
    return history.history, model.get_weights(), evaluation


def _assert_same_training(ours, theirs, rtol=1e-5):
    (history, weights, evaluation), (history_k, weights_k, evaluation_k) = ours, theirs
    assert history["loss"][0] != history["loss"][1]  # it trained
    for key in history_k:
        assert_float32_close(history[key], history_k[key], rtol=rtol, what=key)
    for key in evaluation_k:
        assert_float32_close(evaluation[key], evaluation_k[key], rtol=rtol, what=key)
    for w, w_k in zip(weights, weights_k):  # weights of order 0.1-1; half precision moves them by rtol/10
        assert_float32_close(w, w_k, rtol=rtol, atol=max(1e-5, rtol / 10), what="weights")


@pytest.mark.parametrize("weighting", ["sample_weight", "class_weight"])
def test_fit_and_evaluate_equal_tf_keras_losses(weighting):
    """The issue's case: fit with sample_weight (or class_weight), then evaluate with sample_weight."""
    x, y, sample_weight = _data()
    fit_kwargs = (
        dict(sample_weight=sample_weight)
        if weighting == "sample_weight"
        else dict(class_weight={0: 0.5, 1: 3.0, 2: 1.0})
    )
    fit_kwargs["validation_data"] = (x[:40], y[:40], sample_weight[:40])
    ours = _train(tk_losses.SparseCategoricalCrossentropy(from_logits=True), **fit_kwargs)
    theirs = _train(tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), **fit_kwargs)
    _assert_same_training(ours, theirs)
    # Weighted and unweighted losses differ: the weights reached the loss.
    unweighted = _train(tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert abs(ours[0]["loss"][0] - unweighted[0]["loss"][0]) > 1e-3


def test_fit_categorical_and_metrics_equal_tf_keras():
    x, y, sample_weight = _data()
    onehot = np.eye(3, dtype=np.float32)[y]
    metrics = lambda ours: [  # noqa: E731
        (tk_metrics if ours else tf_keras.metrics).CategoricalCrossentropy(from_logits=True, name="xent"),
        (tk_metrics if ours else tf_keras.metrics).CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.2, name="smooth"
        ),
    ]
    fit_kwargs = dict(sample_weight=sample_weight, validation_data=(x[:40], onehot[:40], sample_weight[:40]))
    ours = _train(
        tk_losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics(True),
        one_hot=True,
        **fit_kwargs,
    )
    theirs = _train(
        tf_keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics(False),
        one_hot=True,
        **fit_kwargs,
    )
    assert {"val_xent", "smooth"} <= set(ours[0])
    _assert_same_training(ours, theirs)


def test_metrics_equal_tf_keras_metrics():
    logits, probabilities, labels, soft, weights = _inputs()
    labels[1, :3] = 4
    cases = [
        ("SparseCategoricalCrossentropy", dict(from_logits=True), labels, logits),
        ("SparseCategoricalCrossentropy", dict(ignore_class=4), labels, probabilities),
        ("CategoricalCrossentropy", dict(from_logits=True, label_smoothing=0.2), soft, logits),
        ("CategoricalCrossentropy", dict(), np.eye(CLASSES, dtype=np.float32)[labels], probabilities),
    ]
    for name, kwargs, y_true, y_pred in cases:
        ours, theirs = getattr(tk_metrics, name)(**kwargs), getattr(tf_keras.metrics, name)(**kwargs)
        results = []
        for metric in (ours, theirs):
            metric.update_state(y_true, y_pred, weights["per_element"])
            metric.update_state(y_true[:3], y_pred[:3])
            first = float(metric.result())
            metric.reset_state()
            metric.update_state(y_true[2:], y_pred[2:], weights["per_sample"][2:])
            results.append([first, float(metric.result())])
        assert_float32_close(results[0], results[1], what=f"{name} {kwargs}")


def test_softcap_losses_and_metrics_equal_tf_keras_on_capped_logits():
    logits, _, labels, soft, weights = _inputs(3)
    logits *= 4
    cap = 2.5
    capped = (cap * np.tanh(logits.astype(np.float64) / cap)).astype(np.float32)
    for name, y_true in (("SparseCategoricalCrossentropy", labels), ("CategoricalCrossentropy", soft)):
        ours = getattr(tk_losses, name)(from_logits=True, softcap=cap)
        theirs = getattr(tf_keras.losses, name)(from_logits=True)
        assert_float32_close(
            ours(y_true, logits, weights["per_sample"]), theirs(y_true, capped, weights["per_sample"]), what=name
        )
        ours, theirs = (
            getattr(tk_metrics, name)(from_logits=True, softcap=cap),
            getattr(tf_keras.metrics, name)(from_logits=True),
        )
        ours.update_state(y_true, logits, weights["per_element"])
        theirs.update_state(y_true, capped, weights["per_element"])
        assert_float32_close(float(ours.result()), float(theirs.result()), what=f"{name} metric")
        assert (
            abs(float(ours.result()) - float(getattr(tf_keras.metrics, name)(from_logits=True)(y_true, logits))) > 1e-3
        )


def test_metric_runs_the_forward_op_only():
    """The metric's update adds the fused forward op to the graph, not its gradient."""
    metric = tk_metrics.SparseCategoricalCrossentropy(from_logits=True)
    logits, _, labels, _, _ = _inputs()
    graph = tf.function(lambda y, z: metric.update_state(y, z) and None).get_concrete_function(labels, logits).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "FusedXent>SparseSoftmaxCrossEntropy" in op_types
    assert not any(t.endswith("Grad") for t in op_types if t.startswith("FusedXent")), op_types


# ---------------------------------------------------------------- mixed precision

HALF = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
HALF_TOLERANCE = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}  # per-element losses rounded to half


@pytest.fixture
def policy(request):
    tf_keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    tf_keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", list(HALF), indirect=True)
def test_mixed_precision_fit_equals_tf_keras(policy):
    x, y, sample_weight = _data()
    metric = lambda module: [module.SparseCategoricalCrossentropy(from_logits=True, name="xent")]  # noqa: E731
    ours = _train(
        tk_losses.SparseCategoricalCrossentropy(from_logits=True), metric(tk_metrics), sample_weight=sample_weight
    )
    theirs = _train(
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metric(tf_keras.metrics),
        sample_weight=sample_weight,
    )
    probe = tf_keras.layers.Dense(3)
    probe.build((None, 6))
    assert probe.compute_dtype == HALF[policy]  # the loss received half-precision logits
    _assert_same_training(ours, theirs, rtol=HALF_TOLERANCE[policy])


# ---------------------------------------------------------------- the Keras 3 classes under tf_keras


@pytest.mark.parametrize("name", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_keras3_loss_is_refused_by_name(name):
    x, y, sample_weight = _data()
    y = y if name.startswith("Sparse") else np.eye(3, dtype=np.float32)[y]
    model = tf_keras.Sequential([tf_keras.Input((6,)), tf_keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=getattr(fused_xent.losses, name)(from_logits=True))
    for run in (
        lambda: model.fit(x, y, sample_weight=sample_weight, verbose=0),
        lambda: model.evaluate(x, y, verbose=0),
    ):
        with pytest.raises(TypeError, match=rf"Keras 3 loss.*use fused_xent\.tf_keras\.losses\.{name}\b"):
            run()


def test_keras3_metric_is_refused_by_name():
    """At compile for `metrics` (tf_keras reads their variables), at the first fit for `weighted_metrics`."""
    x, y, _ = _data()
    model = tf_keras.Sequential([tf_keras.Input((6,)), tf_keras.layers.Dense(3)])
    refusal = r"Keras 3 metric.*use fused_xent\.tf_keras\.metrics\.SparseCategoricalCrossentropy\b"
    loss = tk_losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(TypeError, match=refusal):
        model.compile(optimizer="sgd", loss=loss, metrics=[fused_xent.metrics.SparseCategoricalCrossentropy()])
    model.compile(optimizer="sgd", loss=loss, weighted_metrics=[fused_xent.metrics.SparseCategoricalCrossentropy()])
    with pytest.raises(TypeError, match=refusal):
        model.fit(x, y, verbose=0)


def test_keras3_classes_still_work_outside_tf_keras():
    """With tf_keras imported, calling the Keras 3 classes directly is not refused."""
    logits, _, labels, _, _ = _inputs()
    loss = fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True)
    metric = fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True)
    metric.update_state(labels, logits)
    expected = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    assert_float32_close(loss(labels, logits), expected)
    assert_float32_close(metric.result(), expected)


# ---------------------------------------------------------------- arguments and configs


def test_arguments_and_config_round_trip():
    losses = [
        tk_losses.SparseCategoricalCrossentropy(
            True, 255, Reduction.SUM, "s", axis=1, label_smoothing=0.1, class_weights=[1, 2], z_loss=1e-3
        ),
        tk_losses.CategoricalCrossentropy(True, 0.2, 1, Reduction.NONE, "c", z_loss=1e-3),
        tk_metrics.SparseCategoricalCrossentropy("m", "float64", True, 3, 1, label_smoothing=0.1, softcap=30.0),
        tk_metrics.CategoricalCrossentropy("n", None, True, 0.2, 1),
    ]
    for obj in losses:
        config = obj.get_config()
        again = type(obj).from_config(config)
        assert again.get_config() == config
    assert losses[0].get_config() == {
        "reduction": "sum",
        "name": "s",
        "from_logits": True,
        "label_smoothing": 0.1,
        "axis": 1,
        "z_loss": 1e-3,
        "ignore_class": 255,
        "class_weights": [1.0, 2.0],
        "softcap": None,
    }
    assert losses[2].get_config() == {
        "name": "m",
        "dtype": "float64",
        "from_logits": True,
        "ignore_class": 3,
        "axis": 1,
        "label_smoothing": 0.1,
        "softcap": 30.0,
    }
    names = {tf_keras.saving.get_registered_name(type(obj)) for obj in losses}
    assert names == {
        f"fused_xent>{n}"
        for n in (
            "SparseCategoricalCrossentropy",
            "CategoricalCrossentropy",
            "SparseCategoricalCrossentropyMetric",
            "CategoricalCrossentropyMetric",
        )
    }


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tk_losses.SparseCategoricalCrossentropy(ignore_class=1.5), "ignore_class"),
        (lambda: tk_losses.SparseCategoricalCrossentropy(reduction="mean"), "Invalid Reduction Key: mean"),
        (lambda: tk_losses.SparseCategoricalCrossentropy(class_weights=[1.0, -1.0]), "class_weights.*>= 0"),
        (lambda: tk_losses.CategoricalCrossentropy(label_smoothing=1.5), "label_smoothing"),
        (lambda: tk_losses.CategoricalCrossentropy(z_loss=float("inf")), "z_loss"),
        (lambda: tk_losses.CategoricalCrossentropy(axis=True), "axis"),
        (lambda: tk_metrics.SparseCategoricalCrossentropy(ignore_class="void"), "ignore_class"),
        (lambda: tk_metrics.CategoricalCrossentropy(label_smoothing=-0.5), "label_smoothing"),
    ],
)
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_are_named():
    loss = tk_losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match=r"same shape except for the class axis"):
        loss(np.zeros((4, 2), np.int64), np.zeros((4, 3, CLASSES), np.float32))
    with pytest.raises(TypeError, match=r"y_pred .*\.to_tensor\(\)"):
        loss(np.zeros(2, np.int64), tf.ragged.constant([[0.0] * CLASSES, [1.0] * CLASSES]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 7"):
        loss(np.array([0, 7]), np.zeros((2, CLASSES), np.float32))


# ---------------------------------------------------------------- saving and loading in fresh processes

RESULT = "RESULT "


def run_fresh(source, cwd, **env):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    environment["PYTHONPATH"] = os.pathsep.join(sys.path)  # where this process found fused_xent
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=150,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return json.loads(lines[-1][len(RESULT) :])


# .keras last: its loader imports the classes' module by name, registering them without fused_xent's hook.
FORMATS = ("model.h5", "savedmodel", "model.keras")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_keras_saved")
    x, y, sample_weight = _data()
    np.savez(folder / "data.npz", x=x, y=y, sample_weight=sample_weight)
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input((6,)), tf_keras.layers.Dense(3)])
    loss = tk_losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, class_weights=[1, 2, 1])
    model.compile(
        optimizer="adam",
        loss=loss,
        weighted_metrics=[tk_metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent")],
    )
    model.fit(x, y, sample_weight=sample_weight, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are saving your model as an HDF5 file")
        for name in FORMATS:
            model.save(folder / name, save_format="tf" if name == "savedmodel" else None)
    evaluation = model.evaluate(x, y, sample_weight=sample_weight, verbose=0, return_dict=True)
    return folder, loss.get_config(), evaluation


LOAD = """
import json, sys
import numpy as np
{before}
import tensorflow as tf  # TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras
{after}
data = np.load("data.npz")
out = {{"legacy": tf.keras.__name__.startswith("tf_keras")}}
{control}
for name in {formats!r}:
    model = tf.keras.models.load_model(name)
    evaluation = model.evaluate(data["x"], data["y"], sample_weight=data["sample_weight"], verbose=0,
                                return_dict=True)
    out[name] = {{
        "loss": f"{{type(model.loss).__module__}}.{{type(model.loss).__name__}}",
        "config": model.loss.get_config(),
        "metrics": sorted(type(m).__module__ + "." + type(m).__name__ for m in model.metrics),  # built by evaluate
        "evaluation": evaluation,
    }}
print("RESULT " + json.dumps(out))
"""

CONTROL = """
try:
    tf.keras.models.load_model("model.h5")
    out["control"] = None
except Exception as error:
    out["control"] = f"{type(error).__name__}: {error}"
import fused_xent
"""


@pytest.mark.parametrize("order", ["fused_xent-first", "fused_xent-after-loading-fails"])
def test_reload_in_fresh_process(saved, order):
    folder, config, evaluation = saved
    parts = dict(before="", after="", control="", formats=FORMATS)
    if order == "fused_xent-first":
        parts["before"] = "import fused_xent  # the hook registers the classes when tf_keras is imported"
    else:
        parts["control"] = CONTROL  # without fused_xent the .h5 does not load; after the import it does
    result = run_fresh(LOAD.format(**parts), folder, TF_USE_LEGACY_KERAS="1")
    assert result["legacy"]
    if order != "fused_xent-first":
        assert result["control"] is not None and "fused_xent>SparseCategoricalCrossentropy" in result["control"]
    for name in FORMATS:
        loaded = result[name]
        assert loaded["loss"] == "fused_xent.tf_keras.losses.SparseCategoricalCrossentropy", name
        assert loaded["config"] == config, name
        assert "fused_xent.tf_keras.metrics.SparseCategoricalCrossentropy" in loaded["metrics"], name
        for key, value in evaluation.items():
            assert_float32_close(loaded["evaluation"][key], value, what=f"{name} {key}")
