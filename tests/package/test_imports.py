"""What importing fused_xent imports, and that the import order does not matter.

Each test runs a fresh interpreter: which modules an import pulls in, and the
hook that registers the ops when TensorFlow is imported later, can only be seen
before anything else has imported them.
"""

from pathlib import Path

import numpy as np
import pytest

from tests._support.runners import run_fresh

FRAMEWORKS = ("tensorflow", "keras", "jax", "torch", "tf_keras")


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---------------------------------------------------------------- NumPy only


@pytest.mark.parametrize("statement", ["import fused_xent.numpy", "import fused_xent", "from fused_xent import numpy"])
def test_numpy_api_imports_no_framework(statement, tmp_path):
    result = run_fresh(
        f"""
        import json, sys
        import numpy as np
        {statement}
        import fused_xent

        logits = np.array([[0.0, 1.0, -2.0], [3.0, 0.5, 0.5]], np.float32)
        sparse, sparse_grad = fused_xent.numpy.sparse_softmax_cross_entropy_with_logits(np.array([1, 0]), logits)
        dense, dense_grad = fused_xent.numpy.softmax_cross_entropy_with_logits(np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]), logits)
        # Package attributes that need no TensorFlow must not import it either.
        info, version, names = fused_xent.build_info(), fused_xent.__version__, dir(fused_xent)
        print("RESULT " + json.dumps({{
            "imported": [name for name in {FRAMEWORKS!r} if name in sys.modules],
            "sparse": sparse.tolist(), "sparse_grad": sparse_grad.tolist(),
            "dense": dense.tolist(), "dense_grad": dense_grad.tolist(),
            "version": version, "names": names,
        }}))
        """,
        tmp_path,
    )
    assert result["imported"] == [], result["imported"]
    logp = log_softmax([[0.0, 1.0, -2.0], [3.0, 0.5, 0.5]])
    onehot = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    soft = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    for labels, loss, grad in ((onehot, "sparse", "sparse_grad"), (soft, "dense", "dense_grad")):
        np.testing.assert_allclose(result[loss], -(labels * logp).sum(-1), rtol=1e-6)
        np.testing.assert_allclose(result[grad], np.exp(logp) - labels, rtol=1e-5, atol=1e-7)
    assert result["version"]
    assert {"sparse_softmax_cross_entropy_with_logits", "losses", "metrics", "tf_keras", "cached_memory_info"} <= set(
        result["names"]
    )


# ---------------------------------------------------------------- saved models, in either import order


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A SavedModel calling the op (and its gradient) and a .keras model compiled with our loss."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import fused_xent

    folder = tmp_path_factory.mktemp("saved")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    np.savez(folder / "data.npz", logits=logits, labels=labels)

    class Scorer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 5], tf.float32)])
        def score(self, labels, logits):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                loss = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, logits)
            return loss, tape.gradient(loss, logits)

    tf.saved_model.save(Scorer(), str(folder / "savedmodel"))
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])
    model.compile(loss=fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.2))
    model.save(folder / "model.keras")
    return folder, logits, labels


LOAD_BOTH = """
import json
import numpy as np
import tensorflow as tf
import keras

data = np.load("data.npz")
loss, grad = tf.saved_model.load("savedmodel").score(data["labels"], data["logits"])
model = keras.models.load_model("model.keras")
print("RESULT " + json.dumps({
    "loss": loss.numpy().tolist(),
    "grad": grad.numpy().tolist(),
    "loss_class": type(model.loss).__module__ + "." + type(model.loss).__name__,
    "keras_loss": float(model.loss(data["labels"], data["logits"])),
}))
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import fused_xent\nimport tensorflow",  # isort's order: the hook registers as tensorflow finishes
        "import tensorflow\nimport fused_xent",  # registered at once
        "import fused_xent\nimport keras",  # keras imports tensorflow, which imports keras.src: a cycle
        "import fused_xent.numpy",  # the NumPy module alone, then tensorflow and keras (LOAD_BOTH)
    ],
    ids=["fused_xent-tensorflow", "tensorflow-fused_xent", "fused_xent-keras", "fused_xent.numpy-tensorflow"],
)
def test_saved_models_load_in_any_import_order(imports, saved, tmp_path):
    folder, logits, labels = saved
    result = run_fresh(imports + "\n" + LOAD_BOTH, folder)
    logp = log_softmax(logits)
    onehot = np.eye(5)[labels]
    np.testing.assert_allclose(result["loss"], -logp[np.arange(len(labels)), labels], rtol=1e-5)
    np.testing.assert_allclose(result["grad"], np.exp(logp) - onehot, rtol=1e-5, atol=1e-6)
    assert result["loss_class"] == "fused_xent.losses.SparseCategoricalCrossentropy"
    smoothed = 0.8 * onehot + 0.2 / 5
    np.testing.assert_allclose(result["keras_loss"], -(smoothed * logp).sum(-1).mean(), rtol=1e-5)


def test_keras_model_without_fused_xent_does_not_get_our_loss(saved, tmp_path):
    """The control of the test above: without `import fused_xent` the loss class is not ours."""
    folder = saved[0]
    result = run_fresh(
        """
        import json
        import keras

        try:
            keras.models.load_model("model.keras")
            outcome = None
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
        print("RESULT " + json.dumps(outcome))
        """,
        folder,
    )
    assert result is not None and "Could not locate class 'SparseCategoricalCrossentropy'" in result, result


# ---------------------------------------------------------------- the attributes


def test_tensorflow_attributes_are_imported_on_first_use(tmp_path):
    pytest.importorskip("tensorflow")
    result = run_fresh(
        """
        import json, sys
        import fused_xent

        watched = ("tensorflow", "fused_xent._tf.ops", "fused_xent.losses", "fused_xent.metrics", "tf_keras")
        before = [name for name in watched if name in sys.modules]
        loss = fused_xent.sparse_softmax_cross_entropy_with_logits([1], [[0.0, 0.0]])
        dense = fused_xent.softmax_cross_entropy_with_logits([[0.25, 0.75]], [[0.0, 0.0]])
        info = fused_xent.cached_memory_info()
        released = fused_xent.release_cached_memory()
        from fused_xent import losses, sparse_softmax_cross_entropy_with_logits
        keras_loss = fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True)([1], [[0.0, 0.0]])
        metric = fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True)
        metric.update_state([1], [[0.0, 0.0]])
        hooks = [f for f in sys.meta_path if type(f).__module__ == "fused_xent._registration"]
        waiting = sorted(hooks[0].pending) if hooks else None  # tensorflow and keras are in; tf_keras is not
        tf_keras_imported = "tf_keras" in sys.modules
        tf_keras_loss = fused_xent.tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)([1], [[0.0, 0.0]])
        try:
            fused_xent.no_such_attribute
            missing = None
        except AttributeError as error:
            missing = str(error)
        print("RESULT " + json.dumps({
            "before": before,
            "loss": float(loss[0]), "dense": float(dense[0]), "keras_loss": float(keras_loss),
            "metric": float(metric.result()), "tf_keras_loss": float(tf_keras_loss),
            "waiting": waiting, "tf_keras_imported": tf_keras_imported,
            "info_keys": sorted(info), "released": released,
            "same_function": sparse_softmax_cross_entropy_with_logits is fused_xent.sparse_softmax_cross_entropy_with_logits,
            "losses_module": losses.__name__, "metrics_module": fused_xent.metrics.__name__,
            "tf_keras_module": fused_xent.tf_keras.__name__,
            "missing": missing,
            "hooks_left": [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "fused_xent._registration"],
            "tensorflow_loader": type(sys.modules["tensorflow"].__spec__.loader).__name__,
            "tf_keras_loader": type(sys.modules["tf_keras"].__spec__.loader).__name__,
        }))
        """,
        tmp_path,
    )
    assert result["before"] == []
    for key in ("loss", "dense", "keras_loss", "metric", "tf_keras_loss"):
        np.testing.assert_allclose(result[key], np.log(2.0), rtol=1e-6)
    assert result["info_keys"] == ["idle_blocks", "idle_bytes", "in_use_blocks", "in_use_bytes", "limit_bytes"]
    assert isinstance(result["released"], int)
    assert result["same_function"] and result["losses_module"] == "fused_xent.losses"
    assert result["metrics_module"] == "fused_xent.metrics" and result["tf_keras_module"] == "fused_xent.tf_keras"
    # The Keras 3 losses and metrics do not import tf_keras; the hook waits for it, and leaves once it came.
    assert result["waiting"] == ["tf_keras"] and not result["tf_keras_imported"], result
    assert "no_such_attribute" in result["missing"]
    # The hook is gone once tensorflow, keras and tf_keras are imported, and they keep their own loaders.
    assert result["hooks_left"] == [] and result["tensorflow_loader"] == result["tf_keras_loader"] == "SourceFileLoader"


def test_keras_on_another_backend_imports_no_tensorflow(tmp_path):
    pytest.importorskip("keras")
    result = run_fresh(
        """
        import json, sys
        import fused_xent
        import keras

        print("RESULT " + json.dumps({
            "backend": keras.backend.backend(),
            "imported": [name for name in ("tensorflow", "fused_xent.losses") if name in sys.modules],
        }))
        """,
        tmp_path,
        KERAS_BACKEND="numpy",
    )
    assert result == {"backend": "numpy", "imported": []}


def test_keras_modules_on_jax_import_no_tensorflow(tmp_path):
    """fused_xent.losses and fused_xent.metrics on Keras's JAX backend: first use imports neither
    TensorFlow nor tf_keras."""
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    result = run_fresh(
        """
        import json, sys
        import fused_xent
        import keras

        metric = fused_xent.metrics.CategoricalCrossentropy(from_logits=True)
        metric.update_state([[0.25, 0.75]], [[0.0, 0.0]])
        print("RESULT " + json.dumps({
            "metric": float(metric.result()),
            "losses": fused_xent.losses.__name__,
            "imported": [name for name in ("tensorflow", "tf_keras") if name in sys.modules],
        }))
        """,
        tmp_path,
        KERAS_BACKEND="jax",
    )
    assert result["imported"] == [] and result["losses"] == "fused_xent.losses", result
    np.testing.assert_allclose(result["metric"], np.log(2.0), rtol=1e-6)


def _called_name(call):
    function = call.func
    return function.attr if hasattr(function, "attr") else getattr(function, "id", None)


def test_only_fused_xent_tf_keras_imports_tf_keras():
    """Every import of tf_keras in the package's source is in fused_xent/tf_keras/."""
    import ast

    import fused_xent

    package = Path(fused_xent.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__"):
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if any(name == "tf_keras" or str(name).startswith("tf_keras.") for name in names):
                importers.add(path.relative_to(package).parts[0])
    assert importers == {"tf_keras"}, importers  # the subpackage, found (so the scan works), and nothing else


def test_fused_xent_tf_keras_without_tf_keras_says_what_to_install(tmp_path):
    result = run_fresh(
        """
        import json, sys
        sys.modules["tf_keras"] = None  # as if it were not installed
        try:
            import fused_xent.tf_keras
            message = None
        except ImportError as error:
            message = str(error)
        print("RESULT " + json.dumps({"message": message, "tensorflow": "tensorflow" in sys.modules}))
        """,
        tmp_path,
    )
    assert result["message"] is not None and 'pip install "fused-xent[tf_keras]"' in result["message"], result
    assert not result["tensorflow"]


def test_version_mismatch_is_raised_when_tensorflow_comes_later(tmp_path):
    """`import fused_xent` before tensorflow: the mismatch is reported when tensorflow is
    imported (a warning: raising would break `import tensorflow`) and raised on first use."""
    pytest.importorskip("tensorflow")
    result = run_fresh(
        """
        import json, warnings
        import fused_xent
        from fused_xent._tf import loader as _loader

        _loader.built_tensorflow_version = lambda: "2.99.0"  # as if built against another TensorFlow
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import tensorflow as tf
        errors = []
        for name in ("sparse_softmax_cross_entropy_with_logits", "cached_memory_info", "losses"):
            try:
                getattr(fused_xent, name)
                errors.append(None)
            except ImportError as error:
                errors.append(str(error))
        print("RESULT " + json.dumps({
            "warnings": [str(w.message) for w in caught if "fused_xent" in str(w.message)],
            "errors": errors,
            "running": tf.__version__,
        }))
        """,
        tmp_path,
    )
    assert len(result["warnings"]) == 1 and "built against TensorFlow 2.99.0" in result["warnings"][0], result
    for error in result["errors"]:
        assert error is not None and "built against TensorFlow 2.99.0" in error, result
        assert f"TensorFlow {result['running']} is installed" in error
