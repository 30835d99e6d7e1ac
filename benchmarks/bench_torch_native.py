"""CPU benchmark: forward + backward of fused_xent.torch.cross_entropy against
torch.nn.functional.cross_entropy, eagerly, on the same inputs.

A step is loss = f(logits, target) (reduction "mean", class indices) and the gradient of the
logits (torch.autograd.grad). The variants run in turn within each round, after one warm-up round,
so that the load of a shared machine does not favour one; the medians and their ratio are
printed, with the CPU model and the thread counts. The issue's target is a ratio of at least 10
at 8192x32000 float32 (plain). "weight, smoothing" is the composite path (PyTorch's rule for a
class weight with label smoothing: one more pass over the logits each way).

    python benchmarks/bench_torch_native.py [--shape 8192x32000] [--dtype float32] [--rounds 7]
        [--options plain,smoothing,weight+smoothing]
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_jax_step import cpu_name  # the benchmarks folder is this script's sys.path[0]

import fused_xent.torch as ft

OPTIONS = {
    "plain": lambda classes, dtype: {},
    "smoothing": lambda classes, dtype: {"label_smoothing": 0.1},
    "weight+smoothing": lambda classes, dtype: {
        "weight": torch.rand(classes, generator=torch.Generator().manual_seed(2)).add(0.5).to(dtype),
        "label_smoothing": 0.1,
    },
}


def cpu_model():
    return cpu_name()


def step_time(loss_fn, logits, target, kwargs):
    """Seconds for one forward + backward (the gradient of the mean loss for the logits)."""
    start = time.perf_counter()
    loss = loss_fn(logits, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    elapsed = time.perf_counter() - start
    del grad
    return elapsed


def run(shape, dtype, rounds, option_names):
    rows, classes = shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=generator).mul(3).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in option_names:
        kwargs = OPTIONS[name](classes, dtype)
        variants = {"fused": ft.cross_entropy, "torch": F.cross_entropy}
        times = {v: [] for v in variants}
        for round_ in range(rounds + 1):  # round 0 warms up
            for variant, f in variants.items():
                seconds = step_time(f, logits, target, kwargs)
                if round_:
                    times[variant].append(seconds)
        medians = {v: statistics.median(t) for v, t in times.items()}
        results[name] = medians
        print(
            f"{name:>17}: fused {medians['fused'] * 1e3:8.1f} ms   torch {medians['torch'] * 1e3:8.1f} ms   "
            f"ratio {medians['torch'] / medians['fused']:5.1f}x",
            flush=True,
        )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8192x32000", help="rows x classes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--options", default="plain,smoothing,weight+smoothing", help=",".join(OPTIONS))
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.lower().split("x"))
    names = [n for n in args.options.split(",") if n]
    unknown = set(names) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown options {sorted(unknown)}; choose from {list(OPTIONS)}")
    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical cores (fused_xent's kernels use them all)")
    print(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads")
    print(f"{shape[0]}x{shape[1]} {args.dtype}, reduction mean, class indices; median of {args.rounds} rounds")
    run(shape, getattr(torch, args.dtype), args.rounds, names)


if __name__ == "__main__":
    main()
