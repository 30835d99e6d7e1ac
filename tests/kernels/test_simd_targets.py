"""Every instruction-set copy of the kernels this CPU can run gives the reference's
numbers and is batch invariant: the NumPy-binding and row-group tests run again
with each lower target forced."""

import os
import pathlib
import subprocess
import sys

import pytest

import fused_xent

TARGETS = ["baseline", "avx2", "avx512"]
HERE = pathlib.Path(__file__).resolve().parent


def _available():
    active = fused_xent.build_info()["simd"].split()[0]
    return TARGETS[: TARGETS.index(active)] if active in TARGETS else []


@pytest.mark.parametrize("target", TARGETS[:-1])
def test_lower_target_matches_reference(target):
    if target not in _available():
        pytest.skip(f"{target} is not below this machine's active target ({fused_xent.build_info()['simd']})")
    env = dict(os.environ, FUSED_XENT_SIMD=target, TF_CPP_MIN_LOG_LEVEL="2")
    check = subprocess.run(
        [sys.executable, "-c", "import fused_xent; print(fused_xent.build_info()['simd'])"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert check.stdout.split()[0] == target
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / "test_numpy.py"),
            str(HERE / "test_row_groups.py"),
            str(HERE / "test_confident_rows.py"),
            str(HERE / "test_huge_logits.py"),
            str(HERE / "test_inner_tiles.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=HERE,
    )
    assert result.returncode == 0, result.stdout[-3000:]
