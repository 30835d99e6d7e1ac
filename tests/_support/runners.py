"""Helpers that run the ops under a framework or in a fresh interpreter."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest


def tf_or_skip():
    return pytest.importorskip("tensorflow")


def sparse_loss_and_gradient(labels, z, lowering, monkeypatch):
    """The TF op's loss and gradient of logits `z`: eagerly (lowering None) or compiled with XLA
    through `lowering` ("custom_call" or "hlo"; skips where the build lacks it)."""
    tf = tf_or_skip()
    import fused_xent

    if lowering is not None:
        if lowering == "custom_call" and fused_xent.build_info()["xla"] != "custom_call":
            pytest.skip("no XLA custom call in this build")
        monkeypatch.setenv("FUSED_XENT_XLA_LOWERING", lowering)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x)
        return loss, tape.gradient(loss, x)

    run = step if lowering is None else tf.function(step, jit_compile=True)
    loss, grad = run(tf.constant(z))
    return loss.numpy(), grad.numpy()


def run_keras_backend_script(script, backend, mode, path):
    """Runs tests/_support/<script> <mode> <path> with KERAS_BACKEND=backend in a fresh process
    that finds fused_xent where this one did; returns its RESULT line's JSON. The script runs by
    path, so its folder (tests/_support, which shadows no package) is the child's sys.path[0]."""
    import json
    import subprocess
    import sys

    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    environment["PYTHONPATH"] = os.pathsep.join(sys.path)
    process = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve().parent / script), mode, str(path)],
        cwd=path.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


RESULT = "RESULT "


def run_fresh(source, cwd, timeout=150, **env):
    """Runs `source` in a fresh interpreter and returns the JSON it printed after RESULT."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    environment["PYTHONPATH"] = os.pathsep.join(sys.path)  # where this process found fused_xent
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"exit status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return json.loads(lines[-1][len(RESULT) :])
