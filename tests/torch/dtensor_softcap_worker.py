"""Run by tests/torch/test_dtensor.py, once per rank, as one of two gloo processes on 127.0.0.1
(CPU): the cases of tests/_support/dtensor_worker.py with a softcap, for logits sharded on rows
and on classes (vocabulary-parallel: each shard's kernels cap their own logits). Prints, after
"RESULT ", what each case gave, in that worker's format.

Usage: python dtensor_softcap_worker.py RANK PORT
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

from tests._support import dtensor_worker as base

WORLD = base.WORLD
CAP = 2.5  # the logits are 3 * randn: the cap bends most of them
CAPPED = dict(base.WEIGHTED, softcap=CAP)

SPARSE_CASES = {
    "softcap, rows": base.Sparse((8, 10), -1, Shard(0), Shard(0), CAPPED),
    "softcap, classes": base.Sparse((8, 10), -1, Shard(1), Replicate(), CAPPED, reduction="mean"),
    "softcap, classes, uneven, float64": base.Sparse(
        (6, 11), -1, Shard(1), Shard(0), CAPPED, dtype=torch.float64, label_dtype=torch.int32
    ),
    "softcap, classes, middle axis": base.Sparse((4, 10, 3), 1, Shard(1), Replicate(), CAPPED),
    "softcap, 2-D mesh, classes on the ranks": base.Sparse(
        (8, 10), -1, [Shard(0), Shard(1)], [Shard(0), Replicate()], CAPPED, mesh=(1, WORLD)
    ),
}

DENSE_CASES = {
    "softcap, dense rows": ((8, 10), -1, Shard(0), Shard(0), dict(label_smoothing=0.1, z_loss=1e-3, softcap=CAP)),
    "softcap, dense classes": ((8, 10), -1, Shard(1), Shard(1), dict(label_smoothing=0.1, z_loss=1e-3, softcap=CAP)),
    "softcap, dense classes, labels not summing to 1": (
        (8, 10),
        -1,
        Shard(1),
        Shard(1),
        dict(z_loss=1e-3, softcap=CAP),
        1.7,
    ),
}


def main():
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    meshes = {shape: init_device_mesh("cpu", shape) for shape in ((WORLD,), (1, WORLD), (WORLD, 1))}
    results = {}
    for seed, (name, spec) in enumerate(SPARSE_CASES.items()):
        results[name] = base._run(lambda: base._sparse_case(meshes, spec, seed))
    for seed, (name, spec) in enumerate(DENSE_CASES.items()):
        results[name] = base._run(lambda: base._dense_case(meshes[(WORLD,)], spec, seed))
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, "cases": results}))


if __name__ == "__main__":
    main()
