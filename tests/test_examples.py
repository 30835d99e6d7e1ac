"""The examples run and learn."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_custom_training_loop_learns_digits():
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")
    out = run_example("custom_training_loop.py", "--epochs", "10")
    accuracy = float(re.search(r"final test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out
