"""fused_xent.losses across processes: saved models loaded in fresh interpreters,
distribution strategies (which need devices configured before TensorFlow starts),
another Keras backend, and the examples. Every child process is bounded in time."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from fused_xent import losses as fused_losses  # noqa: E402
from tests._support import ROOT, keras_versions  # noqa: E402

EXAMPLES = ROOT / "examples"
RESULT = "RESULT "


def run_python(args, cwd, timeout=120, **env):
    """Runs `python *args` in a fresh interpreter; returns (CompletedProcess, parsed RESULT line or None)."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    process = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    return process, (json.loads(lines[-1][len(RESULT) :]) if lines else None)


def run_script(source, cwd, timeout=120, **env):
    process, result = run_python(["-c", textwrap.dedent(source)], cwd, timeout, **env)
    assert result is not None, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return result


# ---------------------------------------------------------------- saving and loading


class _Scorer(tf.Module):
    """A serving function that calls the fused op through the Keras loss."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 4], tf.float32)])
    def score(self, labels, logits):
        return fused_losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(labels, logits)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compiled .keras model and a SavedModel using the op, with the inputs and the expected outputs."""
    folder = tmp_path_factory.mktemp("saved")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 4, size=64)
    logits = rng.normal(size=(16, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=16)
    np.savez(folder / "data.npz", x=x, y=y, logits=logits, labels=labels)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)])
    loss = fused_losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, class_weights=[1, 2, 1, 1])
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(folder / "model.keras")
    tf.saved_model.save(_Scorer(), str(folder / "savedmodel"))
    return {
        "folder": folder,
        "loss_config": loss.get_config(),
        "evaluation": float(model.evaluate(x, y, verbose=0)),
        "scores": keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(labels, logits).numpy(),
    }


def test_saved_models_load_in_fresh_process_after_import(saved):
    result = run_script(
        """
        import json
        import numpy as np
        import tensorflow as tf
        import keras
        import fused_xent

        data = np.load("data.npz")
        model = keras.models.load_model("model.keras")
        scores = tf.saved_model.load("savedmodel").score(data["labels"], data["logits"])
        print("RESULT " + json.dumps({
            "loss_class": type(model.loss).__module__ + "." + type(model.loss).__name__,
            "loss_config": model.loss.get_config(),
            "evaluation": float(model.evaluate(data["x"], data["y"], verbose=0)),
            "scores": scores.numpy().tolist(),
        }))
        """,
        cwd=saved["folder"],
    )
    assert result["loss_class"] == "fused_xent.losses.SparseCategoricalCrossentropy"
    assert result["loss_config"] == saved["loss_config"]
    np.testing.assert_allclose(result["evaluation"], saved["evaluation"], rtol=1e-6)
    np.testing.assert_allclose(result["scores"], saved["scores"], rtol=1e-5)


def test_savedmodel_without_import_names_the_missing_op(saved):
    result = run_script(
        """
        import json
        import tensorflow as tf

        try:
            tf.saved_model.load("savedmodel")
            outcome = {"error": None}
        except Exception as error:
            outcome = {"error": type(error).__name__, "message": str(error)}
        print("RESULT " + json.dumps(outcome))
        """,
        cwd=saved["folder"],
    )
    assert result["error"] is not None, "loaded without the op library: the test is not testing anything"
    assert "FusedXent>SparseSoftmaxCrossEntropy" in result["message"], result["message"]


def test_other_keras_backend_in_fresh_process(tmp_path):
    """With KERAS_BACKEND=numpy, `import fused_xent` still works (the ops too); the losses explain."""
    pytest.importorskip("jax")  # Keras's NumPy backend imports JAX
    result = run_script(
        """
        import json
        import fused_xent

        loss = fused_xent.sparse_softmax_cross_entropy_with_logits([1], [[0.0, 0.0]])
        try:
            fused_xent.losses.CategoricalCrossentropy()
            outcome = {"error": None}
        except Exception as error:
            outcome = {"error": type(error).__name__, "message": str(error)}
        outcome["op_loss"] = float(loss[0])
        print("RESULT " + json.dumps(outcome))
        """,
        cwd=tmp_path,
        KERAS_BACKEND="numpy",
    )
    assert result["error"] == "RuntimeError" and "'numpy' backend" in result["message"], result
    np.testing.assert_allclose(result["op_loss"], np.log(2.0), rtol=1e-6)


# ---------------------------------------------------------------- distribution strategies

MIRRORED = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import fused_xent

rng = np.random.default_rng(0)
x = rng.normal(size=(128, 10)).astype(np.float32)
y = np.argmax(x @ rng.normal(size=(10, 3)), -1)


def train(strategy, loss):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
        # Plain SGD: a gradient summed over replicas without the 1/replicas would show.
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"], strategy.num_replicas_in_sync


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ours = train(mirrored, fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True))
single = train(tf.distribute.get_strategy(), fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True))
theirs = train(mirrored, keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def gap(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a[0], b[0]))


print("RESULT " + json.dumps({
    "replicas": ours[2],
    "vs_single_device": gap(ours, single),
    "vs_keras_loss": gap(ours, theirs),
    "losses": [ours[1], single[1], theirs[1]],
}))
"""


def test_mirrored_strategy_trains_like_one_device(tmp_path):
    result = run_script(MIRRORED, cwd=tmp_path, timeout=150)
    assert result["replicas"] == 2
    assert result["vs_keras_loss"] < 1e-5, result
    ours, single, theirs = result["losses"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    if not keras_versions.LOSSES_SCALED_FOR_REPLICAS:
        pytest.skip(keras_versions.NOT_SCALED_FOR_REPLICAS + " (ours trained as Keras's did)")
    assert result["vs_single_device"] < 1e-5, result
    np.testing.assert_allclose(ours, single, rtol=1e-5)


@pytest.mark.skipif(
    not keras_versions.LOSSES_SCALED_FOR_REPLICAS,
    reason=keras_versions.NOT_SCALED_FOR_REPLICAS + "; with Keras 3.0 the example's two workers even end with "
    "different weights, keras.losses' own loss in it too",
)
def test_multi_worker_example_trains_like_one_process(tmp_path):
    """Two workers end with the weights of one process trained on the same global batches.

    Agreement between the workers alone holds for any scaling of the loss; this
    comparison does not (a mean not divided by the replicas doubles every step).
    Plain SGD, since Adam's update does not change when the gradient is scaled.
    """
    example, options = str(EXAMPLES / "distributed_training.py"), ["--epochs", "1", "--optimizer", "sgd"]
    process, _ = run_python(
        [example, "--workers", "2", "--timeout", "150", "--save-weights", "workers.npz", *options],
        cwd=tmp_path,
        timeout=200,
    )
    assert process.returncode == 0, process.stdout[-5000:] + process.stderr[-3000:]
    assert "2 replicas" in process.stdout and "all 2 workers agree" in process.stdout, process.stdout
    process, result = run_python([example, "--single-process", "--save-weights", "single.npz", *options], tmp_path)
    assert process.returncode == 0 and result["replicas"] == 1, process.stdout[-3000:] + process.stderr[-3000:]

    workers, single = np.load(tmp_path / "workers.npz"), np.load(tmp_path / "single.npz")
    assert len(workers.files) == len(single.files) == 4  # two Dense layers' kernels and biases
    # The runs differ only in float32 rounding: each step's gradient is the sum of two
    # 32-example halves (all-reduced) instead of one 64-example sum, a few ulps of it,
    # and the 28 steps of 0.1 * gradient add up to a few 1e-7 on weights below 0.5 (the
    # largest gap measured was 4.5e-8). A loss scaled by 2 on two replicas moves the
    # weights by about 0.1.
    for name in single.files:
        np.testing.assert_allclose(workers[name], single[name], rtol=0, atol=2e-6, err_msg=name)


# ---------------------------------------------------------------- the digits example


def test_train_digits_example(tmp_path):
    plot = tmp_path / "curves.png"
    process, _ = run_python([str(EXAMPLES / "train_digits.py"), "--epochs", "2", "--out", str(plot)], tmp_path)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = process.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("fused_xent ", "keras "))}
    assert set(rows) == {"fused_xent", "keras"}
    assert float(rows["fused_xent"][1]) > 0.5 and float(rows["keras"][1]) > 0.5  # test accuracy after 2 epochs
    gap_line = next(line for line in lines if line.startswith("largest difference"))
    assert float(gap_line.split()[-1]) < 1e-4
