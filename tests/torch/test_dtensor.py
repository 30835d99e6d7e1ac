"""fused_xent.torch on DTensors (python/fused_xent/torch/_dtensor.py), on two gloo processes on
127.0.0.1 (CPU) over meshes of both (1-D; 2-D with a dimension of size 1): losses and gradients equal the unsharded functions' on
the whole tensors, for logits sharded on rows (run locally) and on classes (vocabulary-parallel
for sparse and dense labels, also with class counts the ranks do not divide and with fewer
classes than ranks); gradients keep the logits' placements; an
out-of-range label raises the same error on both ranks; the class-sharded forward all-reduces
row-sized tensors only, and row sharding communicates nothing but a label check.

One pair of processes runs every case (tests/_support/dtensor_worker.py) and reports; the
tests below read its report. Another pair runs the same kinds of case with a softcap
(tests/torch/dtensor_softcap_worker.py)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor")

from torch.distributed.tensor import Replicate, Shard  # noqa: E402

from tests._support import dtensor_worker  # noqa: E402
from tests.torch import dtensor_softcap_worker  # noqa: E402

WORLD = dtensor_worker.WORLD
TIMEOUT = 120  # seconds for both processes: they take 10-20 s on two busy cores
WORKER = pathlib.Path(dtensor_worker.__file__)
SOFTCAP_WORKER = pathlib.Path(dtensor_softcap_worker.__file__)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _result(process, output, error):
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"exit status {process.returncode}\n{output[-3000:]}\n{error[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])["cases"]


def _launch(worker, tmp_path_factory):
    """Each rank's report from `worker`, {case name: what it gave}, rank 0 first."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(port)],
            cwd=tmp_path_factory.mktemp("dtensor"),
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"the DTensor workers did not finish in {TIMEOUT} s (a hang?)")
    return [_result(p, *output) for p, output in zip(processes, outputs)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's report, {case name: what it gave}, rank 0 first."""
    return _launch(WORKER, tmp_path_factory)


@pytest.fixture(scope="module")
def softcap_ranks(tmp_path_factory):
    """The same from the softcap cases' worker."""
    return _launch(SOFTCAP_WORKER, tmp_path_factory)


def _case(ranks, name):
    for rank, cases in enumerate(ranks):
        assert "exception" not in cases[name], f"rank {rank}: {cases[name]['exception']}"
    return [cases[name] for cases in ranks]


def _tolerances(report):
    return dict(rtol=1e-12, atol=1e-14) if report["dtype"] == "torch.float64" else dict(rtol=2e-5, atol=1e-7)


def _assert_matches(report, *pairs):
    for got, want in pairs:
        np.testing.assert_allclose(np.array(report[got]), np.array(report[want]), **_tolerances(report), err_msg=got)


def _loss_placements(case):
    """Where the loss should lie: sharded on the row dimensions the logits' shard dimensions become."""
    axis = case.axis % len(case.shape)
    placements = case.logits if isinstance(case.logits, list) else [case.logits]
    rows = [Shard(p.dim - (p.dim > axis)) if p.is_shard() and p.dim != axis else Replicate() for p in placements]
    return str(tuple(rows))


@pytest.mark.parametrize("name", list(dtensor_worker.SPARSE_CASES))
def test_sparse_equals_the_unsharded_loss(ranks, name):
    case = dtensor_worker.SPARSE_CASES[name]
    for report in _case(ranks, name):
        _assert_matches(report, ("loss", "want_loss"), ("grad", "want_grad"))
        assert report["grad_placements"] == report["logits_placements"]
        assert report["loss_placements"] == _loss_placements(case)


@pytest.mark.parametrize("name", list(dtensor_worker.DENSE_CASES))
def test_dense_equals_the_unsharded_loss(ranks, name):
    for report in _case(ranks, name):
        _assert_matches(report, ("loss", "want_loss"), ("grad", "want_grad"))
        assert report["grad_placements"] == report["logits_placements"]
        if "labels_grad" in report:
            _assert_matches(report, ("labels_grad", "want_labels_grad"))
            assert report["labels_grad_placements"] == report["labels_placements"]


@pytest.mark.parametrize("name", list(dtensor_worker.BAD_LABEL_CASES))
def test_an_out_of_range_label_raises_on_every_rank(ranks, name):
    bad = dtensor_worker.BAD_LABEL_CASES[name][2]
    errors = [report["error"] for report in _case(ranks, name)]
    assert all(errors), errors
    assert errors[0] == errors[1]
    assert f"label value of {bad} which is outside the valid range of [0, 10)" in errors[0]


def test_the_class_sharded_loss_all_reduces_row_sized_tensors(ranks):
    rows = dtensor_worker.ROWS
    for report in _case(ranks, "collectives, classes"):
        assert [name for name, _ in report["forward"]] == ["c10d::allreduce_"] * 2, report["forward"]
        assert report["forward_count"] == 2  # CommDebugMode agrees
        assert max(size for _, size in report["forward"]) <= 2 * rows < report["local_logits"]
        assert report["backward"] == []  # given the rows' lse, each shard's gradient is local


def test_the_class_sharded_dense_loss_all_reduces_row_sized_tensors(ranks):
    """Dense labels sharded with the logits: no gather; a max and one sum of three values per row
    forward, the whole rows' label sums backward."""
    rows = dtensor_worker.ROWS
    for report in _case(ranks, "collectives, dense classes"):
        assert report["forward"] == [["c10d::allreduce_", rows], ["c10d::allreduce_", 3 * rows]], report["forward"]
        assert report["backward"] == [["c10d::allreduce_", rows]], report["backward"]
        assert 3 * rows < report["local_logits"]


def test_row_sharded_losses_run_locally(ranks):
    for report in _case(ranks, "collectives, rows"):
        assert report["forward"] == report["backward"] == []
        assert report["forward_count"] == 0
    for report in _case(ranks, "collectives, rows, sharded labels"):
        # the ranks agree on the labels' validity: one (found, value) pair from each
        assert report["forward"] == [["c10d::allgather_", 2 + 2 * WORLD]], report["forward"]
        assert report["backward"] == []


@pytest.mark.parametrize("name", list(dtensor_worker.SECOND_ORDER_CASES))
def test_second_derivatives_raise_a_clear_error(ranks, name):
    """Double backward on DTensor logits is not supported: a NotImplementedError naming it, not
    DTensor's mixed-tensor error or a wrong value."""
    for report in _case(ranks, name):
        assert report["error"] is not None and "on DTensor logits is not supported" in report["error"]


@pytest.mark.parametrize("name", list(dtensor_softcap_worker.SPARSE_CASES))
def test_sparse_with_softcap_equals_the_unsharded_loss(softcap_ranks, name):
    """Each shard's kernels cap their own logits (vocabulary-parallel too): the same values and
    gradients as the unsharded call with the same softcap (tests/torch/test_softcap.py checks
    that one against torch's own ops)."""
    case = dtensor_softcap_worker.SPARSE_CASES[name]
    assert case.options["softcap"] == dtensor_softcap_worker.CAP
    for report in _case(softcap_ranks, name):
        _assert_matches(report, ("loss", "want_loss"), ("grad", "want_grad"))
        assert report["grad_placements"] == report["logits_placements"]
        assert report["loss_placements"] == _loss_placements(case)


@pytest.mark.parametrize("name", list(dtensor_softcap_worker.DENSE_CASES))
def test_dense_with_softcap_equals_the_unsharded_loss(softcap_ranks, name):
    for report in _case(softcap_ranks, name):
        _assert_matches(report, ("loss", "want_loss"), ("grad", "want_grad"))
        _assert_matches(report, ("labels_grad", "want_labels_grad"))
        assert report["grad_placements"] == report["logits_placements"]
