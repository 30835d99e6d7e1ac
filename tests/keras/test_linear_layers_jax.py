"""fused_xent.layers' LinearCrossEntropy and TiedEmbedding on Keras's JAX backend (in fresh
processes, tests/_support/keras_jax_linear_head.py): training, the added loss, saving and
loading, the float64 reference, mixed precision, and ModelParallel with the head's kernel
sharded on the vocabulary."""

import numpy as np
import pytest

from tests._support.runners import run_keras_backend_script

pytest.importorskip("jax")
pytest.importorskip("keras")

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return run_keras_backend_script("keras_jax_linear_head.py", "jax", "layers", tmp_path_factory.mktemp("layers"))


@pytest.mark.parametrize("kind", ["head", "tied"])
def test_fit_save_load(layers, kind):
    fit = layers["fit"][kind]
    assert fit["history"][-1] < fit["history"][0]
    assert fit["ignored_are_zero"]
    np.testing.assert_allclose(fit["evaluate"], fit["mean_counted"], rtol=1e-5)  # mean over counted tokens
    assert fit["loaded_equal"]
    assert fit["weights"][0] == fit["weights"][1]  # tying survives loading


def test_head_matches_the_reference(layers):
    assert layers["reference"] is True  # the script asserts loss, logits and top_k itself


def test_mixed_precision(layers):
    mixed = layers["mixed"]
    assert mixed["embeddings_dtype"] == "float32" and mixed["output_dtype"] == "float32"
    assert np.isfinite(mixed["history"]).all() and mixed["history"][-1] < mixed["history"][0]


def test_model_parallel_head_sharded_on_classes(tmp_path):
    """A ModelParallel train step (4 batch x 2 model devices, the head's kernel split over the
    vocabulary) with our head: Keras's loss value from the same weights, the same update, and
    no more data moved than with Dense + Keras's loss."""
    result = run_keras_backend_script("keras_jax_linear_head.py", "jax", "model_parallel", tmp_path)
    assert result["devices"] == 8 and result["kernel_sharding"] == "P(None, 'model')"
    np.testing.assert_allclose(result["ours"]["loss"], result["keras"]["loss"], rtol=1e-5)
    assert result["kernels_equal_after_step"]
    assert result["ours"]["moved"] <= result["keras"]["moved"], result
