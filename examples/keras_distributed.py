"""Data + model parallel training with fused_xent's loss on Keras 3's JAX backend.

8 virtual CPU devices stand in for accelerators: a (4 x 2) mesh, the batch over "batch",
the output layer's kernel over "model" (its classes: vocabulary-parallel cross-entropy, the
logits never gathered). Prints the loss per epoch, ours and Keras's own from the same
weights.

    python examples/keras_distributed.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fused_xent  # noqa: E402

SAMPLES, FEATURES, CLASSES = 2048, 32, 1000


def distribution():
    mesh = keras.distribution.DeviceMesh((4, 2), ["batch", "model"], devices=jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*head/kernel"] = (None, "model")
    layout_map[".*head/bias"] = ("model",)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def train(loss, data, weights):
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(CLASSES, name="head")]
    )
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    return model.fit(*data, batch_size=256, epochs=3, shuffle=False, verbose=0).history["loss"]


def main():
    assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"
    keras.distribution.set_distribution(distribution())
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, SAMPLES)
    x = centers[y] + 0.3 * rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    weights = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(CLASSES, name="head")]
    ).get_weights()
    ours = train(fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y), weights)
    theirs = train(keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y), weights)
    print(f"{len(jax.devices())} devices, mesh (batch 4, model 2), head kernel sharded over its {CLASSES} classes")
    for epoch, (a, b) in enumerate(zip(ours, theirs), 1):
        print(f"epoch {epoch}: fused_xent {a:.5f}   Keras {b:.5f}")


if __name__ == "__main__":
    main()
