"""What the final-logit softcap costs the CPU kernels: forward + backward (sparse labels) of the
fused kernels with and without `softcap`, interleaved in one process on the same inputs, medians
and their ratio. The capped rows are read from memory once, like the uncapped ones; the cap adds
one exp per element and a pass over a row-sized buffer in cache (cc/core/cpu_softcap.inc).

A second table takes the memory out: the same steps on logits that stay in the caches
(--cache-shape, repeated), in nanoseconds per element, beside the time the step's memory
traffic needs at the copy bandwidth measured in the same run (a NumPy copy of the largest
logits): where the cap's arithmetic alone exceeds what memory leaves free, no kernel hides it.

    python benchmarks/bench_softcap.py [--reps 15] [--shapes 8192x32000,1024x128256] [--dtypes float32,bfloat16]
        [--cache-shape 32x8192] [--json out.json]
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


def in_cache(shape, dtype, reps, cap=30.0, inner=20):
    """measure() on logits that fit the caches, `inner` steps per timing, in ns per element."""
    logits = _array(shape, dtype)
    labels = np.random.default_rng(1).integers(0, shape[1], shape[0]).astype(np.int64)
    buffers = (
        np.empty(shape[0], logits.dtype),
        np.empty(shape[0]),
        np.ones(shape[0], logits.dtype),
        np.empty_like(logits),
    )
    times = {0.0: [], cap: []}
    for variant in times:
        _step(logits, labels, buffers, dtype, variant)
    for _ in range(reps):
        for variant in times:
            start = time.perf_counter()
            for _ in range(inner):
                _step(logits, labels, buffers, dtype, variant)
            times[variant].append((time.perf_counter() - start) / inner / logits.size * 1e9)
    return statistics.median(times[0.0]), statistics.median(times[cap])


def copy_bandwidth(nbytes, reps):
    """Bytes per second of a NumPy copy (read + write) of an nbytes array: the memory's pace."""
    source = np.ones(nbytes // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shapes", default="8192x32000,1024x128256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cache-shape", default="32x8192")
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
    largest = max((r["shape"][0] * r["shape"][1] * 4 for r in results), default=1 << 26)
    bandwidth = copy_bandwidth(largest, args.reps)
    cache_shape = tuple(int(n) for n in args.cache_shape.split("x"))
    print(
        f"\nIn cache ({args.cache_shape}), ns per element of forward + backward; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print("| dtype | no cap | softcap=30 | cap's arithmetic | memory time (read, read + write) |")
    print("|---|---|---|---|---|")
    cached = []
    for dtype in args.dtypes.split(","):
        plain, capped = in_cache(cache_shape, dtype, args.reps)
        memory = 3 * np.dtype(_array((1, 1), dtype).dtype).itemsize / bandwidth * 1e9
        cached.append({"dtype": dtype, "plain_ns": plain, "softcap_ns": capped, "memory_ns": memory})
        print(f"| {dtype} | {plain:.3f} | {capped:.3f} | {capped - plain:.3f} | {memory:.3f} |")
    if args.json:
        with open(args.json, "w") as out:
            summary = {"cpu": _cpu_name(), "simd": info["simd"], "results": results}
            json.dump(summary | {"copy_bandwidth": bandwidth, "in_cache": cached}, out, indent=1)


if __name__ == "__main__":
    main()
