"""What the final-logit softcap costs the CPU kernels: forward + backward (sparse labels) of the
fused kernels with and without `softcap`, interleaved in one process on the same inputs, medians
and their ratio. The capped rows are read from memory once, like the uncapped ones; the cap adds
one exp per element and a pass over a row-sized buffer in cache (cc/core/cpu_softcap.inc).

    python benchmarks/bench_softcap.py [--reps 15] [--shapes 8192x32000,1024x128256] [--dtypes float32,bfloat16] [--json out.json]
"""

import argparse
import json
import statistics
import time

import numpy as np

from fused_xent import _core


def _cpu_name():
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")


def _array(shape, dtype, seed=0):
    values = np.random.default_rng(seed).standard_normal(shape, np.float32) * 4
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16)
    return values.astype(dtype)


def _step(logits, labels, buffers, dtype, cap):
    rows, classes = logits.shape
    loss, lse, grad_loss, grad = buffers
    _core.sparse(dtype, logits, labels, rows, classes, 1, 0.0, 0.0, None, None, loss, lse, grad_loss, grad, softcap=cap)


def measure(shape, dtype, reps, cap=30.0):
    logits = _array(shape, dtype)
    labels = np.random.default_rng(1).integers(0, shape[1], shape[0]).astype(np.int64)
    buffers = (
        np.empty(shape[0], logits.dtype),
        np.empty(shape[0]),
        np.ones(shape[0], logits.dtype),
        np.empty_like(logits),
    )
    times = {0.0: [], cap: []}
    for variant in times:  # warm-up: fault the gradient's pages in, start the workers
        _step(logits, labels, buffers, dtype, variant)
    for _ in range(reps):
        for variant in times:
            start = time.perf_counter()
            _step(logits, labels, buffers, dtype, variant)
            times[variant].append(time.perf_counter() - start)
    plain, capped = statistics.median(times[0.0]), statistics.median(times[cap])
    return {
        "shape": list(shape),
        "dtype": dtype,
        "plain_ms": plain * 1e3,
        "softcap_ms": capped * 1e3,
        "ratio": capped / plain,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shapes", default="8192x32000,1024x128256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()
    info = _core.build_info()
    print(f"CPU: {_cpu_name()}, kernels: {info['simd']}")
    print("| shape | dtype | no cap (ms) | softcap=30 (ms) | ratio |")
    print("|---|---|---|---|---|")
    results = []
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        for dtype in args.dtypes.split(","):
            row = measure(shape, dtype, args.reps)
            results.append(row)
            print(f"| {text} | {dtype} | {row['plain_ms']:.1f} | {row['softcap_ms']:.1f} | {row['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpu": _cpu_name(), "simd": info["simd"], "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
