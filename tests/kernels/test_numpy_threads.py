"""The pybind11 module's worker threads (cc/py/worker_pool.h): calls from several
Python threads at once, and from a forked child, give the bits of one call alone."""

import multiprocessing
import threading

import numpy as np
import pytest

from fused_xent import numpy as fxnp

# Big enough to be split over threads (the module splits above 2^16 elements).
SHAPES = [(65536, 10), (4096, 1000), (8, 300000)]


def _case(shape, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 3).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    return labels, logits


def _run(labels, logits):
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits)
    return loss, grad


def _same_bits(a, b):
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_concurrent_calls_give_the_bits_of_one_call():
    cases = [_case(shape, seed) for seed, shape in enumerate(SHAPES * 2)]
    alone = [_run(*case) for case in cases]
    results = [None] * len(cases)
    errors = []
    start = threading.Barrier(len(cases))

    def work(i):
        try:
            start.wait()
            for _ in range(5):
                results[i] = _run(*cases[i])
                for got, want in zip(results[i], alone[i]):
                    _same_bits(got, want)
        except Exception as error:  # reported below, with its case
            errors.append((i, error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call did not return"
    assert not errors, errors


def _child(queue):
    labels, logits = _case(SHAPES[0], 0)
    loss, grad = _run(labels, logits)
    queue.put((loss, grad))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_forked_child_computes_after_the_parent():
    labels, logits = _case(SHAPES[0], 0)
    want = _run(labels, logits)  # the parent's pool exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    for a, b in zip(got, want):
        _same_bits(a, b)
