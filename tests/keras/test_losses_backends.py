"""fused_xent.losses on Keras's JAX and PyTorch backends, each in a fresh interpreter
(KERAS_BACKEND is read once, at `import keras`): values equal to Keras's own losses
for every reduction, sample weights, ignore_class, probabilities and other axes;
`fit` curves equal to training with Keras's loss; a saved model loads in another
fresh interpreter after `import fused_xent`, without TensorFlow.
"""

import importlib.util

import numpy as np
import pytest

from tests._support import keras_versions
from tests._support.runners import run_keras_backend_script

BACKENDS = {"jax": "jax", "torch": "torch"}  # backend: the module it needs


def run_checks(backend, mode, path):
    return run_keras_backend_script("keras_backend_checks.py", backend, mode, path)


_results = {}


def results(backend, tmp_path_factory):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed")
    if backend not in _results:
        path = tmp_path_factory.mktemp(backend) / "model.keras"
        _results[backend] = (run_checks(backend, "run", path), path)
    return _results[backend]


def assert_same_as_keras(ours, theirs, rtol=2e-6, atol=1e-6):
    """float32 losses computed two ways: equal to a few float32 roundings."""
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=atol)


def test_comparison_rejects_planted_error():
    theirs = np.array([0.5, 1.25, 2.0, 1e-3])
    assert_same_as_keras(theirs * (1 + 1e-7), theirs)
    for planted in (theirs * np.array([1, 1, 1 + 1e-5, 1]), theirs + np.array([0, 0, 0, 2e-5])):
        with pytest.raises(AssertionError):
            assert_same_as_keras(planted, theirs)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_values_equal_keras(backend, tmp_path_factory):
    result, _ = results(backend, tmp_path_factory)
    assert result["backend"] == backend
    # keras_backend_checks.values(): 8 cases per reduction, 2 other axes, class weights per reduction,
    # and softcap (sparse and dense) under two reductions.
    reductions = keras_versions.reductions(["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"])
    class_weight_reductions = keras_versions.reductions(["sum_over_batch_size", "mean_with_sample_weight"])
    assert len(result["values"]) == 8 * len(reductions) + 2 + len(class_weight_reductions) + 2 * 2
    for name, (ours, theirs) in result["values"].items():
        try:
            assert_same_as_keras(ours, theirs)
        except AssertionError as error:
            raise AssertionError(f"{backend} {name}: {error}") from None


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fit_curves_equal_keras(backend, tmp_path_factory):
    result, _ = results(backend, tmp_path_factory)
    for name, (ours, theirs) in result["fit"].items():
        assert_same_as_keras(ours, theirs, rtol=1e-5, atol=1e-6)
        assert ours[0] != ours[2], name  # it trained


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_saved_model_loads_without_tensorflow(backend, tmp_path_factory):
    result, path = results(backend, tmp_path_factory)
    assert not result["tensorflow_imported"]
    loaded = run_checks(backend, "load", path)
    assert loaded["loss_class"] == "fused_xent.losses.SparseCategoricalCrossentropy"
    assert loaded["z_loss"] == 0.01 and loaded["class_weights"] == [1, 2, 1, 1, 1]
    assert_same_as_keras(loaded["evaluate"], result["saved"]["evaluate"])
    assert not loaded["tensorflow_imported"]
