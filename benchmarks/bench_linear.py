"""Peak memory and step time of a training step of the output layer + loss.

Compared, on the same inputs (no bias):
  fused         fused_xent.linear_cross_entropy (gradients computed in the forward)
  recompute     the same, logits recomputed in the backward instead
  dense_tf      logits = h @ W, then tf.nn.sparse_softmax_cross_entropy_with_logits
  dense_ours    logits = h @ W, then fused_xent.sparse_softmax_cross_entropy_with_logits
  dense_keras   logits = h @ W, then keras.losses.SparseCategoricalCrossentropy(from_logits=True)
"fused:128" is fused with 128-row chunks, "fused:128:0.5" also with dW slabs of at most half a
chunk's logits, "fused:/8" with the default rule at chunks of at most 1/8 of the rows (the
default before 1/16): to compare chunkings side by side.

A step (one tf.function) takes the mean loss, the gradients to the hidden
states and to W, and applies W -= lr * dW.

Memory, what the user's process holds ("first step"): each (method, shape, dtype)
runs in a fresh process with the allocators' default settings, which builds the
inputs and W (and loads the op library), records its RSS (the base), resets the
kernel's peak-RSS counter (/proc/self/clear_refs) and calls the step once:
tracing, graph optimization and the first run, whose allocations TensorFlow's
allocator then keeps. "First step" = peak RSS (VmHWM) - base - size of dW.
--memory-runs fresh processes per method, the methods in turn; medians.

--steady-memory adds the earlier measure: later steps (after a warm-up step) with
allocators set to give freed memory back (MEMORY_ENV), peak RSS above the RSS
after the warm-up, less dW: what the step's live tensors need, without what
the allocators keep.

Time: per shape and dtype, one fresh process (default allocator settings)
builds all methods' steps and runs them in turn, --steps rounds; medians. Alternating keeps the load of a
shared machine from favouring one method.

  python benchmarks/bench_linear.py                       # both shapes, float32 and bfloat16
  python benchmarks/bench_linear.py --quick               # a small shape
  python benchmarks/bench_linear.py --n 2048 --h 256 --v 32000 --dtypes float32 --methods fused,fused:/8,dense_tf
  python benchmarks/bench_linear.py --markdown out.md --plot out.png --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("fused", "recompute", "dense_tf", "dense_ours", "dense_keras")
SHAPES = ((2048, 256, 32000), (1024, 256, 128256))
QUICK_SHAPES = ((512, 64, 8000),)
DTYPES = ("float32", "bfloat16")

# Freed memory leaves the RSS: TensorFlow's oneDNN allocator otherwise keeps a
# pool at its high-water mark, and glibc keeps blocks under its self-raising
# mmap threshold; the fused kernels' gradient cache is off.
MEMORY_ENV = {
    "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "true",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "FUSED_XENT_BUFFER_CACHE_MB": "0",
}


# ------------------------------------------------------------------ child processes


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _method_chunk(method, chunk_size, shape=None):
    """("fused", 128, 0.5) for "fused:128:0.5" (rows per chunk; largest dW slab as a fraction of
    a chunk's logits), ("fused", 128, None) for "fused:128", else (method, chunk_size, None).
    "fused:/8" is the default rule with chunks of at most 1/8 of the rows (shape: (N, V, dtype))."""
    name, rows, slab = (method.split(":") + ["", ""])[:3]
    if rows.startswith("/"):
        import fused_xent._tf.linear as module

        default_fraction, module._CHUNK_FRACTION = module._CHUNK_FRACTION, int(rows[1:])
        try:
            rows = module._checked_chunk(None, shape[0], shape[1], shape[2])
        finally:
            module._CHUNK_FRACTION = default_fraction
    return name, int(rows) if rows else chunk_size, float(slab) if slab else None


def _make_step(method, tf, dtype, chunk_size, n, v):
    import fused_xent
    from fused_xent.linear import linear_cross_entropy

    method, chunk_size, slab_fraction = _method_chunk(method, chunk_size, (n, v, dtype))
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
        if method == "dense_tf":
            return tf.reduce_mean(tf.cast(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), tf.float32))
        return keras_loss(y, logits)

    @tf.function
    def step(h, w, y):
        import fused_xent._tf.linear as module

        default_slab = module._SLAB_FRACTION
        module._SLAB_FRACTION = slab_fraction or default_slab  # read while tracing only
        try:
            with tf.GradientTape() as tape:
                tape.watch(h)
                loss = mean_loss(h, w, y)
            dh, dw = tape.gradient(loss, [h, w])
        finally:
            module._SLAB_FRACTION = default_slab
        w.assign_sub(tf.cast(1e-3, dtype) * dw)
        return loss, tf.reduce_sum(tf.cast(dh, tf.float32))

    return step


def _inputs(args, tf, np):
    dtype = tf.as_dtype(args.dtype)
    rng = np.random.default_rng(0)
    h = tf.constant(rng.normal(size=(args.n, args.h)).astype(np.float32), dtype)
    w = tf.Variable(tf.constant((rng.normal(size=(args.h, args.v)) / np.sqrt(args.h)).astype(np.float32), dtype))
    y = tf.constant(rng.integers(0, args.v, args.n), tf.int32)
    return dtype, h, w, y


def _set_overrides(args):
    """Chunking parameters other than the module's defaults (to choose them)."""
    import fused_xent._tf.linear as module

    for name, value in (
        ("_SLAB_FRACTION", args.slab_fraction),
        ("_CHUNK_BYTES", args.chunk_bytes),
        ("_CHUNK_FRACTION", args.chunk_fraction),
    ):
        if value:
            setattr(module, name, value)


def child_first_step(args):
    """Peak RSS of the first call of the training step (tracing included) above the RSS
    before it, with the allocators' default settings: what the user's process holds."""
    import gc

    import numpy as np
    import tensorflow as tf

    dtype, h, w, y = _inputs(args, tf, np)
    _set_overrides(args)
    step = _make_step(args.method, tf, dtype, args.chunk_size, args.n, args.v)
    if args.method.split(":")[0] in ("fused", "recompute", "dense_ours"):
        from fused_xent._tf.loader import load_op_library

        load_op_library()  # once per process, not per step (a few MB of code)
    gc.collect()
    base = _rss_kib("VmRSS")
    _reset_peak()
    float(step(h, w, y)[0])
    peak = _rss_kib("VmHWM")
    weight_bytes = args.h * args.v * dtype.size
    print(
        json.dumps(
            {"first_step_above_mb": (peak - base) * 1024 / 1e6 - weight_bytes / 1e6, "base_mb": base * 1024 / 1e6}
        )
    )


def child_memory(args):
    import numpy as np
    import tensorflow as tf

    dtype, h, w, y = _inputs(args, tf, np)
    _set_overrides(args)
    step = _make_step(args.method, tf, dtype, args.chunk_size, args.n, args.v)
    float(step(h, w, y)[0])  # warm-up
    base = _rss_kib("VmRSS")
    _reset_peak()
    for _ in range(2):
        float(step(h, w, y)[0])
    peak = _rss_kib("VmHWM")
    weight_bytes = args.h * args.v * dtype.size
    print(json.dumps({"peak_above_mb": (peak - base) * 1024 / 1e6 - weight_bytes / 1e6}))


def child_timing(args):
    import numpy as np
    import tensorflow as tf

    dtype, h, w, y = _inputs(args, tf, np)
    _set_overrides(args)
    steps = {m: _make_step(m, tf, dtype, args.chunk_size, args.n, args.v) for m in args.methods.split(",")}
    first_loss = {m: float(step(h, w, y)[0]) for m, step in steps.items()}  # warm-up
    times = {m: [] for m in steps}
    for _ in range(args.steps):
        for m, step in steps.items():
            start = time.perf_counter()
            loss, check = step(h, w, y)
            float(loss), float(check)
            times[m].append(time.perf_counter() - start)
    print(json.dumps({"times": times, "first_loss": first_loss}))


# ------------------------------------------------------------------ parent


def _child(mode, shape, dtype, args, extra):
    n, h, v = shape
    # The steady-state memory mode runs with allocators that give freed memory back; the
    # first-step mode and the timing with the defaults users run (there, fresh mmaps for
    # every chunk's logits would add page faults that TensorFlow's allocator otherwise avoids).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(MEMORY_ENV if mode == "memory" else {}))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--n",
        str(n),
        "--h",
        str(h),
        "--v",
        str(v),
        "--dtype",
        dtype,
        "--steps",
        str(args.steps),
        *extra,
    ]
    for flag, value in (
        ("--chunk-size", args.chunk_size),
        ("--slab-fraction", args.slab_fraction),
        ("--chunk-bytes", args.chunk_bytes),
        ("--chunk-fraction", args.chunk_fraction),
    ):
        if value:
            cmd += [flag, str(value)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} {n}x{h}x{v} {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(values):
    return statistics.median(values) if values else float("nan")


def run_shape(methods, shape, dtype, args):
    n, h, v = shape
    timing = _child("timing", shape, dtype, args, ["--methods", ",".join(methods)]) if args.steps else None
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    first = {m: [] for m in methods}
    steady = {m: [] for m in methods}
    for _ in range(args.memory_runs):  # fresh processes, the methods in turn
        for method in methods:
            first[method].append(_child("first_step", shape, dtype, args, ["--method", method])["first_step_above_mb"])
            if args.steady_memory:
                steady[method].append(_child("memory", shape, dtype, args, ["--method", method])["peak_above_mb"])
    results = []
    for method in methods:
        times = timing["times"][method] if timing else []
        results.append(
            {
                "method": method,
                "n": n,
                "h": h,
                "v": v,
                "dtype": dtype,
                "first_step_above_mb": _median(first[method]),
                "first_steps_mb": first[method],
                "peak_above_mb": _median(steady[method]),
                "peaks_mb": steady[method],
                "logits_mb": n * v * itemsize / 1e6,
                "weight_mb": h * v * itemsize / 1e6,
                "step_s": _median(times),
                "times": times,
                "first_loss": timing["first_loss"][method] if timing else float("nan"),
            }
        )
    return results


def hardware():
    cpu, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    avx = next(
        (name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), "no AVX"
    )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        from importlib.metadata import version

        tf_version = "TensorFlow " + version("tensorflow")
    except Exception:  # noqa: BLE001 - only a label
        tf_version = "TensorFlow ?"
    return f"{os.cpu_count()} cores of {cpu} ({avx}), {memory_gib:.0f} GiB, {platform.system()}; {tf_version}"


def _ratio(r, results, other):
    base = next(
        (
            m
            for m in results
            if m["method"] == other and (m["n"], m["h"], m["v"], m["dtype"]) == (r["n"], r["h"], r["v"], r["dtype"])
        ),
        None,
    )
    if not base or not r["step_s"] == r["step_s"]:
        return ""
    return f"{r['step_s'] / base['step_s']:.2f}×"


def _mb_and_share(mb, r):
    return ("", "") if mb != mb else (f"{mb:.0f} MB", f"{100 * mb / r['logits_mb']:.1f}%")


def markdown(results, command):
    steady = any(r["peaks_mb"] for r in results)
    lines = [
        f"Command: `{command}`  ",
        f"Hardware: {hardware()}",
        "",
        "| N × H × V | dtype | method | first step: peak − base − dW | % of N×V logits |"
        + (" steady: peak − base − dW | % |" if steady else "")
        + " step (median) | ÷ dense_tf | ÷ dense_ours | ÷ dense_keras |",
        "| --- | --- | --- | ---: | ---: |" + (" ---: | ---: |" if steady else "") + " ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        first = _mb_and_share(r["first_step_above_mb"], r)
        cells = [f"{r['n']}×{r['h']}×{r['v']}", r["dtype"], r["method"], *first]
        if steady:
            cells += _mb_and_share(r["peak_above_mb"], r)
        cells += [
            f"{r['step_s']:.3f} s" if r["step_s"] == r["step_s"] else "",
            _ratio(r, results, "dense_tf"),
            _ratio(r, results, "dense_ours"),
            _ratio(r, results, "dense_keras"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["n"], r["h"], r["v"], r["dtype"]) for r in results}, key=lambda c: (c[2], c[3]))
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rows = [
            next(r for r in results if (r["n"], r["h"], r["v"], r["dtype"]) == c and r["method"] == method)
            for c in configs
        ]
        xs = [i + k * width for i in range(len(configs))]
        mem_ax.bar(xs, [100 * r["first_step_above_mb"] / r["logits_mb"] for r in rows], width, label=method)
        time_ax.bar(xs, [r["step_s"] for r in rows], width, label=method)
    for ax in (mem_ax, time_ax):
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(configs))],
            [f"{n}×{h}×{v}\n{d}" for n, h, v, d in configs],
            fontsize=8,
        )
    mem_ax.axhline(25, color="k", ls="--", lw=1)
    mem_ax.set_ylabel("first step: peak RSS − base − dW (% of N×V logits)")
    time_ax.set_ylabel("training step, median (s)")
    mem_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=("memory", "first_step", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--h", type=int)
    parser.add_argument("--v", type=int)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the function's)")
    parser.add_argument(
        "--slab-fraction",
        type=float,
        default=None,
        help="largest dW slab, as a fraction of a chunk's logits (default: the function's)",
    )
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=None,
        help="default chunk's largest logits in bytes (default: the function's _CHUNK_BYTES)",
    )
    parser.add_argument(
        "--chunk-fraction",
        type=int,
        default=None,
        help="default chunk is at most 1/F of the rows (default: the function's _CHUNK_FRACTION)",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed rounds (every method once per round)")
    parser.add_argument(
        "--memory-runs",
        type=int,
        default=1,
        help="fresh processes per method for the first step's peak RSS (0: time only)",
    )
    parser.add_argument(
        "--steady-memory",
        action="store_true",
        help="also the steady-state peak (later steps, allocators returning freed memory)",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--quick", action="store_true", help="a small shape only")
    parser.add_argument("--markdown", help="write the results table here")
    parser.add_argument("--plot", help="write a PNG of the results here")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    if args.child:
        return {"memory": child_memory, "first_step": child_first_step, "timing": child_timing}[args.child](args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.n:
        shapes = ((args.n, args.h, args.v),)
    methods = args.methods.split(",")
    results = []
    for shape in shapes:
        for dtype in args.dtypes.split(","):
            for r in run_shape(methods, shape, dtype, args):
                print(
                    f"{r['method']:12s} {r['n']}x{r['h']}x{r['v']} {dtype:9s} first step {r['first_step_above_mb']:7.1f} MB "
                    f"({100 * r['first_step_above_mb'] / r['logits_mb']:5.1f}% of logits)  "
                    f"steady {100 * r['peak_above_mb'] / r['logits_mb']:5.1f}%  step {r['step_s']:.3f} s",
                    flush=True,
                )
                results.append(r)
    command = " ".join(["python", "benchmarks/bench_linear.py", *sys.argv[1:]])
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(results, command))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
