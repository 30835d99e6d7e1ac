"""One reduction rule on every Keras backend: the same cases (every reduction, sample weights of
the losses' rank and of lower rank, masks from ignore_class, class weights) give the same values on
Keras's TensorFlow, JAX and PyTorch backends, and those values are Keras's rule computed here in
float64 NumPy (not by the code under test)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests._support import keras_versions

N, T, C = 4, 3, 5
REDUCTIONS = tuple(keras_versions.reductions(["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"]))
IGNORE = 2
CLASS_WEIGHTS = [1.0, 0.5, 2.0, 1.5, 0.25]


def _inputs():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(N, T, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(N, T)).astype(np.int32)
    labels[0, 0] = labels[1, 2] = IGNORE  # the mask of ignore_class has something to hide
    return {
        "logits": logits,
        "labels": labels,
        "weight_full": rng.uniform(0.5, 2.0, size=(N, T)).astype(np.float32),
        "weight_rows": rng.uniform(0.5, 2.0, size=(N,)).astype(np.float32),
    }


# name -> (sample weight key or None, ignore_class, class_weights)
CASES = {
    "plain": (None, None, None),
    "weight_full": ("weight_full", None, None),
    "weight_rows": ("weight_rows", None, None),
    "mask": (None, IGNORE, None),
    "mask_weight_rows": ("weight_rows", IGNORE, None),
    "class_weights": (None, None, CLASS_WEIGHTS),
    "class_weights_mask_rows": ("weight_rows", IGNORE, CLASS_WEIGHTS),
}


def keras_rule(data, weight_key, ignore_class, class_weights, reduction):
    """Keras's reduce_weighted_values on per-element losses, in float64, a (N,) weight read as
    Keras reads (N, 1); class weights act as per-element sample weights. The weighted mean divides
    by the sum of the weight tensor Keras holds: (N, 1) alone, (N, T) once a mask or per-element
    class weights have multiplied it."""
    z = data["logits"].astype(np.float64)
    y = data["labels"]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    losses = lse - np.take_along_axis(z, y[..., None], -1)[..., 0]
    mask = np.ones_like(losses) if ignore_class is None else (y != ignore_class).astype(np.float64)
    losses = losses * mask
    weight = np.ones_like(losses)
    if weight_key is not None:
        weight = np.broadcast_to(data[weight_key].astype(np.float64).reshape(N, -1), losses.shape).copy()
    if class_weights is not None:
        weight = weight * np.asarray(class_weights)[y]
    if reduction in ("mean", "sum_over_batch_size") and ignore_class is not None:
        weight = weight * mask * mask.size / mask.sum()
    else:
        weight = weight * mask
    values = losses * weight
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean_with_sample_weight":
        if weight_key == "weight_rows" and ignore_class is None and class_weights is None:
            return values.sum() / data["weight_rows"].astype(np.float64).sum()
        return values.sum() / weight.sum()
    return values.sum() / values.size


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import fused_xent

    data = {k: np.asarray(v, dtype=np.float32 if k != "labels" else np.int32) for k, v in json.loads(sys.argv[1]).items()}
    cases = json.loads(sys.argv[2])
    out = {}
    for name, (weight_key, ignore_class, class_weights) in cases.items():
        for reduction in %r:
            loss = fused_xent.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=ignore_class, class_weights=class_weights, reduction=reduction)
            weight = None if weight_key is None else data[weight_key]
            value = loss(data["labels"], data["logits"], sample_weight=weight)
            out[name + "/" + reduction] = np.asarray(keras.ops.convert_to_numpy(value), np.float64).tolist()
    print("RESULT " + json.dumps(out))
    """
    % (REDUCTIONS,)
)


def _run(backend):
    pytest.importorskip({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend])
    data = {k: v.tolist() for k, v in _inputs().items()}
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=os.pathsep.join(sys.path), TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(data), json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module", params=["tensorflow", "jax", "torch"])
def backend_values(request):
    return request.param, _run(request.param)


def _assert_matches(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=2e-6, err_msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_backend_reduces_like_keras(backend_values, case):
    backend, values = backend_values
    data = _inputs()
    for reduction in REDUCTIONS:
        expected = keras_rule(data, *CASES[case], reduction)
        _assert_matches(values[f"{case}/{reduction}"], expected, f"{backend} {case} {reduction}")


def test_the_comparison_rejects_a_planted_error():
    """A weighted mean divided by the element count instead of the weights must not pass."""
    data = _inputs()
    right = keras_rule(data, "weight_rows", None, None, "mean_with_sample_weight")
    planted = keras_rule(data, "weight_rows", None, None, "sum") / (N * T)
    with pytest.raises(AssertionError):
        _assert_matches(planted, right, "planted")
