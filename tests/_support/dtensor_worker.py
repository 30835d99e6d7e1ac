"""Run by tests/torch/test_dtensor.py, once per rank, as one of WORLD gloo processes on
127.0.0.1 (CPU): computes fused_xent.torch's losses on DTensors over meshes of all ranks,
and the same losses unsharded on the whole tensors, and prints as JSON after "RESULT " what
each case gave (values, gradients, placements, errors, the collectives it ran); the test
compares them.

Usage: python dtensor_worker.py RANK PORT
"""

import json
import sys
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fused_xent.torch as ft

WORLD = 2
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=3)


class Sparse(NamedTuple):
    shape: tuple
    axis: int
    logits: object  # the logits' placement, or a list of them on a 2-D mesh
    labels: object  # the labels' placement(s), or "plain": a whole tensor
    options: dict
    dtype: torch.dtype = torch.float32
    label_dtype: torch.dtype = torch.int64
    reduction: str = "sum"
    mesh: tuple = (WORLD,)
    masked: bool = False  # rows 0 and 1: -inf on the last rank's classes (a masked block), labels 0


def _mask(logits, labels=None):
    """-inf on the second half of the classes (the last rank's) of rows 0 and 1, class axis last."""
    logits[:2, logits.shape[-1] // 2 :] = -float("inf")
    if labels is not None:
        labels[:2] = 0


WEIGHTED = dict(OPTIONS, class_weights=True)

SPARSE_CASES = {
    "rows": Sparse((8, 10), -1, Shard(0), Shard(0), WEIGHTED, reduction="mean"),
    "rows, plain labels": Sparse((8, 10), -1, Shard(0), "plain", WEIGHTED),
    "rows, uneven": Sparse((7, 10), -1, Shard(0), Replicate(), OPTIONS),
    "rows, class axis first": Sparse((10, 6), 0, Shard(1), Shard(0), WEIGHTED),
    "inner rows": Sparse((4, 10, 3), 1, Shard(2), Shard(1), OPTIONS, reduction="mean"),
    "replicated": Sparse((8, 10), -1, Replicate(), Replicate(), WEIGHTED),
    "classes": Sparse((8, 10), -1, Shard(1), Replicate(), WEIGHTED, reduction="mean"),
    "classes, no smoothing, ignore_index -100": Sparse((8, 10), -1, Shard(1), "plain", dict(ignore_index=-100)),
    "classes, uneven, int32": Sparse((6, 11), -1, Shard(1), Shard(0), WEIGHTED, label_dtype=torch.int32),
    "classes, middle axis": Sparse((4, 10, 3), 1, Shard(1), Replicate(), WEIGHTED),
    "classes, float64": Sparse((8, 10), -1, Shard(1), Replicate(), WEIGHTED, dtype=torch.float64),
    "classes, fewer than ranks": Sparse((5, 1), -1, Shard(1), Replicate(), dict(label_smoothing=0.1)),
    "classes, uneven, middle axis": Sparse((4, 11, 3), 1, Shard(1), Replicate(), WEIGHTED),
    "classes, a rank's logits all -inf": Sparse(
        (6, 11), -1, Shard(1), Replicate(), dict(z_loss=1e-3, class_weights=True), masked=True
    ),
    # 2-D meshes of the two ranks: rows on one mesh dimension and classes on the other
    "2-D mesh, classes on the ranks": Sparse(
        (8, 10), -1, [Shard(0), Shard(1)], [Shard(0), Replicate()], WEIGHTED, mesh=(1, WORLD)
    ),
    "2-D mesh, rows on the ranks": Sparse(
        (8, 10), -1, [Shard(0), Shard(1)], [Shard(0), Shard(0)], WEIGHTED, mesh=(WORLD, 1)
    ),
}

# name: (logits shape, class axis, logits placement, labels placement, keyword arguments)
DENSE_CASES = {
    "dense rows": ((8, 10), -1, Shard(0), Shard(0), dict(label_smoothing=0.1, z_loss=1e-3)),
    "dense classes": ((8, 10), -1, Shard(1), Shard(1), dict(label_smoothing=0.1, z_loss=1e-3)),
    "dense classes, plain labels": ((6, 11), -1, Shard(1), "plain", {}),
    # rows summing to 1.7: the shards' target shares do not add up to 1
    "dense classes, labels not summing to 1": ((8, 10), -1, Shard(1), Shard(1), dict(z_loss=1e-3), 1.7),
    "dense classes, middle axis": ((4, 10, 3), 1, Shard(1), Replicate(), dict(label_smoothing=0.2)),
    # classes the ranks do not divide (torch.chunk: 6 and 5), and fewer classes than ranks
    "dense classes, uneven": ((6, 11), -1, Shard(1), Shard(1), dict(label_smoothing=0.1, z_loss=1e-3)),
    "dense classes, fewer than ranks": ((5, 1), -1, Shard(1), Shard(1), dict(label_smoothing=0.1)),
    # labels 0 where the logits are -inf: a masked block of the last rank
    "dense classes, a rank's logits all -inf": ((6, 11), -1, Shard(1), "plain", dict(z_loss=1e-3), 1.0, True),
}

# name: (logits placement, labels placement, the bad label, the row that holds it)
BAD_LABEL_CASES = {
    "bad label, rows": (Shard(0), Shard(0), 10, 6),  # only the last rank's shard holds it
    "bad label, classes": (Shard(1), Replicate(), -5, 0),
    "bad label, classes, sharded labels": (Shard(1), Shard(0), 12, 7),
}

ROWS, CLASSES = 16, 64  # the collectives cases: a row-sized tensor has 16 elements, a logits shard 512

# name: (logits placement, labels placement)
COLLECTIVE_CASES = {
    "collectives, classes": (Shard(1), Replicate()),
    "collectives, rows": (Shard(0), Replicate()),
    "collectives, rows, sharded labels": (Shard(0), Shard(0)),
}


def _bookkeeping(op):
    """Functional collectives' companions that move nothing."""
    return "wait" in op.name() or "wrap" in op.name()


class CollectiveLog(TorchDispatchMode):
    """The collectives run under it and the elements of each (op name, elements). DTensor ops
    are handed to DTensor first (NotImplemented, as CommDebugMode does), so that the
    collectives DTensor and the fused ops' rules issue pass through here too."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional") and not _bookkeeping(func):
            tensors = [t for t in _pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.calls.append((func.name(), sum(t.numel() for t in tensors)))
        return out


def _place(tensor, mesh, placements):
    if placements == "plain":
        return tensor
    return distribute_tensor(tensor, mesh, placements if isinstance(placements, list) else [placements])


def _reduce(loss, reduction):
    return loss.mean() if reduction == "mean" else loss.sum()


def _inputs(shape, axis, label_dtype, options, seed):
    generator = torch.Generator().manual_seed(seed)  # the same tensors on every rank
    logits = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    classes = shape[axis]
    axis %= len(shape)
    label_shape = shape[:axis] + shape[axis + 1 :]
    labels = torch.randint(0, classes, label_shape, generator=generator, dtype=label_dtype)
    if "ignore_index" in options and labels.numel() > 1:
        labels.view(-1)[1] = options["ignore_index"]  # an ignored row, whose label is a class
    kwargs = dict(options)
    if kwargs.get("class_weights"):
        kwargs["class_weights"] = torch.rand(classes, generator=generator) + 0.5
    return logits, labels, kwargs


def _sparse_case(meshes, case, seed):
    mesh = meshes[case.mesh]
    logits, labels, kwargs = _inputs(case.shape, case.axis, case.label_dtype, case.options, seed)
    if case.masked:
        _mask(logits, labels)
    logits, axis, reduction = logits.to(case.dtype), case.axis, case.reduction

    whole = logits.clone().requires_grad_()
    want = ft.sparse_softmax_cross_entropy_with_logits(labels, whole, axis=axis, **kwargs)
    _reduce(want, reduction).backward()

    sharded = _place(logits, mesh, case.logits).requires_grad_()
    got = ft.sparse_softmax_cross_entropy_with_logits(_place(labels, mesh, case.labels), sharded, axis=axis, **kwargs)
    _reduce(got, reduction).backward()
    return _report(got, sharded, want, whole)


def _dense_case(mesh, spec, seed):
    shape, axis, logits_placement, labels_placement, options, *rest = spec
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=generator)
    labels = torch.softmax(torch.randn(shape, generator=generator), axis) * (rest[0] if rest else 1.0)
    if len(rest) > 1 and rest[1]:
        _mask(logits)
        labels[:2, shape[-1] // 2 :] = 0.0

    whole, whole_labels = logits.clone().requires_grad_(), labels.clone().requires_grad_()
    want = ft.softmax_cross_entropy_with_logits(whole_labels, whole, axis, **options)
    want.sum().backward()

    sharded = _place(logits, mesh, logits_placement).requires_grad_()
    sharded_labels = _place(labels, mesh, labels_placement)
    if labels_placement != "plain":
        sharded_labels.requires_grad_()
    got = ft.softmax_cross_entropy_with_logits(sharded_labels, sharded, axis, **options)
    got.sum().backward()
    report = _report(got, sharded, want, whole)
    if labels_placement != "plain":
        report["labels_grad"] = sharded_labels.grad.full_tensor().tolist()
        report["want_labels_grad"] = whole_labels.grad.tolist()
        report["labels_grad_placements"] = str(sharded_labels.grad.placements)
        report["labels_placements"] = str(sharded_labels.placements)
    return report


def _report(got, sharded, want, whole):
    return {
        "loss": got.full_tensor().tolist(),
        "want_loss": want.detach().tolist(),
        "loss_placements": str(got.placements),
        "grad": sharded.grad.full_tensor().tolist(),
        "want_grad": whole.grad.tolist(),
        "grad_placements": str(sharded.grad.placements),
        "logits_placements": str(sharded.placements),
        "dtype": str(got.dtype),
    }


def _bad_label_case(mesh, spec, seed):
    logits_placement, labels_placement, bad, row = spec
    logits, labels, kwargs = _inputs((8, 10), -1, torch.int64, OPTIONS, seed)
    labels[row] = bad
    sharded = _place(logits.float(), mesh, logits_placement).requires_grad_()
    try:
        ft.sparse_softmax_cross_entropy_with_logits(_place(labels, mesh, labels_placement), sharded, **kwargs)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def _collectives_case(mesh, logits_placement, labels_placement):
    """The collectives of a forward and of its backward, and the elements of a local logits shard."""
    logits, labels, kwargs = _inputs((ROWS, CLASSES), -1, torch.int64, WEIGHTED, 0)
    sharded = distribute_tensor(logits.float(), mesh, [logits_placement]).requires_grad_()
    labels = distribute_tensor(labels, mesh, [labels_placement])
    with CommDebugMode() as counted, CollectiveLog() as forward:
        loss = ft.sparse_softmax_cross_entropy_with_logits(labels, sharded, **kwargs)
    total = loss.sum()
    with CollectiveLog() as backward:
        total.backward()
    return {
        "forward": forward.calls,
        "backward": backward.calls,
        "forward_count": counted.get_total_counts(),  # PyTorch's own count, to cross-check the log's
        "local_logits": sharded.to_local().numel(),
    }


def _dense_collectives_case(mesh):
    """The collectives of a class-sharded dense forward and backward."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(ROWS, CLASSES, generator=generator)
    labels = torch.softmax(torch.randn(ROWS, CLASSES, generator=generator), -1)
    sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    labels = distribute_tensor(labels, mesh, [Shard(1)])
    with CollectiveLog() as forward:
        loss = ft.softmax_cross_entropy_with_logits(labels, sharded, label_smoothing=0.1)
    total = loss.sum()
    with CollectiveLog() as backward:
        total.backward()
    return {"forward": forward.calls, "backward": backward.calls, "local_logits": sharded.to_local().numel()}


def _run(case):
    try:
        return case()
    except Exception as error:  # reported, so that the test names the case that failed
        return {"exception": f"{type(error).__name__}: {error}"}


def _second_order_case(mesh, placement, kind):
    """The error a second derivative (double backward) of a loss on DTensor logits raises."""
    torch.manual_seed(7)
    z = distribute_tensor(torch.randn(8, 10, dtype=torch.float64), mesh, [placement]).requires_grad_()
    if kind == "sparse":
        loss = ft.sparse_softmax_cross_entropy_with_logits(torch.arange(8) % 10, z).sum()
    else:
        loss = ft.softmax_cross_entropy_with_logits(torch.full((8, 10), 0.1, dtype=torch.float64), z).sum()
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    try:
        torch.autograd.grad(grad.sum(), z)
    except NotImplementedError as error:
        return {"error": str(error)}
    return {"error": None}


SECOND_ORDER_CASES = {
    f"second derivative, {kind}, {name}": (placement, kind)
    for kind in ("sparse", "dense")
    for name, placement in (("rows", Shard(0)), ("classes", Shard(1)))
}


def main():
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    meshes = {shape: init_device_mesh("cpu", shape) for shape in ((WORLD,), (1, WORLD), (WORLD, 1))}
    mesh = meshes[(WORLD,)]
    results = {}
    for seed, (name, spec) in enumerate(SPARSE_CASES.items()):
        results[name] = _run(lambda: _sparse_case(meshes, spec, seed))
    for seed, (name, spec) in enumerate(DENSE_CASES.items()):
        results[name] = _run(lambda: _dense_case(mesh, spec, seed))
    for seed, (name, spec) in enumerate(BAD_LABEL_CASES.items()):
        results[name] = _run(lambda: _bad_label_case(mesh, spec, seed))
    for name, placements in COLLECTIVE_CASES.items():
        results[name] = _run(lambda: _collectives_case(mesh, *placements))
    results["collectives, dense classes"] = _run(lambda: _dense_collectives_case(mesh))
    for name, (placement, kind) in SECOND_ORDER_CASES.items():
        results[name] = _run(lambda: _second_order_case(mesh, placement, kind))
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, "cases": results}))


if __name__ == "__main__":
    main()
