"""Gradient buffers from the CPU backward kernels' pool (cc/core/buffer_pool.h).

When TensorFlow cannot let the gradient overwrite the logits (they are held
elsewhere) and the gradient takes at least 1 MiB, it goes into a recycled
block. These tests hold the logits so that the pool is used, and check the
values, that live gradients never share a block, the FUSED_XENT_BUFFER_CACHE_MB
switch, the page faults the cache saves, fused_xent.cached_memory_info() and
release_cached_memory(), and that outputs TensorFlow wants from its own
allocator (for a transfer to another task) do not come from the pool."""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests._support import ROOT, reference
from tests._support.assertions import assert_close
from tests._support.runners import tf_or_skip

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
from tests._support import reference
from tests._support.assertions import assert_close

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
info = {"held": fused_xent.cached_memory_info()}  # the last gradient is alive
del grad
info["dropped"] = fused_xent.cached_memory_info()
info["released"] = fused_xent.release_cached_memory()
info["after"] = fused_xent.cached_memory_info()
print("RESULT " + json.dumps({"faults": faults, "pages": rows * classes * 4 // 4096, "thp_off": thp_off,
                              "info": info, "package": fused_xent.__file__}))
"""


def _run_script(script, cache_mb, *args):
    """Runs `script` in a fresh interpreter; returns the JSON of its RESULT line."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the pool caches blocks on Linux only; page faults are counted there")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FUSED_XENT_BUFFER_CACHE_MB=str(cache_mb))
    command = [sys.executable, "-c", textwrap.dedent(script), *map(str, args)]
    process = subprocess.run(
        command,
        cwd=ROOT,
        env=env,  # cwd: the child imports tests._support
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    result = json.loads(lines[-1][len(RESULT) :])
    assert result["package"] == fused_xent.__file__  # the child tested this package
    return result


@functools.lru_cache(maxsize=None)  # several tests read one run
def _run_child(cache_mb, shape=(256, 20000)):
    return _run_script(CHILD, cache_mb, *shape)


def _block_bytes(shape):
    """A float32 gradient's pooled block: whole 2 MiB huge pages."""
    huge = 2 << 20
    return -(-shape[0] * shape[1] * 4 // huge) * huge


# 20 MB (5000 pages), and 4 MB (1024 pages): gradients of a few MB are recycled too.
SIZES = [(256, 20000), (16384, 64)]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cache_saves_page_faults(shape):
    result = _run_child(1024, shape)
    for name, faults in result["faults"].items():
        # Without the cache a fresh gradient faults in all its pages.
        assert faults < result["pages"] / 8, (name, result)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cache_info_counts_blocks_and_release_empties_it(shape):
    info, block = _run_child(1024, shape)["info"], _block_bytes(shape)
    assert info["held"]["in_use_blocks"] == 1 and info["held"]["in_use_bytes"] == block, info
    dropped = info["dropped"]
    assert dropped["in_use_blocks"] == 0 and dropped["in_use_bytes"] == 0, info
    assert dropped["idle_blocks"] >= 1 and dropped["idle_bytes"] == dropped["idle_blocks"] * block, info
    assert dropped["limit_bytes"] == 1024 << 20
    assert info["released"] == dropped["idle_bytes"]
    assert info["after"] == dict(dropped, idle_bytes=0, idle_blocks=0), info


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cache_off_uses_tensorflows_allocator(shape):
    info = _run_child(0, shape)["info"]  # the child checks the gradients' values
    # The held gradient is not the pool's, so it came from TensorFlow's allocator
    # (the logits it might have overwritten are held too).
    nothing = {"idle_bytes": 0, "idle_blocks": 0, "in_use_bytes": 0, "in_use_blocks": 0, "limit_bytes": 0}
    assert info == {"held": nothing, "dropped": nothing, "released": 0, "after": nothing}


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradient_larger_than_the_limit_uses_tensorflows_allocator(shape):
    # A 20 MB block could never stay cached under a 10 MiB limit; a 4 MB one can.
    info = _run_child(10, shape)["info"]
    pooled = _block_bytes(shape) <= 10 << 20
    assert info["held"]["in_use_blocks"] == int(pooled), info
    assert (info["dropped"]["idle_blocks"] > 0) == pooled, info


def test_release_keeps_live_gradients():
    case = Case("sparse", "float32", 3)
    if fused_xent.cached_memory_info()["limit_bytes"] < _block_bytes(SHAPES["float32"]):
        pytest.skip("FUSED_XENT_BUFFER_CACHE_MB is set below one gradient in this process")
    held = case.gradient()
    fused_xent.release_cached_memory()
    info = fused_xent.cached_memory_info()
    assert info["idle_blocks"] == 0 and info["in_use_blocks"] >= 1, info
    case.check(held)
    del held  # its block goes back to the cache, which release gives back
    assert fused_xent.cached_memory_info()["idle_blocks"] >= 1
    assert fused_xent.release_cached_memory() >= _block_bytes(SHAPES["float32"])
    assert fused_xent.cached_memory_info()["idle_bytes"] == 0


def test_library_not_loaded_is_a_clear_error(tmp_path, monkeypatch):
    from fused_xent._tf import buffer_cache as _cache
    from fused_xent._tf import loader as _loader

    copy = tmp_path / "_fused_xent_ops.so"  # a file this process never loaded
    copy.write_bytes(Path(_loader.library_path()).read_bytes())
    monkeypatch.setattr(_loader, "library_path", lambda: str(copy))
    monkeypatch.setattr(_cache, "_functions", None)
    with pytest.raises(RuntimeError, match="is not loaded in this process"):
        fused_xent.cached_memory_info()


def test_without_tensorflow_the_functions_explain_it():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import fused_xent\n"
        "for f in (fused_xent.cached_memory_info, fused_xent.release_cached_memory):\n"
        "    try:\n        f()\n    except ImportError as e:\n        print('ImportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    ).stdout
    assert out.count("needs TensorFlow, which is not installed") == 2, out


# Two in-process servers of one cluster: a gradient sent to the other task is
# the source of a transfer, for which TensorFlow asks its allocator for
# nic_compatible memory. The gradient consumed on its own task only is pooled.
REMOTE_CHILD = """
import json, socket
import numpy as np
import tensorflow as tf
import fused_xent

def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]

cluster = tf.train.ClusterSpec({"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]})
servers = [tf.distribute.Server(cluster, job_name="worker", task_index=i) for i in range(2)]
value = np.random.default_rng(0).normal(size=(256, 20000)).astype(np.float32)
graph = tf.Graph()
with graph.as_default():
    with tf.device("/job:worker/task:0/device:CPU:0"):
        logits = tf.compat.v1.placeholder(tf.float32, value.shape)
        loss = fused_xent.sparse_softmax_cross_entropy_with_logits(tf.zeros(256, tf.int32), logits)
        grad = tf.gradients(loss, logits)[0]
        local = tf.reduce_sum(grad * logits)  # holds the logits: their buffer cannot take the gradient
    with tf.device("/job:worker/task:1/device:CPU:0"):
        remote = tf.reduce_sum(grad)
idle = {}
for name, fetches in {"remote": [local, remote], "local": [local]}.items():
    with tf.compat.v1.Session(servers[0].target, graph=graph) as session:
        for _ in range(3):
            session.run(fetches, {logits: value})
    idle[name] = fused_xent.cached_memory_info()["idle_blocks"]
    fused_xent.release_cached_memory()
print("RESULT " + json.dumps({"idle": idle, "package": fused_xent.__file__}))
"""


def test_output_for_another_task_comes_from_tensorflows_allocator():
    result = _run_script(REMOTE_CHILD, 1024)
    assert result["idle"] == {"remote": 0, "local": 1}, result
