"""Run by tests/keras/test_losses_backends.py in a fresh interpreter with KERAS_BACKEND set:
computes fused_xent.losses and Keras's own losses on the same inputs, trains the
same model with each, saves a model compiled with ours, and prints the numbers
as JSON after "RESULT " (the test compares them).

Usage: python keras_backend_checks.py SAVE_PATH
"""

import json
import sys

import keras
import numpy as np

import fused_xent  # noqa: F401  (registers the losses for loading, as users do)
from fused_xent import losses as fl

try:
    from tests._support import keras_versions
except ImportError:  # run as a script: this folder is sys.path[0]
    import keras_versions

REDUCTIONS = keras_versions.reductions(["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"])


def as_list(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64).tolist()


def values():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(6, 4, 5)) * 2).astype(np.float32)
    probs = np.asarray(keras.ops.convert_to_numpy(keras.ops.softmax(z)))
    y = rng.integers(0, 5, size=(6, 4))
    sw = rng.random((6, 4)).astype(np.float32)
    onehot = np.eye(5, dtype=np.float32)[y]
    soft = rng.random((6, 4, 5)).astype(np.float32)
    soft /= soft.sum(-1, keepdims=True)
    out = {}
    for reduction in REDUCTIONS:
        for name, kwargs, pred in [
            ("logits", dict(from_logits=True), z),
            ("probs", dict(from_logits=False), probs),
            ("ignore", dict(from_logits=True, ignore_class=2), z),
        ]:
            for weight_name, weight in (("", None), ("+sw", sw)):
                ours = fl.SparseCategoricalCrossentropy(reduction=reduction, **kwargs)(y, pred, weight)
                theirs = keras.losses.SparseCategoricalCrossentropy(reduction=reduction, **kwargs)(y, pred, weight)
                out[f"sparse {name}{weight_name} {reduction}"] = (as_list(ours), as_list(theirs))
        for name, kwargs, labels, pred in [
            ("logits,smoothing", dict(from_logits=True, label_smoothing=0.1), soft, z),
            ("probs", dict(from_logits=False), onehot, probs),
        ]:
            ours = fl.CategoricalCrossentropy(reduction=reduction, **kwargs)(labels, pred, sw)
            theirs = keras.losses.CategoricalCrossentropy(reduction=reduction, **kwargs)(labels, pred, sw)
            out[f"dense {name}+sw {reduction}"] = (as_list(ours), as_list(theirs))
    # A class axis other than the last: Keras's loss on the moved axis.
    zt = np.moveaxis(z, 2, 1)
    out["sparse axis=1"] = (
        as_list(fl.SparseCategoricalCrossentropy(from_logits=True, axis=1)(y, zt)),
        as_list(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, z)),
    )
    out["dense axis=1"] = (
        as_list(fl.CategoricalCrossentropy(from_logits=True, axis=1)(np.moveaxis(soft, 2, 1), zt)),
        as_list(keras.losses.CategoricalCrossentropy(from_logits=True)(soft, z)),
    )
    # softcap: Keras's loss of the capped logits.
    capped = np.asarray(keras.ops.convert_to_numpy(3.0 * keras.ops.tanh(z / 3.0)))
    for reduction in ("sum_over_batch_size", "none"):
        ours = fl.SparseCategoricalCrossentropy(from_logits=True, softcap=3.0, reduction=reduction)(y, z, sw)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)(y, capped, sw)
        out[f"sparse softcap {reduction}"] = (as_list(ours), as_list(theirs))
        ours = fl.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, softcap=3.0, reduction=reduction)(
            soft, z
        )
        theirs = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=reduction)(
            soft, capped
        )
        out[f"dense softcap {reduction}"] = (as_list(ours), as_list(theirs))
    # class_weights: the same as per-element sample weights of each label's weight.
    weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    for reduction in keras_versions.reductions(["sum_over_batch_size", "mean_with_sample_weight"]):
        ours = fl.SparseCategoricalCrossentropy(from_logits=True, class_weights=weights, reduction=reduction)(y, z, sw)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)(
            y, z, sw * weights[y]
        )
        out[f"sparse class_weights {reduction}"] = (as_list(ours), as_list(theirs))
    return out


def model(seed, mask=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 3))
    x = keras.layers.Masking(0.0)(inputs) if mask else inputs
    x = keras.layers.Dense(8, activation="tanh")(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


def fit_curves():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4, 3)).astype(np.float32)
    x[::5, 3] = 0.0  # masked time steps
    y = rng.integers(0, 5, size=(64, 4))
    sw = rng.random((64, 4)).astype(np.float32)
    out = {}
    for name, ours, theirs, mask in [
        (
            "sparse",
            fl.SparseCategoricalCrossentropy(from_logits=True),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            False,
        ),
        (
            "sparse masked ignore_class",
            fl.SparseCategoricalCrossentropy(from_logits=True, ignore_class=1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=1),
            True,
        ),
    ]:
        curves = []
        for loss in (ours, theirs):
            m = model(3, mask)
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
            history = m.fit(x, y, sample_weight=sw, batch_size=16, epochs=3, shuffle=False, verbose=0)
            curves.append(history.history["loss"] + [float(np.sum(np.abs(w))) for w in m.get_weights()])
        out[f"fit {name}"] = curves
    # softmax outputs and one-hot labels, from_logits=False
    curves = []
    for loss in (fl.CategoricalCrossentropy(), keras.losses.CategoricalCrossentropy()):
        keras.utils.set_random_seed(4)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="softmax")])
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        history = m.fit(x[:, 0], np.eye(5)[y[:, 0]], batch_size=16, epochs=3, shuffle=False, verbose=0)
        curves.append(history.history["loss"])
    out["fit dense softmax"] = curves
    return out


def save(path):
    m = model(5)
    m.compile(
        optimizer="sgd",
        loss=fl.SparseCategoricalCrossentropy(from_logits=True, z_loss=0.01, class_weights=[1, 2, 1, 1, 1]),
    )
    m.save(path)
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 4, 3)
    y = np.array([[0, 1, 2, 3], [4, 0, 1, 2]])
    return {"evaluate": float(m.evaluate(x, y, verbose=0))}


def load(path):
    m = keras.models.load_model(path)
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 4, 3)
    y = np.array([[0, 1, 2, 3], [4, 0, 1, 2]])
    loss = m.loss
    return {
        "evaluate": float(m.evaluate(x, y, verbose=0)),
        "loss_class": f"{type(loss).__module__}.{type(loss).__name__}",
        "z_loss": loss.z_loss,
        "class_weights": loss.class_weights,
    }


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    result = {"backend": keras.backend.backend()}
    if mode == "load":
        result.update(load(path))
        result["tensorflow_imported"] = "tensorflow" in sys.modules
    else:
        result.update(values=values())
        # before fit: Keras's data adapters may import TensorFlow themselves
        result["tensorflow_imported"] = "tensorflow" in sys.modules
        result.update(fit=fit_curves(), saved=save(path))

    print("RESULT " + json.dumps(result))
