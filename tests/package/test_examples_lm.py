"""examples/language_model.py runs, and its two models train along the same loss curve."""

import os
import re
import subprocess
import sys

import pytest

from tests._support import ROOT

EXAMPLE = ROOT / "examples" / "language_model.py"


def test_language_model_example_curves_agree(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    out_png = tmp_path / "lm.png"
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--steps",
            "6",
            "--epochs",
            "1",
            "--vocab-size",
            "4000",
            "--batch",
            "16",
            "--verbose",
            "2",
            "--out",
            str(out_png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg"),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    gap = float(re.search(r"largest difference between the two training-loss curves: ([0-9.e+-]+)", result.stdout)[1])
    assert gap < 1e-4, result.stdout
    assert "| LinearCrossEntropy |" in result.stdout
    assert out_png.stat().st_size > 0
