"""Run by tests/keras/test_distribution_jax.py in a fresh interpreter with KERAS_BACKEND=jax
on 8 virtual CPU devices: trains Input(H) -> Dense(C) one step under
keras.distribution.DataParallel (MODE data_parallel) or ModelParallel with the head's
kernel sharded on its classes (MODE model_parallel) with fused_xent's losses and with
Keras's own, from the same weights, and prints as JSON after "RESULT " each step's loss and
the elements its compiled train step moves between devices (tests/_support/hlo_collectives.py).

Usage: python keras_jax_distributed.py MODE PATH (both ignored: the runner's convention)
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from hlo_collectives import collectives  # noqa: E402

from fused_xent import losses as fl  # noqa: E402

N, H, C = 64, 16, 512


def _model(weights):
    model = keras.Sequential([keras.Input((H,)), keras.layers.Dense(C, name="head")])
    if weights is not None:
        model.set_weights(weights)
    return model


def _step(loss, x, labels, weights):
    model = _model(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    value = float(model.train_on_batch(x, labels))
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    data = keras.distribution.distribution().get_data_layout(x.shape).backend_layout
    labels_layout = keras.distribution.distribution().get_data_layout(labels.shape).backend_layout
    batch = (jax.device_put(x, data), jax.device_put(labels, labels_layout), None)
    hlo = jax.jit(model.train_step, donate_argnums=0).lower(state, batch).compile().as_text()
    found = collectives(hlo)
    gathered = max((e for op, e in found if op == "all-gather"), default=0)
    return {"loss": value, "moved": sum(e for _, e in found), "largest_gather": gathered}


def _distribution(mode):
    if mode == "data_parallel":
        return keras.distribution.DataParallel(devices=jax.devices())
    mesh = keras.distribution.DeviceMesh((4, 2), ["batch", "model"], devices=jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*head/kernel"] = (None, "model")
    layout_map[".*head/bias"] = ("model",)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def main():
    assert keras.backend.backend() == "jax", keras.backend.backend()
    keras.distribution.set_distribution(_distribution(sys.argv[1]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, H)).astype("float32")
    y = rng.integers(0, C, N)
    onehot = np.eye(C, dtype="float32")[y]
    weights = _model(None).get_weights()
    cases = {
        "ours sparse": (fl.SparseCategoricalCrossentropy(from_logits=True), y),
        "keras sparse": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), y),
        "ours dense": (fl.CategoricalCrossentropy(from_logits=True), onehot),
        "keras dense": (keras.losses.CategoricalCrossentropy(from_logits=True), onehot),
    }
    result = {name: _step(loss, x, labels, weights) for name, (loss, labels) in cases.items()}
    result["devices"] = len(jax.devices())
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
