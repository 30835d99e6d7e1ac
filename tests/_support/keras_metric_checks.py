"""Run by tests/keras/test_metrics.py in a fresh interpreter with KERAS_BACKEND set: fused_xent.metrics
and Keras's own metrics on the same inputs (update_state across batches, sample weights,
reset_state), in compile/fit/evaluate (also under mixed precision), and a saved model reloaded.
Prints the numbers as JSON after "RESULT " (the test compares them).

Usage: python keras_metric_checks.py run|load PATH.keras
"""

import inspect
import json
import sys

import keras
import numpy as np

import fused_xent  # registers the metrics for loading, as users do

try:
    from tests._support import keras_versions
except ImportError:  # run as a script: this folder is sys.path[0]
    import keras_versions

CLASSES = 5


def as_float(x):
    return float(keras.ops.convert_to_numpy(x))


def inputs():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(6, 4, CLASSES)) * 2).astype(np.float32)
    probs = np.array(keras.ops.convert_to_numpy(keras.ops.softmax(z)))  # a copy: Keras 3.2's may be read-only
    probs[0, 0] = np.eye(CLASSES)[1]  # saturated: clipping shows
    y = rng.integers(0, CLASSES, size=(6, 4))
    y[0, :2] = 2
    soft = rng.dirichlet(np.ones(CLASSES), size=(6, 4)).astype(np.float32)
    sw = rng.random((6, 4)).astype(np.float32)
    return z, probs, y, soft, sw


def values():
    """(ours, Keras's) result after two batches, and after reset_state and a third."""
    z, probs, y, soft, sw = inputs()
    cases = {
        "sparse logits": ("SparseCategoricalCrossentropy", dict(from_logits=True), y, z),
        "sparse probs": ("SparseCategoricalCrossentropy", dict(), y, probs),
        "sparse ignore_class": ("SparseCategoricalCrossentropy", dict(from_logits=True, ignore_class=2), y, z),
        "dense logits smoothing": ("CategoricalCrossentropy", dict(from_logits=True, label_smoothing=0.1), soft, z),
        "dense probs": ("CategoricalCrossentropy", dict(), np.eye(CLASSES, dtype=np.float32)[y], probs),
    }
    out = {}
    for name, (cls, kwargs, y_true, y_pred) in cases.items():
        results = []
        for metric in (getattr(fused_xent.metrics, cls)(**kwargs), keras_metric(cls, **kwargs)):
            metric.update_state(y_true, y_pred, sw)
            metric.update_state(y_true[:3], y_pred[:3])
            first = as_float(metric.result())
            metric.reset_state()
            metric.update_state(y_true[2:], y_pred[2:], sw[2:])
            results.append([first, as_float(metric.result())])
        out[name] = results
    return out


def keras_metric(cls, **kwargs):
    """Keras's metric `cls`. Keras's SparseCategoricalCrossentropy metric takes no ignore_class
    before 3.14: there it is the MeanMetricWrapper of Keras's loss function with it, which is what
    the metric is from 3.14."""
    metric_class = getattr(keras.metrics, cls)
    if "ignore_class" in kwargs and "ignore_class" not in inspect.signature(metric_class.__init__).parameters:
        # Tensors: on PyTorch, Keras's function multiplies its (NumPy) inputs by tensors.
        def loss(y_true, y_pred, **options):
            y_true, y_pred = keras.ops.convert_to_tensor(y_true), keras.ops.convert_to_tensor(y_pred)
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, **options)

        return keras.metrics.MeanMetricWrapper(loss, name=cls, **kwargs)
    return metric_class(**kwargs)


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(6, 3)), -1)
    return x, y, rng.uniform(0.1, 2.0, size=64).astype(np.float32)


def model(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])


def compiled(policy="float32"):
    keras_versions.set_dtype_policy(keras, policy)
    try:
        m = model()
    finally:
        keras_versions.set_dtype_policy(keras, "float32")
    m.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ours"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="theirs"),
        ],
        weighted_metrics=[
            fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ours_w"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="theirs_w"),
        ],
    )
    return m


def training(policies=("float32", "mixed_bfloat16")):
    """fit with validation_data, then evaluate: the history and the evaluation, per dtype policy."""
    x, y, sw = data()
    out = {}
    for policy in policies:
        m = compiled(policy)
        history = m.fit(
            x, y, sample_weight=sw, batch_size=16, epochs=2, verbose=0, validation_data=(x[:32], y[:32], sw[:32])
        )
        evaluation = m.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
        out[policy] = {
            "history": history.history,
            "evaluate": evaluation,
            "logits_dtype": str(m.layers[-1].compute_dtype),
        }
    return out


def save(path):
    x, y, sw = data()
    m = compiled()
    m.fit(x, y, epochs=1, verbose=0)
    m.save(path)
    return m.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)


def compiled_metrics(m):
    """The metrics given to compile (Keras lists them inside its CompileMetrics)."""
    return [inner for metric in m.metrics for inner in getattr(metric, "metrics", [])]


def load(path):
    x, y, sw = data()
    m = keras.models.load_model(path)
    evaluation = m.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)  # builds the metrics
    ours = [metric for metric in compiled_metrics(m) if metric.name.startswith("ours")]
    return {
        "evaluate": evaluation,
        "classes": [f"{type(o).__module__}.{type(o).__name__}" for o in ours],
        "configs": [o.get_config() for o in ours],
    }


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    result = {"backend": keras.backend.backend()}
    if mode == "load":
        result.update(load(path))
    else:
        result.update(values=values(), training=training(), saved=save(path))
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    print("RESULT " + json.dumps(result))
