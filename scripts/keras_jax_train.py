"""Trains small Keras models on the JAX backend with fused_xent's CategoricalCrossentropy and
SparseCategoricalCrossentropy (from logits, and from probabilities for the sparse one) and
with Keras's own, from the same initial weights on the same data, and checks that each of ours
learns (the loss falls) and follows Keras's loss history to float32 rounding. Runs on JAX's
default device (the GPU in scripts/gpu_check.sh). Prints a table and one line "RESULT {json}";
exits with status 1 on a failure.

    KERAS_BACKEND=jax python scripts/keras_jax_train.py
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from fused_xent import losses as fl  # noqa: E402

SAMPLES, FEATURES, CLASSES, EPOCHS = 4096, 32, 200, 4


def history(loss, y, x, final_activation=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES, activation=final_activation),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss, metrics=["accuracy"], jit_compile=True)
    return model.fit(x, y, batch_size=256, epochs=EPOCHS, shuffle=False, verbose=0).history["loss"]


def main():
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import jax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(FEATURES, CLASSES)), axis=1)  # learnable: linear classes
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    cases = {
        "SparseCategoricalCrossentropy(from_logits=True)": (
            fl.SparseCategoricalCrossentropy(from_logits=True),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            y,
            None,
        ),
        "SparseCategoricalCrossentropy(softmax output)": (
            fl.SparseCategoricalCrossentropy(),
            keras.losses.SparseCategoricalCrossentropy(),
            y,
            "softmax",
        ),
        "CategoricalCrossentropy(from_logits=True)": (
            fl.CategoricalCrossentropy(from_logits=True),
            keras.losses.CategoricalCrossentropy(from_logits=True),
            onehot,
            None,
        ),
        "CategoricalCrossentropy(label_smoothing=0.1)": (
            fl.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
            keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
            onehot,
            None,
        ),
    }
    results, failures = {}, []
    print(f"device: {jax.devices()[0].device_kind}; {SAMPLES} samples, {CLASSES} classes, {EPOCHS} epochs")
    for name, (ours, theirs, labels, activation) in cases.items():
        h_ours, h_keras = history(ours, labels, x, activation), history(theirs, labels, x, activation)
        difference = float(np.max(np.abs(np.array(h_ours) - np.array(h_keras)) / np.abs(h_keras)))
        learned = h_ours[-1] < 0.7 * h_ours[0]
        results[name] = dict(ours=h_ours, keras=h_keras, max_relative_difference=difference, learned=learned)
        print(
            f"{name:>48}: loss {h_ours[0]:.4f} -> {h_ours[-1]:.4f} (Keras {h_keras[0]:.4f} -> {h_keras[-1]:.4f}), "
            f"max relative difference {difference:.1e}"
        )
        if not learned:
            failures.append(f"{name}: the loss did not fall ({h_ours})")
        if not difference < 2e-3:
            failures.append(f"{name}: differs from Keras's loss by {difference:.1e} (relative)")
    for line in failures:
        print("FAILED: " + line)
    print("RESULT " + json.dumps(dict(device=jax.devices()[0].device_kind, results=results, failures=failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
