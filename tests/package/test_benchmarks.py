"""The CPU benchmark script runs end to end on tiny shapes and writes its table (timings are not checked)."""

import json
import os
import subprocess
import sys

import pytest

from tests._support import ROOT


def fused_xent_xla():
    import fused_xent

    return fused_xent.build_info()["xla"]


BENCH = ROOT / "benchmarks" / "bench_cpu.py"


def test_bench_cpu_writes_tables(tmp_path):
    pytest.importorskip("tensorflow")
    out_md, out_json = tmp_path / "bench.md", tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--shapes",
            "64x10,4x700",
            "--reps",
            "1",
            "--skip-memory",
            "--segmentation-shape",
            "2x8x8x5",
            "--lm-head-shape",
            "16x8x50",
            "--markdown",
            str(out_md),
            "--json",
            str(out_json),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    result = json.loads(out_json.read_text())
    assert result["bandwidth"] > 0
    assert [tuple(r["shape"]) for r in result["loss_only"]] == [(64, 10), (4, 700)]
    kinds = {(r["kind"], r["dtype"], tuple(r["shape"])) for r in result["rows"]}
    assert len(kinds) == 8  # sparse/dense x float32/bfloat16 x 2 shapes
    for row in result["rows"]:
        assert {"fused", "tf.nn"} <= set(row["times"]), row
        if fused_xent_xla() == "custom_call":
            assert {"fused+XLA", "fused+XLA (HLO)", "tf.nn+XLA"} <= set(row["times"]), row
    assert [(r["kind"], tuple(r["shape"])) for r in result["segmentation"]] == [
        ("sparse", (2, 8, 8, 5)),
        ("dense", (2, 8, 8, 5)),
    ]
    for row in result["segmentation"]:
        assert {"fused, axis last", "fused, axis 1", "tf.nn, axis last", "tf.nn, axis 1 (transpose)"} <= set(
            row["times"]
        )
    assert [tuple(r["shape"]) for r in result["cache_off"]] == [(64, 10), (4, 700)]
    assert {"float32", "bfloat16", "float32 forward", "bfloat16 forward", "empty tf.function step"} <= set(
        result["kernels_alone"][0]["times"]
    )
    assert {"fused step", "fused loss alone", "tf.nn step", "tf.nn loss alone"} <= set(result["lm_head"]["times"])
    text = out_md.read_text()
    assert "cache off" in text and "language-model head" in text and "Where the kernels' time goes" in text
    assert "Speed targets" in text and "`axis=1` within 1.3× of the axis last" in text
    assert "| sparse | float32 | 64×10 |" in text and "Loss only" in text and "| sparse | 2×8×8×5 |" in text


def test_bench_add_rows_prints_its_table():
    pytest.importorskip("tensorflow")
    script = BENCH.parent / "bench_add_rows.py"
    out = subprocess.run(
        [sys.executable, str(script), "--reps", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    ).stdout
    assert "| float32 |" in out and "| bfloat16 |" in out


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_targets_are_judged_on_the_figures():
    """The targets table says "met" only where the run's figures reach the target,
    and names the limit (empty step, kernels alone) where they do not."""
    bench = _bench_module()

    def result(fused_ms, bfloat16_ms):
        rows = [
            {
                "kind": kind,
                "dtype": "float32",
                "shape": [65536, 10],
                "floor": 0.3e-3,
                "times": {"fused": fused_ms * 1e-3},
            }
            for kind in ("sparse", "dense")
        ]
        return {
            "rows": rows,
            "kernels_alone": [
                {"shape": [65536, 10], "floor": 0.3e-3, "times": {"float32": 0.5e-3, "empty tf.function step": 0.3e-3}}
            ],
            "dtype_rows": [
                {"kind": "sparse", "shape": [1024, 32000], "times": {"float32": 10e-3, "bfloat16": bfloat16_ms * 1e-3}}
            ],
            "segmentation": [
                {
                    "kind": "sparse",
                    "shape": [8, 256, 256, 21],
                    "times": {"fused, axis last": 1.0, "fused, axis 1": 1.35},
                }
            ],
        }

    text = "\n".join(bench.targets_markdown(result(fused_ms=0.7, bfloat16_ms=9.0)))
    assert "| float32 at 65536×10: ≥ 40% of the floor | sparse 43%, dense 43% | met |" in text
    assert "| bfloat16 ≥ 1.5× as fast as float32 at C ≥ 1000 | 1.11× | **not met** |" in text
    assert "| sparse 8×256×256×21, `axis=1` within 1.3× of the axis last | 1.35× | **not met** |" in text
    text = "\n".join(bench.targets_markdown(result(fused_ms=0.8, bfloat16_ms=6.0)))
    assert (
        "sparse 37%, dense 37% | **not met** | the floor is 0.30 ms; an empty `tf.function` step takes 0.30 ms" in text
    )
    assert "| bfloat16 ≥ 1.5× as fast as float32 at C ≥ 1000 | 1.67× | met |" in text
    assert "| bfloat16 never slower than float32 | 1.67× | met |" in text


def _result_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_bench_jax_step_quick_runs_both_studies(tmp_path):
    """benchmarks/bench_jax_step.py on tiny shapes: the CPU aliasing study, and the GPU study's
    code on the CPU device (what scripts/gpu_check.sh runs on a GPU); no targets checked."""
    pytest.importorskip("jax")
    script = BENCH.parent / "bench_jax_step.py"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cpu = subprocess.run(
        [sys.executable, str(script), "--cpu", "--quick", "--rounds", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    result = _result_line(cpu.stdout)
    assert set(result["median_ms"]) == {
        "fresh",
        "fresh, no THP",
        "fresh, donated",
        "aliased",
        "aliased, donated",
        "jnp formula",
    }
    assert "fresh: 0 logits-sized copies" in cpu.stdout and "aliased: 1 logits-sized copies" in cpu.stdout
    gpu = subprocess.run(
        [sys.executable, str(script), "--gpu-mode-on-cpu", "--quick", "--rounds", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    rows = _result_line(gpu.stdout)["results"]
    assert {(r["dtype"], r["N"], r["C"]) for r in rows} == {
        (d, n, c) for d in ("float32", "bfloat16") for n, c in ((256, 4000), (4, 40000))
    }
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows)


def test_bench_linear_jax_runs(tmp_path):
    """benchmarks/bench_linear_jax.py end to end on tiny shapes: a row per head and layout."""
    pytest.importorskip("jax")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_linear_jax.py"), "--n", "64", "--h", "16", "--v", "128"]
        + ["--sharded-n", "64", "--rounds", "1", "--markdown"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 2 * 4  # header; fused_xent and jnp on one device and three layouts


def test_bench_softcap_runs(tmp_path):
    """benchmarks/bench_softcap.py end to end on a tiny shape: one row per dtype, both timings positive."""
    out_json = tmp_path / "softcap.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_softcap.py"), "--reps", "1", "--shapes", "64x300"]
        + ["--cache-shape", "4x300", "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out_json.read_text())["results"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["plain_ms"] > 0 and r["softcap_ms"] > 0 for r in rows)
    summary = json.loads(out_json.read_text())
    assert summary["copy_bandwidth"] > 0
    assert [r["dtype"] for r in summary["in_cache"]] == ["float32", "bfloat16"]
    assert all(r["plain_ns"] > 0 and r["softcap_ns"] > 0 and r["memory_ns"] > 0 for r in summary["in_cache"])
