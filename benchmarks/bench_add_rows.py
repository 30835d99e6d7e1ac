"""The fused linear head's in-place row add (the op library's AddToRows) against
TensorFlow's InplaceAdd: a 256 x 128256 weight gradient built from four 64-row slabs,
as the head adds one chunk's dW; medians of interleaved runs, less the time of
allocating the zeroed buffer alone.

    python benchmarks/bench_add_rows.py [--reps 9]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROWS, COLUMNS, SLAB = 256, 128256, 64


def time_adds(dtype, reps):
    import tensorflow as tf

    from fused_xent._tf.loader import load_op_library

    library = load_op_library()
    part = tf.cast(np.random.default_rng(0).normal(size=(SLAB, COLUMNS)).astype(np.float32), dtype)

    def build(add):
        @tf.function
        def run(part):
            buffer = tf.raw_ops.Empty(shape=[ROWS, COLUMNS], dtype=dtype, init=True)
            for start in range(0, ROWS, SLAB):
                buffer = add(buffer, start, part)
            return buffer[0, 0]

        return run

    calls = {
        "AddToRows": build(lambda b, s, p: library.fused_xent_add_to_rows(b, s, p)),
        "InplaceAdd": build(lambda b, s, p: tf.raw_ops.InplaceAdd(x=b, i=tf.range(s, s + SLAB), v=p)),
        "buffer only": build(lambda b, s, p: b),
    }
    for call in calls.values():
        call(part)
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call(part)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["buffer only"])
    return {name: (statistics.median(times[name]) - base) / (ROWS // SLAB) for name in ("AddToRows", "InplaceAdd")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    import tensorflow as tf

    print(f"| dtype | AddToRows ms per {SLAB}×{COLUMNS} slab | InplaceAdd ms | InplaceAdd / AddToRows |")
    print("| --- | --- | --- | --- |")
    for dtype in (tf.float32, tf.bfloat16):
        t = time_adds(dtype, args.reps)
        print(
            f"| {dtype.name} | {t['AddToRows'] * 1e3:.2f} | {t['InplaceAdd'] * 1e3:.2f} | "
            f"{t['InplaceAdd'] / t['AddToRows']:.1f}× |"
        )


if __name__ == "__main__":
    main()
