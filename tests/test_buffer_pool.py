"""Gradient buffers from the CPU backward kernels' pool (cc/core/buffer_pool.h).

When TensorFlow cannot let the gradient overwrite the logits (they are held
elsewhere) and the gradient takes at least 1 MiB, it goes into a recycled
block. These tests hold the logits so that the pool is used, and check the
values, that live gradients never share a block, the FUSED_XENT_BUFFER_CACHE_MB
switch, and the page faults the cache saves."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import reference
from conftest import assert_close, tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402

# 20 MB and 17 MB: well above the pool's 1 MiB threshold.
SHAPES = {"float32": (256, 20000), "bfloat16": (256, 33000)}
RESULT = "RESULT "


def _logits(dtype, seed):
    values = np.random.default_rng(seed).normal(size=SHAPES[dtype]) * 3.0
    return tf.constant(values, dtype=dtype)


def _sparse_labels(dtype, seed, ignored=0):
    rows, classes = SHAPES[dtype]
    labels = np.random.default_rng(seed + 100).integers(0, classes, size=rows)
    labels[:ignored] = -100
    return labels


def _dense_labels(dtype, seed):
    values = np.random.default_rng(seed + 200).normal(size=SHAPES[dtype])
    return tf.nn.softmax(tf.constant(values, dtype=dtype))


def _gradient(loss_fn, logits):
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = loss_fn(logits)
    return tape.gradient(loss, logits)


class Case:
    """One gradient of a held logits tensor and its float64 reference."""

    def __init__(self, kind, dtype, seed, ignored=0):
        self.dtype = dtype
        self.logits = _logits(dtype, seed)
        z = self.logits.numpy().astype(np.float64)
        if kind == "sparse":
            labels = _sparse_labels(dtype, seed, ignored)
            self.loss_fn = lambda x: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, ignore_index=-100)
            self.expected = reference.sparse(labels, z, ignore_index=-100)[1]
        else:
            labels = _dense_labels(dtype, seed)
            self.loss_fn = lambda x: fused_xent.softmax_cross_entropy_with_logits(labels, x)
            self.expected = reference.dense(labels.numpy().astype(np.float64), z)[1]

    def gradient(self):
        return _gradient(self.loss_fn, self.logits)

    def check(self, grad):
        assert_close(grad.numpy(), self.expected, self.dtype)


KINDS = ["sparse", "dense"]
DTYPES = ["float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_repeated_gradients_are_correct(kind, dtype):
    # A recycled block still holds the previous gradient: ignored rows must be written too.
    cases = [Case(kind, dtype, seed, ignored=8 * seed) for seed in (0, 1, 2)]
    for case in cases + cases:
        case.check(case.gradient())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_live_gradients_do_not_share_memory(kind, dtype):
    first, second = Case(kind, dtype, 0), Case(kind, dtype, 1)
    held = first.gradient()
    copy = held.numpy().copy()
    other = second.gradient()
    second.check(other)
    np.testing.assert_array_equal(held.numpy(), copy)
    first.check(held)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_outlives_later_calls(kind):
    first, later = Case(kind, "float32", 0), Case(kind, "float32", 1)
    held = first.gradient()
    copy = held.numpy().copy()
    for _ in range(8):
        later.gradient()  # dropped at once: its block goes back to the pool
    later.check(later.gradient())
    np.testing.assert_array_equal(held.numpy(), copy)


# A fresh interpreter (FUSED_XENT_BUFFER_CACHE_MB is read once) runs a training-like
# loop: tf.function, GradientTape, logits held as the function's argument. It
# turns transparent huge pages off for itself, so that every fresh page of a
# gradient costs one fault per 4 KiB whatever this machine's settings are.
CHILD = """
import ctypes, json, os, resource, sys
thp_off = ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
import numpy as np
import tensorflow as tf
import fused_xent
import reference
from conftest import assert_close

rng = np.random.default_rng(0)
rows, classes = int(sys.argv[1]), int(sys.argv[2])
logits = tf.constant(rng.normal(size=(rows, classes)).astype(np.float32))
labels = rng.integers(0, classes, size=rows)
targets = tf.nn.softmax(tf.constant(rng.normal(size=(rows, classes)).astype(np.float32)))
z = logits.numpy().astype(np.float64)
cases = {
    "sparse": (lambda x: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x),
               reference.sparse(labels, z)[1]),
    "dense": (lambda x: fused_xent.softmax_cross_entropy_with_logits(targets, x),
              reference.dense(targets.numpy().astype(np.float64), z)[1]),
}
faults = {}
for name, (loss_fn, expected) in cases.items():
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(loss_fn(x))
        return tape.gradient(loss, x)

    for _ in range(3):
        grad = step(logits)
    per_call = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        grad = step(logits)
        per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert_close(grad.numpy(), expected, "float32")
    faults[name] = sorted(per_call)[len(per_call) // 2]
print("RESULT " + json.dumps({"faults": faults, "pages": rows * classes * 4 // 4096, "thp_off": thp_off,
                              "package": fused_xent.__file__}))
"""


def _run_child(cache_mb, shape=(256, 20000)):
    if not sys.platform.startswith("linux"):
        pytest.skip("the pool caches blocks on Linux only; page faults are counted there")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FUSED_XENT_BUFFER_CACHE_MB=str(cache_mb))
    command = [sys.executable, "-c", textwrap.dedent(CHILD), *map(str, shape)]
    process = subprocess.run(command, cwd=Path(__file__).parent, env=env,
                             capture_output=True, text=True, timeout=300)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    result = json.loads(lines[-1][len(RESULT):])
    assert result["package"] == fused_xent.__file__  # the child tested this package
    return result


# 20 MB (5000 pages), and 4 MB (1024 pages): gradients of a few MB are recycled too.
SIZES = [(256, 20000), (16384, 64)]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cache_saves_page_faults(shape):
    result = _run_child(1024, shape)
    for name, faults in result["faults"].items():
        # Without the cache a fresh gradient faults in all its pages.
        assert faults < result["pages"] / 8, (name, result)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cache_off_still_gives_correct_gradients(shape):
    result = _run_child(0, shape)  # the child checks the gradients' values
    if result["thp_off"]:
        # Every call maps a fresh block: the switch really turns the cache off.
        for name, faults in result["faults"].items():
            assert faults > result["pages"] / 2, (name, result)
