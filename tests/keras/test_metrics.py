"""fused_xent.metrics against Keras's own metrics: values across batches with sample weights and
reset_state, compile/fit(validation_data)/evaluate, mixed precision and .keras reloads in fresh
interpreters, on Keras's TensorFlow backend here and on JAX and PyTorch in fresh interpreters
(tests/_support/keras_metric_checks.py)."""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tests._support.assertions import assert_float32_close  # noqa: E402
from tests._support.runners import run_keras_backend_script  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
import fused_xent  # noqa: E402
from tests._support import keras_metric_checks as checks  # noqa: E402

CLASSES = 5
HALF = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
TOLERANCE = {"float32": 1e-5, "mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}  # half: per-element rounding


def test_comparison_rejects_planted_error():
    theirs = np.array([0.5, 1.25, 2.0, 1e-3])
    assert_float32_close(theirs * (1 + 1e-7), theirs)
    for planted in (theirs * np.array([1, 1, 1 + 1e-5, 1]), theirs + np.array([0, 0, 0, 2e-5]), theirs[:3]):
        with pytest.raises(AssertionError):
            assert_float32_close(planted, theirs)


def assert_values(values):
    for name, (ours, theirs) in values.items():
        assert_float32_close(ours, theirs, what=name)


def assert_training(training):
    for policy, run in training.items():
        assert run["logits_dtype"] == HALF.get(policy, "float32")  # the metrics received half logits
        rtol = TOLERANCE[policy]
        history, evaluation = run["history"], run["evaluate"]
        assert {"ours", "ours_w", "val_ours", "val_ours_w"} <= set(history)
        for logs in (history, {key: [value] for key, value in evaluation.items()}):
            for key in logs:
                if "ours" in key:
                    their_key = key.replace("ours", "theirs")
                    assert_float32_close(logs[key], logs[their_key], rtol=rtol, what=f"{policy} {key}")
        assert abs(evaluation["ours"] - evaluation["ours_w"]) > 1e-4  # the sample weights reached the metric


def assert_reloaded(loaded, saved):
    assert loaded["classes"] == ["fused_xent.metrics.SparseCategoricalCrossentropy"] * 2
    assert loaded["configs"][0] == {
        "name": "ours",
        # What Keras's own metric keeps of dtype=None: "float32" (None before Keras 3.2).
        "dtype": keras.metrics.SparseCategoricalCrossentropy().get_config()["dtype"],
        "from_logits": True,
        "ignore_class": None,
        "axis": -1,
        "label_smoothing": 0.0,
        "softcap": None,
    }
    for key, value in saved.items():
        assert_float32_close(loaded["evaluate"][key], value, what=key)


def run_checks(backend, mode, path):
    return run_keras_backend_script("keras_metric_checks.py", backend, mode, path)


# ---------------------------------------------------------------- TensorFlow backend (this process)


def test_values_equal_keras_metrics():
    assert_values(checks.values())


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(8, 3, CLASSES)) * 2).astype(np.float32)
    y = rng.integers(0, CLASSES, size=(8, 3))
    return z, y, rng.random(8).astype(np.float32)


def _results(metric, batches):
    for args in batches:
        metric.update_state(*args)
    return float(metric.result())


def test_axes_and_label_shapes_equal_keras_metrics():
    z, y, sw = _inputs()
    moved = np.moveaxis(z, -1, 1)
    soft = np.random.default_rng(5).dirichlet(np.ones(CLASSES), size=(8, 3)).astype(np.float32)
    cases = [  # (ours, its batches, Keras's, its batches)
        (
            fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True, axis=1),
            [(y, moved, sw)],
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
            [(y, z, sw)],
        ),
        (
            fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True),
            [(y[:, :1], z[:, 0], sw)],
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
            [(y[:, 0], z[:, 0], sw)],
        ),
        (
            fused_xent.metrics.CategoricalCrossentropy(from_logits=True, axis=1),
            [(np.moveaxis(soft, -1, 1), moved, sw)],
            keras.metrics.CategoricalCrossentropy(from_logits=True, axis=1),
            [(np.moveaxis(soft, -1, 1), moved, sw)],
        ),
    ]
    for ours, our_batches, theirs, their_batches in cases:
        assert_float32_close(_results(ours, our_batches), _results(theirs, their_batches), what=ours.name)


def test_label_smoothing_of_sparse_labels_equals_categorical():
    z, y, sw = _inputs()
    ours = fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    theirs = keras.metrics.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    assert_float32_close(_results(ours, [(y, z, sw)]), _results(theirs, [(onehot, z, sw)]))


def test_softmax_outputs_equal_keras_metrics():
    """A softmax output with from_logits=False: Keras reads its logits, and so do we."""
    x = np.random.default_rng(2).normal(size=(16, 6)).astype(np.float32) * 8.0  # saturated: clipping would show
    y = np.arange(16) % 3
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=[
            fused_xent.metrics.SparseCategoricalCrossentropy(name="ours"),
            keras.metrics.SparseCategoricalCrossentropy(name="theirs"),
        ],
    )
    evaluation = model.evaluate(x, y, verbose=0, return_dict=True)
    assert_float32_close(evaluation["ours"], evaluation["theirs"])


def test_metric_runs_the_forward_op_only():
    """The metric's update adds the fused forward op to the graph, not its gradient."""
    z, y, _ = _inputs()
    metric = fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True)
    graph = tf.function(lambda labels, logits: metric.update_state(labels, logits) and None)
    op_types = {op.type for op in graph.get_concrete_function(y, z).graph.get_operations()}
    assert "FusedXent>SparseSoftmaxCrossEntropy" in op_types
    assert not any(t.startswith("FusedXent") and t.endswith("Grad") for t in op_types), op_types


def test_fit_evaluate_and_mixed_precision_equal_keras_metrics():
    assert_training(checks.training(("float32", "mixed_float16", "mixed_bfloat16")))


def test_reload_in_fresh_process(tmp_path):
    saved = checks.save(tmp_path / "model.keras")
    loaded = run_checks("tensorflow", "load", tmp_path / "model.keras")
    assert_reloaded(loaded, saved)


def test_config_round_trip_and_registered_names():
    metrics = [
        fused_xent.metrics.SparseCategoricalCrossentropy("s", "float64", True, 255, 1, label_smoothing=0.1),
        fused_xent.metrics.CategoricalCrossentropy("c", None, True, 0.2, 1),
    ]
    for metric in metrics:
        config = metric.get_config()
        assert type(metric).from_config(config).get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(restored) is type(metric) and restored.get_config() == config
    assert metrics[0].get_config() == {
        "name": "s",
        "dtype": "float64",
        "from_logits": True,
        "ignore_class": 255,
        "axis": 1,
        "label_smoothing": 0.1,
        "softcap": None,
    }
    names = [keras.saving.get_registered_name(type(m)) for m in metrics]
    assert names == ["fused_xent>SparseCategoricalCrossentropyMetric", "fused_xent>CategoricalCrossentropyMetric"]
    # The losses keep their own names: a metric registered under them would replace them.
    assert (
        keras.saving.get_registered_object("fused_xent>CategoricalCrossentropy")
        is fused_xent.losses.CategoricalCrossentropy
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fused_xent.metrics.SparseCategoricalCrossentropy(ignore_class=1.5), "ignore_class"),
        (lambda: fused_xent.metrics.SparseCategoricalCrossentropy(axis="last"), "axis"),
        (lambda: fused_xent.metrics.SparseCategoricalCrossentropy(label_smoothing=2.0), "label_smoothing"),
        (lambda: fused_xent.metrics.CategoricalCrossentropy(label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_other_keras_backends_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(RuntimeError, match=r"fused_xent\.metrics\.CategoricalCrossentropy runs on Keras's"):
        fused_xent.metrics.CategoricalCrossentropy()


def test_bad_inputs_are_named():
    metric = fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="same shape except for the class axis"):
        metric.update_state(np.zeros((4, 2), np.int64), np.zeros((4, 3, CLASSES), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 7"):
        metric.update_state(np.array([0, 7]), np.zeros((2, CLASSES), np.float32))


# ---------------------------------------------------------------- JAX and PyTorch backends (fresh processes)

BACKENDS = {"jax": "jax", "torch": "torch"}  # backend: the module it needs


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_other_backend_equals_keras_metrics_and_reloads(backend, tmp_path):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed")
    path = tmp_path / "model.keras"
    result = run_checks(backend, "run", path)
    assert result["backend"] == backend
    assert_values(result["values"])
    assert_training(result["training"])
    loaded = run_checks(backend, "load", path)
    assert_reloaded(loaded, result["saved"])
    assert not loaded["tensorflow_imported"]
