"""Run by tests/keras/test_linear_layers_jax.py in a fresh interpreter with KERAS_BACKEND=jax:
fused_xent.layers' LinearCrossEntropy and TiedEmbedding on Keras's JAX backend. Prints
"RESULT {json}".

MODE layers: a small language model with each layer trains (fit), its added loss is the
mean over counted tokens (evaluate vs predict), it saves and loads, the head's loss and
logits match the float64 reference, and mixed_bfloat16 trains.
MODE model_parallel (8 virtual CPU devices): keras.distribution.ModelParallel with the head's
kernel sharded on its classes; one train step with our head and with Dense + Keras's loss
from the same weights: their losses and the elements each compiled step moves.

Usage: python keras_jax_linear_head.py MODE PATH
"""

import json
import os
import sys

if sys.argv[1] == "model_parallel":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from fused_xent.layers import LinearCrossEntropy, TiedEmbedding  # noqa: E402

IGNORE = -100
VOCAB, DIM, ROWS, STEPS = 97, 16, 48, 10


def _lm(layer_kind, **head_options):
    tokens = keras.Input((STEPS,), dtype="int32")
    labels = keras.Input((STEPS,), dtype="int32")
    if layer_kind == "tied":
        embed = TiedEmbedding(VOCAB, DIM, **head_options)
        x = keras.layers.Dense(DIM, activation="tanh")(embed(tokens))
        loss = embed(x, labels, reverse=True)
    else:
        x = keras.layers.Dense(DIM, activation="tanh")(keras.layers.Embedding(VOCAB, DIM)(tokens))
        loss = LinearCrossEntropy(VOCAB, use_bias=True, name="head", **head_options)(x, labels)
    return keras.Model([tokens, labels], loss)


def _data():
    rng = np.random.default_rng(10)
    x = rng.integers(0, VOCAB, (ROWS, STEPS)).astype(np.int32)
    y = np.roll(x, -1, 1)
    y[:, -2:] = IGNORE
    return x, y


def _fit_save_load(layer_kind, path):
    keras.utils.set_random_seed(0)
    model = _lm(layer_kind, ignore_index=IGNORE)
    model.compile(keras.optimizers.Adam(0.01))
    x, y = _data()
    history = model.fit([x, y], epochs=3, batch_size=16, verbose=0).history["loss"]
    per_token = model.predict([x, y], verbose=0)
    counted = y != IGNORE
    model.save(path / f"{layer_kind}.keras")
    loaded = keras.models.load_model(path / f"{layer_kind}.keras")
    return {
        "history": history,
        "ignored_are_zero": bool(np.all(per_token[~counted] == 0)),
        "evaluate": float(model.evaluate([x, y], verbose=0, batch_size=ROWS)),
        "mean_counted": float(per_token[counted].mean()),
        "loaded_equal": bool(np.array_equal(loaded.predict([x, y], verbose=0), per_token)),
        "weights": [len(model.weights), len(loaded.weights)],
    }


def _head_against_reference():
    sys.path.insert(0, str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    from tests._support.linear_reference import assert_matches, reference_result

    head = LinearCrossEntropy(53, use_bias=True, label_smoothing=0.1, add_loss=False)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(37, 12)).astype("float32")
    labels = rng.integers(0, 53, 37).astype("int32")
    loss = np.asarray(head(hidden, labels))
    kernel, bias = np.asarray(head.kernel.value), np.asarray(head.bias.value)
    expected, mag = reference_result(hidden, kernel, bias, labels, np.ones(37), label_smoothing=0.1)
    assert_matches(loss, expected[0], mag["loss"], "float32", "loss")
    logits = np.asarray(hidden, np.float64) @ kernel + bias
    np.testing.assert_allclose(np.asarray(head(hidden)), logits, rtol=1e-5, atol=1e-5)
    _, indices = head.top_k(hidden, k=3)
    np.testing.assert_array_equal(np.asarray(indices), np.argsort(-logits, 1)[:, :3])
    return True


def _mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = _lm("tied", ignore_index=IGNORE)
        model.compile(keras.optimizers.Adam(0.01))
        x, y = _data()
        history = model.fit([x, y], epochs=2, batch_size=16, verbose=0).history["loss"]
        return {
            "history": history,
            "embeddings_dtype": model.layers[1].embeddings.dtype,
            "output_dtype": str(model.output.dtype),
        }
    finally:
        keras.config.set_dtype_policy("float32")


def layers(path):
    return {
        "fit": {kind: _fit_save_load(kind, path) for kind in ("head", "tied")},
        "reference": _head_against_reference(),
        "mixed": _mixed_precision(),
    }


# ---------------------------------------------------------------- ModelParallel

N, H, V = 64, 16, 512


def _parallel_models(weights):
    hidden, labels = keras.Input((H,)), keras.Input((), dtype="int32")
    x = keras.layers.Dense(H, name="body")(hidden)
    ours = keras.Model([hidden, labels], LinearCrossEntropy(V, use_bias=True, name="head")(x, labels))
    theirs = keras.Sequential(
        [keras.Input((H,)), keras.layers.Dense(H, name="body"), keras.layers.Dense(V, name="head")]
    )
    if weights is None:
        return ours
    ours.set_weights(weights)
    theirs.set_weights(weights)
    return ours, theirs


def _moved(model, batch):
    from hlo_collectives import moved_per_step

    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    hlo = jax.jit(model.train_step, donate_argnums=0).lower(state, batch).compile().as_text()
    return moved_per_step(hlo)


def model_parallel(path):
    mesh = keras.distribution.DeviceMesh((4, 2), ["batch", "model"], devices=jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*head/kernel"] = (None, "model")
    layout_map[".*head/bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, H)).astype("float32")
    y = rng.integers(0, V, N).astype("int32")
    ours, theirs = _parallel_models(_parallel_models(None).get_weights())
    ours.compile(optimizer=keras.optimizers.SGD(0.1))
    theirs.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))

    def layout(shape):
        return distribution.get_data_layout(shape).backend_layout

    xs, ys = jax.device_put(x, layout(x.shape)), jax.device_put(y, layout(y.shape))
    result = {
        "ours": {"loss": float(ours.train_on_batch([x, y])), "moved": _moved(ours, ([xs, ys], None, None))},
        "keras": {"loss": float(theirs.train_on_batch(x, y)), "moved": _moved(theirs, (xs, ys, None))},
        "kernel_sharding": str(ours.get_layer("head").kernel.value.sharding.spec),
        "kernels_equal_after_step": bool(
            np.allclose(ours.get_layer("head").kernel.numpy(), theirs.get_layer("head").kernel.numpy(), atol=1e-6)
        ),
        "devices": len(jax.devices()),
    }
    return result


def main():
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import pathlib

    mode, path = sys.argv[1], pathlib.Path(sys.argv[2])
    result = {"layers": layers, "model_parallel": model_parallel}[mode](path)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
