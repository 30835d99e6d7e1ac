"""Keras 3's distribution API on the JAX backend with fused_xent's losses: one train step
under keras.distribution.DataParallel, and under ModelParallel with the head's kernel
sharded on its classes, on 8 virtual CPU devices (a fresh process per mode,
tests/_support/keras_jax_distributed.py), gives Keras's own loss value and moves no more
between devices than Keras's own loss, plus the two scalars every device shares to turn
an invalid sparse label into an error on all of them; nothing gathers the logits."""

import pytest

from tests._support.runners import run_keras_backend_script

pytest.importorskip("jax")
pytest.importorskip("keras")

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)

LABEL_CHECK_ELEMENTS = 2  # jax/_sharding.py: _share_invalid_label


@pytest.fixture(scope="module", params=["data_parallel", "model_parallel"])
def steps(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed") / "unused"
    return run_keras_backend_script("keras_jax_distributed.py", "jax", request.param, path)


def test_eight_devices(steps):
    assert steps["devices"] == 8


@pytest.mark.parametrize("labels", ["sparse", "dense"])
def test_same_loss_as_keras(steps, labels):
    ours, keras = steps[f"ours {labels}"]["loss"], steps[f"keras {labels}"]["loss"]
    assert abs(ours - keras) <= 2e-5 * abs(keras)


@pytest.mark.parametrize("labels", ["sparse", "dense"])
def test_moves_what_keras_moves(steps, labels):
    ours, keras = steps[f"ours {labels}"], steps[f"keras {labels}"]
    allowance = LABEL_CHECK_ELEMENTS if labels == "sparse" else 0
    assert ours["moved"] <= keras["moved"] + allowance, (ours, keras)
    assert ours["largest_gather"] == 0
