"""The fused linear head's memory as the user's process sees it: benchmarks/bench_linear.py's
"first step" measure (a fresh process with the allocators' default settings; peak RSS of the
first call of a traced training step above the RSS before it, less dW) at 2048 x 256 x 32000
float32, as a share of the N x V logits.

Measured (docs/linear_head.md, "Targets"): 23% with the default chunks (1/16 of the rows), 35%
with 1/8 of the rows (the default before), 120% for Dense + tf.nn. The bound is looser than the
25% target, for other machines' allocators and TensorFlow versions, and still fails for chunks
of 1/8 of the rows or more."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")
from tests._support import ROOT  # noqa: E402

N, H, V = 2048, 256, 32000
BOUND = 0.30


def first_step_share(method):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for name in ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "FUSED_XENT_BUFFER_CACHE_MB"):
        env.pop(name, None)  # the defaults a user runs
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_linear.py"),
        "--child",
        "first_step",
        "--method",
        method,
        "--n",
        str(N),
        "--h",
        str(H),
        "--v",
        str(V),
        "--dtype",
        "float32",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    mb = json.loads(out.stdout.strip().splitlines()[-1])["first_step_above_mb"]
    return mb / (N * V * 4 / 1e6)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_first_training_step_holds_under_the_bound():
    share = first_step_share("fused")
    assert share <= BOUND, f"first step: {100 * share:.1f}% of the logits above base and dW (bound {100 * BOUND:.0f}%)"
