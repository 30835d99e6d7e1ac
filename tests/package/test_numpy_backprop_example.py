"""examples/numpy_backprop.py runs and its report shows what docs/derivation.md claims."""

import re
import subprocess
import sys

import pytest

from tests._support import ROOT

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = ROOT / "examples" / "numpy_backprop.py"

FD_LINE = re.compile(r"^\s+(?P<name>.+?)\s+max abs error (?P<error>\S+)\s+(?P<verdict>PASS|FAIL)$", re.M)
COLUMNS = ("epochs", "updates", "accuracy", "follows", "largest", "rise", "gap")
RUN_LINE = re.compile(r"^ {4}(?P<name>\S.*?)" + "".join(rf"\s{{2,}}(?P<{c}>-?[\d.]+)" for c in COLUMNS) + "$", re.M)

# Runs the example as a script with `import tensorflow` made to fail.
WITHOUT_TENSORFLOW = (
    "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run(tmp_path, prefix):
    out = tmp_path / "figure.png"
    result = subprocess.run(
        [sys.executable, *prefix, str(EXAMPLE), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, out


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    result, out = _run(tmp_path_factory.mktemp("example"), [])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, out


def _fd_errors(report):
    return {m["name"]: (float(m["error"]), m["verdict"]) for m in FD_LINE.finditer(report)}


def _runs(report):
    return {m["name"]: {c: float(m[c]) for c in COLUMNS} for m in RUN_LINE.finditer(report)}


def test_saves_a_png(example):
    _, out = example
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finite_differences_confirm_sigma_minus_t_and_reject_diagonal_only(example):
    errors = _fd_errors(example[0])
    for name in ("sigma - t (fused_xent.numpy)", "full Jacobian chain rule", "network steps 1-3, step 1 = sigma - t"):
        assert errors[name][1] == "PASS" and errors[name][0] < 1e-6, errors
    for name in ("diagonal-only chain rule", "network steps 1-3, step 1 = diagonal-only"):
        assert errors[name][1] == "FAIL" and errors[name][0] > 0.01, errors


def test_minibatch_training_learns(example):
    runs = _runs(example[0])
    assert runs["batches of 32, r = 5"]["accuracy"] > 0.9, runs


def test_reports_all_four_runs(example):
    assert len(_runs(example[0])) == 4


def test_oversized_per_sample_rate_follows_the_last_label(example):
    runs = _runs(example[0])
    assert runs["per-sample, r = 5"]["follows"] > 0.9, runs
    assert runs["per-sample, r = 5"]["rise"] >= runs["per-sample, r = 5"]["gap"] * 0.9, runs
    assert runs["batches of 32, r = 5"]["follows"] < 0.2, runs  # same rate, mini-batches: no symptom
    assert runs["per-sample, r = 0.1"]["follows"] < 0.3, runs  # sane rate: no symptom
    assert runs["per-sample, r = 0.1"]["accuracy"] > 0.7, runs


def test_diagonal_only_step_one_does_not_learn(example):
    runs = _runs(example[0])
    diagonal = runs["per-sample, r = 0.1, diagonal-only step 1"]
    assert diagonal["accuracy"] < 0.3 and diagonal["largest"] > 0.9, runs


def test_runs_without_tensorflow(tmp_path, example):
    result, out = _run(tmp_path, ["-c", WITHOUT_TENSORFLOW])
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.exists()
    assert _runs(result.stdout) == _runs(example[0])
