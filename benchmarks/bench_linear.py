"""Peak memory and step time of a training step of the output layer + loss.

Compared, on the same inputs:
  fused         fused_xent.linear_cross_entropy (gradients computed in the forward)
  recompute     the same with the logits recomputed in the backward (design (a))
  dense_ours    logits = h @ W, then fused_xent.sparse_softmax_cross_entropy_with_logits
  dense_keras   logits = h @ W, then keras.losses.SparseCategoricalCrossentropy(from_logits=True)

A step (one tf.function) takes the mean loss, the gradients to the hidden
states and to W, and applies W -= lr * dW. Every (method, shape, dtype) runs
in a fresh subprocess: it builds the inputs and W, runs one warm-up step
(tracing), then records its RSS, resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and times --steps steps. "Peak above" is the peak
RSS minus that RSS minus the size of dW (which is part of the step but not of
the baseline), so it is the memory the step needs beyond inputs, weights and
weight gradient. glibc is told to mmap every allocation over 128 KiB
(MALLOC_MMAP_THRESHOLD_), so freed blocks leave the RSS, and the fused
kernels' buffer cache is off (FUSED_XENT_BUFFER_CACHE_MB=0) for every method.

  python benchmarks/bench_linear.py                    # the four shapes x dtypes, 5 steps each
  python benchmarks/bench_linear.py --quick            # small shapes
  python benchmarks/bench_linear.py --markdown docs/linear_head_results.md --plot docs/linear_head.png
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("fused", "recompute", "dense_ours", "dense_keras")
SHAPES = ((2048, 256, 32000), (1024, 256, 128256))
QUICK_SHAPES = ((512, 64, 8000),)
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------ child


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _make_step(method, tf, dtype, chunk_size):
    import fused_xent
    from fused_xent.linear import linear_cross_entropy

    keras_loss = None
    if method == "dense_keras":
        import keras

        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def mean_loss(h, w, y):
        if method in ("fused", "recompute"):
            strategy = "auto" if method == "fused" else "recompute"
            return tf.reduce_mean(linear_cross_entropy(h, w, y, chunk_size=chunk_size, _strategy=strategy))
        logits = tf.matmul(h, w)
        if method == "dense_ours":
            return tf.reduce_mean(tf.cast(fused_xent.sparse_softmax_cross_entropy_with_logits(y, logits), tf.float32))
        return keras_loss(y, logits)

    @tf.function
    def step(h, w, y):
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = mean_loss(h, w, y)
        dh, dw = tape.gradient(loss, [h, w])
        w.assign_sub(tf.cast(1e-3, dtype) * dw)
        return loss, tf.reduce_sum(tf.cast(dh, tf.float32))

    return step


def child(args):
    import numpy as np
    import tensorflow as tf

    dtype = tf.as_dtype(args.dtype)
    rng = np.random.default_rng(0)
    h = tf.constant(rng.normal(size=(args.n, args.h)).astype(np.float32), dtype)
    w = tf.Variable(tf.constant((rng.normal(size=(args.h, args.v)) / np.sqrt(args.h)).astype(np.float32), dtype))
    y = tf.constant(rng.integers(0, args.v, args.n), tf.int32)
    step = _make_step(args.method, tf, dtype, args.chunk_size)
    float(tf.reduce_sum(tf.cast(w, tf.float32)))  # starts the runtime, reads W
    step.get_concrete_function(h, w, y)  # traces (Python and graph memory, not the step's)
    base = _rss_kib("VmRSS")
    _reset_peak()
    loss, _ = step(h, w, y)  # first run: graph optimisation, first allocations
    float(loss)
    after_first = _rss_kib("VmHWM")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, check = step(h, w, y)
        float(loss), float(check)
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    weight_bytes = args.h * args.v * dtype.size
    print(json.dumps({
        "method": args.method, "n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype,
        "peak_above_mb": (peak - base) * 1024 / 1e6 - weight_bytes / 1e6,
        "logits_mb": args.n * args.v * dtype.size / 1e6,
        "weight_mb": weight_bytes / 1e6,
        "first_step_peak_above_mb": (after_first - base) * 1024 / 1e6 - weight_bytes / 1e6,
        "step_s": sorted(times)[len(times) // 2],
        "times": times,
        "loss": float(loss),
    }))


# ------------------------------------------------------------------ parent


def run_config(method, n, h, v, dtype, steps, chunk_size=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MALLOC_MMAP_THRESHOLD_="131072", FUSED_XENT_BUFFER_CACHE_MB="0")
    command = [sys.executable, __file__, "--child", "--method", method, "--n", str(n), "--h", str(h), "--v", str(v),
               "--dtype", dtype, "--steps", str(steps)]
    if chunk_size:
        command += ["--chunk-size", str(chunk_size)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{method} {n}x{h}x{v} {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def hardware():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores of {cpu}, {memory_gib:.0f} GiB, {platform.system()}"


def markdown(results, command):
    lines = [
        "| N × H × V | dtype | method | peak above inputs, W, dW (MB) | % of N×V logits | step (s, median) | vs dense_ours | vs dense_keras |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        same = {m["method"]: m for m in results if (m["n"], m["v"], m["dtype"]) == (r["n"], r["v"], r["dtype"])}
        ours, keras = same.get("dense_ours"), same.get("dense_keras")
        lines.append(
            f"| {r['n']}×{r['h']}×{r['v']} | {r['dtype']} | {r['method']} | {r['peak_above_mb']:.0f} | "
            f"{100 * r['peak_above_mb'] / r['logits_mb']:.0f}% | {r['step_s']:.3f} | "
            f"{r['step_s'] / ours['step_s']:.2f}× | {r['step_s'] / keras['step_s']:.2f}× |"
            if ours and keras else f"| {r['n']}×{r['h']}×{r['v']} | {r['dtype']} | {r['method']} | "
            f"{r['peak_above_mb']:.0f} | | {r['step_s']:.3f} | | |"
        )
    return "\n".join([f"Command: `{command}`", "", f"Hardware: {hardware()}", ""] + lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["n"], r["h"], r["v"], r["dtype"]) for r in results}, key=lambda c: (c[2], c[3]))
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        rows = [next((r for r in results if (r["n"], r["h"], r["v"], r["dtype"]) == c and r["method"] == method), None)
                for c in configs]
        xs = [i + k * width for i in range(len(configs))]
        mem_ax.bar(xs, [100 * r["peak_above_mb"] / r["logits_mb"] if r else 0 for r in rows], width, label=method)
        time_ax.bar(xs, [r["step_s"] if r else 0 for r in rows], width, label=method)
    labels = [f"{n}×{h}×{v}\n{d}" for n, h, v, d in configs]
    for ax in (mem_ax, time_ax):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], labels, fontsize=8)
    mem_ax.axhline(25, color="k", ls="--", lw=1)
    mem_ax.set_ylabel("peak RSS above inputs, W, dW (% of N×V logits)")
    time_ax.set_ylabel("training step (s, median)")
    mem_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--h", type=int)
    parser.add_argument("--v", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--markdown", help="write the results table here")
    parser.add_argument("--plot", help="write a PNG of the results here")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    if args.child:
        return child(args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.n:
        shapes = ((args.n, args.h, args.v),)
    results = []
    for n, h, v in shapes:
        for dtype in args.dtypes.split(","):
            for method in args.methods.split(","):
                r = run_config(method, n, h, v, dtype, args.steps, args.chunk_size)
                print(f"{method:12s} {n}x{h}x{v} {dtype:9s} peak above {r['peak_above_mb']:7.1f} MB "
                      f"({100 * r['peak_above_mb'] / r['logits_mb']:5.1f}% of logits)  step {r['step_s']:.3f} s",
                      flush=True)
                results.append(r)
    command = "python benchmarks/bench_linear.py " + " ".join(sys.argv[1:])
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(results, command.strip()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
