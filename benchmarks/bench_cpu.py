"""CPU benchmark: the fused op against tf.nn's op (plain and under XLA).

Times forward + backward of a mean loss (tf.function + GradientTape), the
variants interleaved in one process on the same inputs: the fused op, the fused
op under XLA (jit_compile=True) through its custom call to the fused kernels
and through its HLO lowering (FUSED_XENT_XLA_LOWERING=hlo), and tf.nn's op
with and without XLA. Reports medians,
speedups and the fraction of the bandwidth floor reached:
    floor = 3 * N * C * itemsize / copy bandwidth   (sparse labels)
(the forward reads the logits, the backward reads them again and writes the
gradient; dense labels add two reads of the labels: 5 * N * C * itemsize), with
the copy bandwidth measured in the same run (best of one and all cores).
Loss-only calls (no gradient) are timed too, against one read of the logits.
Also measures the peak memory of a training step whose logits are an
intermediate, and of a loss-only call, each in a fresh subprocess: the rise of
the process's peak RSS (VmHWM, reset after one warm-up step) above its RSS
with the inputs in place; median of --memory-runs processes, with glibc's
defaults and with its mmap threshold fixed (see FIXED_MALLOC).

Segmentation-shaped logits (N×H×W×C, e.g. 8×256×256×21) are timed with the
class axis last (NHWC) and as axis 1 (NCHW, `axis=1`, no transpose), against
tf.nn on NHWC and on NCHW through a transpose (`--only segmentation` runs just
those rows). A language-model head's step (logits = hidden @ W, N=2048, H=256,
V=32000) shows what the loss is worth in a whole step, and the fused step with
its gradient buffer cache off (a fresh process) separates the kernels' share
of the speedup from the allocator's.

    python benchmarks/bench_cpu.py [--quick] [--reps 15] [--markdown docs/benchmarks.md] [--chart docs/benchmarks_cpu.png]
    python benchmarks/bench_cpu.py --only segmentation [--reps 41]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

SHAPES = [(65536, 10), (8192, 1000), (1024, 32000), (128, 128256)]
QUICK_SHAPES = [(65536, 10), (1024, 32000)]
SEGMENTATION_SHAPE = (8, 256, 256, 21)  # N, H, W, C


# --- machine -------------------------------------------------------------------------
def copy_bandwidth(megabytes=256, reps=7):
    """Bytes read + written per second by a NumPy copy: the best of one thread and all
    cores (median of reps each), so the floor is the stricter of the two."""
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing

    def timed(threads):
        bounds = [(c[0], c[-1] + 1) for c in np.array_split(np.arange(src.size), threads)]
        times = []
        for _ in range(reps):
            workers = [threading.Thread(target=np.copyto, args=(dst[lo:hi], src[lo:hi])) for lo, hi in bounds]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(time.perf_counter() - start)
        return 2 * src.nbytes / statistics.median(times)

    return max(timed(1), timed(os.cpu_count() or 1))


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


# --- timing --------------------------------------------------------------------------
def make_step(loss_fn, jit, lowering=None):
    """A compiled training step; `lowering` sets FUSED_XENT_XLA_LOWERING while it
    runs (XLA reads it when it compiles the step, at the first call)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def step(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf.reduce_mean(loss_fn(labels, logits))
        return loss, tape.gradient(loss, logits)

    if lowering is None:
        return step

    def step_with_lowering(logits, labels):
        before = os.environ.get("FUSED_XENT_XLA_LOWERING")
        os.environ["FUSED_XENT_XLA_LOWERING"] = lowering
        try:
            return step(logits, labels)
        finally:
            if before is None:
                del os.environ["FUSED_XENT_XLA_LOWERING"]
            else:
                os.environ["FUSED_XENT_XLA_LOWERING"] = before

    return step_with_lowering


def variants(kind):
    import tensorflow as tf

    import fused_xent

    if kind == "sparse":
        ours, theirs = (
            fused_xent.sparse_softmax_cross_entropy_with_logits,
            tf.nn.sparse_softmax_cross_entropy_with_logits,
        )
    else:
        ours, theirs = fused_xent.softmax_cross_entropy_with_logits, tf.nn.softmax_cross_entropy_with_logits
    return {
        "fused": make_step(ours, jit=False),
        "fused+XLA": make_step(ours, jit=True, lowering="custom_call"),
        "fused+XLA (HLO)": make_step(ours, jit=True, lowering="hlo"),
        "tf.nn": make_step(theirs, jit=False),
        "tf.nn+XLA": make_step(theirs, jit=True),
    }


def loss_only_variants():
    import tensorflow as tf

    import fused_xent

    def make(loss_fn):
        @tf.function
        def loss(logits, labels):
            return tf.reduce_mean(loss_fn(labels, logits))

        return loss

    return {
        "fused": make(fused_xent.sparse_softmax_cross_entropy_with_logits),
        "tf.nn": make(tf.nn.sparse_softmax_cross_entropy_with_logits),
    }


def inputs(shape, dtype, kind, seed=0):
    import tensorflow as tf

    n, c = shape
    rng = np.random.default_rng(seed)
    logits = tf.cast(rng.normal(size=shape).astype(np.float32) * 2, dtype)
    if kind == "sparse":
        labels = tf.constant(rng.integers(0, c, size=n))
    else:
        labels = tf.nn.softmax(tf.cast(rng.normal(size=shape).astype(np.float32), dtype))
    return logits, labels


def time_calls(calls, reps):
    """Median seconds of each zero-argument call, the calls interleaved rep by rep."""
    calls = dict(calls)
    for name, call in list(calls.items()):  # trace and warm up
        try:
            call()
        except Exception as error:  # e.g. a build without the XLA lowering
            print(f"# {name} unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            del calls[name]
            continue
        call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_variants(steps, args, reps):
    return time_calls({name: (lambda step=step: step(*args)) for name, step in steps.items()}, reps)


def time_dtypes(kind, shape, reps):
    """The fused step on float32 and on bfloat16 logits, interleaved: the two
    dtypes' rows of the main table are measured minutes apart, and this
    machine's speed drifts by more than their difference."""
    import tensorflow as tf

    step = variants(kind)["fused"]
    args = {dtype: inputs(shape, getattr(tf, dtype), kind) for dtype in ("float32", "bfloat16")}
    return time_calls({dtype: (lambda a=a: step(*a)) for dtype, a in args.items()}, reps)


def numpy_reference_step(labels, logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    rows = np.arange(len(labels))
    loss = np.log(s[:, 0]) - z[rows, labels]
    grad = e / s
    grad[rows, labels] -= 1.0
    return loss, grad / len(labels)


def time_numpy(shape, reps):
    from fused_xent import numpy as fxnp

    logits, labels = (np.asarray(v) for v in inputs(shape, "float32", "sparse"))
    logits = np.asarray(logits, np.float32)
    grad_loss = np.full(shape[0], 1.0 / shape[0], np.float32)
    runs = {
        "fused_xent.numpy": lambda: fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss),
        "NumPy": lambda: numpy_reference_step(labels, logits),
    }
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def time_kernels_alone(shapes, reps):
    """The CPU kernels without TensorFlow: one call of the compiled module (forward and
    backward of sparse rows, into buffers allocated once), float32 and bfloat16 interleaved;
    and an empty tf.function step on the same inputs, the fixed cost every TF step pays."""
    import ml_dtypes
    import tensorflow as tf

    from fused_xent import _core

    @tf.function
    def empty_step(logits, labels):
        return tf.shape(logits)[0] + tf.shape(labels)[0]

    rows = []
    for shape in shapes:
        n, c = shape
        logits, labels = (np.asarray(v) for v in inputs(shape, tf.float32, "sparse"))
        calls = {}
        for name, dtype in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
            z = np.ascontiguousarray(logits.astype(dtype))
            out = (np.empty(n, dtype), np.empty(n, np.float64), np.full(n, 1.0 / n, dtype), np.empty_like(z))
            calls[name] = lambda z=z, out=out, name=name: _core.sparse(
                name, z, labels, n, c, 1, 0.0, 0.0, None, None, *out
            )
            # The forward alone (no gradient buffers): the backward's share is the difference.
            calls[f"{name} forward"] = lambda z=z, out=out, name=name: _core.sparse(
                name, z, labels, n, c, 1, 0.0, 0.0, None, None, out[0], out[1], None, None
            )
        tensors = (tf.constant(logits), tf.constant(labels))
        calls["empty tf.function step"] = lambda: empty_step(*tensors)
        rows.append({"shape": shape, "times": time_calls(calls, reps)})
    return rows


LM_HEAD_SHAPE = (2048, 256, 32000)  # N, H, V


def time_lm_head(shape, reps):
    """A language-model head's training step, logits = hidden @ W in the step and gradients
    for hidden and W, with each loss; and each loss's step alone on logits of the same size,
    so the loss's share of the whole step shows."""
    import tensorflow as tf

    import fused_xent

    n, h, v = shape
    rng = np.random.default_rng(3)
    hidden = tf.constant(rng.normal(size=(n, h)).astype(np.float32))
    w = tf.constant(rng.normal(size=(h, v)).astype(np.float32) * h**-0.5)
    labels = tf.constant(rng.integers(0, v, size=n))
    losses = {
        "fused": fused_xent.sparse_softmax_cross_entropy_with_logits,
        "tf.nn": tf.nn.sparse_softmax_cross_entropy_with_logits,
    }

    def head_step(fn):
        @tf.function
        def step(hidden, w, labels):
            with tf.GradientTape() as tape:
                tape.watch([hidden, w])
                loss = tf.reduce_mean(fn(labels, hidden @ w))
            return loss, tape.gradient(loss, [hidden, w])

        return step

    logits = hidden @ w
    calls = {}
    for name, fn in losses.items():
        step, alone = head_step(fn), make_step(fn, jit=False)
        calls[f"{name} step"] = lambda step=step: step(hidden, w, labels)
        calls[f"{name} loss alone"] = lambda alone=alone: alone(logits, labels)
    return time_calls(calls, reps)


# The fused step with the gradient buffer cache off (FUSED_XENT_BUFFER_CACHE_MB=0, read once
# when the library loads, hence a fresh process) against tf.nn's in the same process.
CACHE_OFF_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_cpu, tensorflow as tf
steps = bench_cpu.variants("sparse")
steps = {"fused, cache off": steps["fused"], "tf.nn": steps["tf.nn"]}
rows = []
for shape in json.loads(sys.argv[2]):
    shape = tuple(shape)
    times = bench_cpu.time_variants(steps, bench_cpu.inputs(shape, tf.float32, "sparse"), int(sys.argv[3]))
    rows.append({"shape": shape, "times": times})
print("RESULT " + json.dumps(rows))
"""


def time_cache_off(shapes, reps):
    env = dict(os.environ, FUSED_XENT_BUFFER_CACHE_MB="0")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CACHE_OFF_SCRIPT,
            os.path.dirname(os.path.abspath(__file__)),
            json.dumps(shapes),
            str(reps),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
        env=env,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def segmentation_variants(kind):
    """Steps on NHWC logits (class axis last) and NCHW logits (class axis 1)."""
    import tensorflow as tf

    import fused_xent

    nchw_to_nhwc = [0, 2, 3, 1]
    if kind == "sparse":
        ours, theirs = (
            fused_xent.sparse_softmax_cross_entropy_with_logits,
            tf.nn.sparse_softmax_cross_entropy_with_logits,
        )
        ours_axis1 = lambda y, x: ours(y, x, axis=1)  # noqa: E731
        theirs_axis1 = lambda y, x: theirs(y, tf.transpose(x, nchw_to_nhwc))  # noqa: E731
    else:
        ours, theirs = fused_xent.softmax_cross_entropy_with_logits, tf.nn.softmax_cross_entropy_with_logits
        ours_axis1 = lambda y, x: ours(y, x, axis=1)  # noqa: E731
        theirs_axis1 = lambda y, x: theirs(tf.transpose(y, nchw_to_nhwc), tf.transpose(x, nchw_to_nhwc))  # noqa: E731
    return {
        "fused, axis last": ("nhwc", make_step(ours, jit=False)),
        "fused, axis 1": ("nchw", make_step(ours_axis1, jit=False)),
        "tf.nn, axis last": ("nhwc", make_step(theirs, jit=False)),
        "tf.nn, axis 1 (transpose)": ("nchw", make_step(theirs_axis1, jit=False)),
    }


def segmentation_inputs(shape, kind, seed=0):
    """{"nhwc": (logits, labels), "nchw": (logits, labels)}: the same values in both layouts."""
    import tensorflow as tf

    n, h, w, c = shape
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape).astype(np.float32) * 2
    if kind == "sparse":
        labels = rng.integers(0, c, size=(n, h, w))
        labels_nchw = labels
    else:
        labels = np.asarray(tf.nn.softmax(rng.normal(size=shape).astype(np.float32)))
        labels_nchw = np.ascontiguousarray(np.moveaxis(labels, -1, 1))
    return {
        "nhwc": (tf.constant(logits), tf.constant(labels)),
        "nchw": (tf.constant(np.ascontiguousarray(np.moveaxis(logits, -1, 1))), tf.constant(labels_nchw)),
    }


def time_segmentation(shape, reps, bandwidth):
    rows = []
    for kind in ("sparse", "dense"):
        data = segmentation_inputs(shape, kind)
        steps = segmentation_variants(kind)
        times = time_calls(
            {name: (lambda s=step, a=data[layout]: s(*a)) for name, (layout, step) in steps.items()}, reps
        )
        arrays = 3 if kind == "sparse" else 5
        floor = arrays * int(np.prod(shape)) * 4 / bandwidth
        rows.append({"kind": kind, "shape": shape, "times": times, "floor": floor})
        print(format_segmentation_row(rows[-1]), flush=True)
    return rows


# --- memory ----------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
import fused_xent
which, mode, n, c, h = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
fn = fused_xent.sparse_softmax_cross_entropy_with_logits if which == "fused" else tf.nn.sparse_softmax_cross_entropy_with_logits
labels = tf.random.stateless_uniform([n], [0, 1], maxval=c, dtype=tf.int64)

if mode == "train":
    hidden = tf.random.stateless_normal([n, h], [0, 2])
    w = tf.Variable(tf.random.stateless_normal([h, c], [0, 3]) * 0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(fn(labels, hidden @ w))
        return tape.gradient(loss, w)
else:
    logits = tf.random.stateless_normal([n, c], [0, 4])

    @tf.function
    def step():
        return tf.reduce_mean(fn(labels, logits))

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

step()  # trace and run once, so one-time allocations are done
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
for _ in range(3):
    step()
print(json.dumps({"above_inputs": status("VmHWM:") - before}))
"""


# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap,
# so which of them count toward the peak depends on the order of allocations,
# not only on the tensors alive. A fixed threshold of 1 MiB returns every large
# block to the OS when freed: the peak then follows the tensors themselves.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def peak_memory(which, mode, shape, hidden=64, env=None):
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, which, mode, str(shape[0]), str(shape[1]), str(hidden)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=dict(os.environ, **(env or {})),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["above_inputs"]


def peak_memory_runs(mode, shape, runs, env=None):
    """Peak RSS rises of fused and tf.nn, alternating fresh processes (RSS is noisy)."""
    results = {"fused": [], "tf.nn": []}
    for _ in range(runs):
        for which in results:
            results[which].append(peak_memory(which, mode, shape, env=env))
    return results


# --- report ------------------------------------------------------------------------------
def run(args):
    import tensorflow as tf

    import fused_xent

    bandwidth = copy_bandwidth()
    info = fused_xent.build_info()
    segmentation = time_segmentation(args.segmentation_shape, args.reps, bandwidth)
    if args.only == "segmentation":
        return {
            "machine": machine_description(),
            "tensorflow": tf.__version__,
            "simd": info["simd"],
            "bandwidth": bandwidth,
            "segmentation": segmentation,
            "command": "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:]),
        }
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    rows = []
    for kind in ("sparse", "dense"):
        steps = variants(kind)
        for dtype in ("float32", "bfloat16"):
            for shape in shapes:
                times = time_variants(steps, inputs(shape, getattr(tf, dtype), kind), args.reps)
                itemsize = 4 if dtype == "float32" else 2
                arrays = 3 if kind == "sparse" else 5
                floor = arrays * shape[0] * shape[1] * itemsize / bandwidth
                rows.append({"kind": kind, "dtype": dtype, "shape": shape, "times": times, "floor": floor})
                print(format_row(rows[-1]), flush=True)
    dtype_rows = [
        {"kind": kind, "shape": shape, "times": time_dtypes(kind, shape, args.reps)}
        for kind in ("sparse", "dense")
        for shape in shapes
    ]
    loss_only = []
    for shape in shapes:
        times = time_variants(loss_only_variants(), inputs(shape, tf.float32, "sparse"), args.reps)
        loss_only.append({"shape": shape, "times": times, "floor": shape[0] * shape[1] * 4 / bandwidth})
    numpy_rows = [{"shape": s, "times": time_numpy(s, args.reps)} for s in shapes]
    kernels_alone = time_kernels_alone(shapes, args.reps)
    for row in kernels_alone:
        row["floor"] = 3 * row["shape"][0] * row["shape"][1] * 4 / bandwidth
    cache_off = time_cache_off(shapes, args.reps)
    for row in cache_off:
        row["floor"] = 3 * row["shape"][0] * row["shape"][1] * 4 / bandwidth
        on = next(
            r
            for r in rows
            if r["kind"] == "sparse" and r["dtype"] == "float32" and tuple(r["shape"]) == tuple(row["shape"])
        )
        row["cache_on"] = on["times"]
    lm_head = {"shape": args.lm_head_shape, "times": time_lm_head(args.lm_head_shape, args.reps)}
    memory = None
    if not args.skip_memory:
        shape = (1024, 32000)
        memory = {
            "shape": shape,
            "logits_bytes": shape[0] * shape[1] * 4,
            "train": peak_memory_runs("train", shape, args.memory_runs),
            "train_fixed_malloc": peak_memory_runs("train", shape, args.memory_runs, FIXED_MALLOC),
            "loss_only": peak_memory_runs("loss", shape, args.memory_runs),
        }
    return {
        "machine": machine_description(),
        "tensorflow": tf.__version__,
        "simd": info["simd"],
        "bandwidth": bandwidth,
        "clock_hz": nominal_clock_hz(),
        "rows": rows,
        "dtype_rows": dtype_rows,
        "loss_only": loss_only,
        "numpy": numpy_rows,
        "cache_off": cache_off,
        "kernels_alone": kernels_alone,
        "lm_head": lm_head,
        "memory": memory,
        "segmentation": segmentation,
        "command": "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:]),
    }


def _ms(times, name):
    return f"{times[name] * 1e3:.2f}" if name in times else "n/a"


def _ratio(times, slow, fast):
    return f"{times[slow] / times[fast]:.1f}×" if slow in times and fast in times else "n/a"


def _slowdown(times, slow, fast):
    return f"{times[slow] / times[fast]:.2f}×" if slow in times and fast in times else "n/a"


def format_row(row):
    t = row["times"]
    return (
        f"| {row['kind']} | {row['dtype']} | {row['shape'][0]}×{row['shape'][1]} | {_ms(t, 'fused')} | "
        f"{_ms(t, 'tf.nn')} | {_ms(t, 'tf.nn+XLA')} | {_ratio(t, 'tf.nn', 'fused')} | "
        f"{_ratio(t, 'tf.nn+XLA', 'fused')} | {100 * row['floor'] / t['fused']:.0f}% | {_ms(t, 'fused+XLA')} | "
        f"{_slowdown(t, 'fused+XLA', 'fused')} | {_ratio(t, 'tf.nn+XLA', 'fused+XLA')} | {_ms(t, 'fused+XLA (HLO)')} | "
        f"{_ratio(t, 'tf.nn+XLA', 'fused+XLA (HLO)')} |"
    )


SEGMENTATION_COLUMNS = ["fused, axis last", "fused, axis 1", "tf.nn, axis last", "tf.nn, axis 1 (transpose)"]


def format_segmentation_row(row):
    t = row["times"]
    n, h, w, c = row["shape"]
    cells = [_ms(t, name) for name in SEGMENTATION_COLUMNS]
    fractions = [f"{100 * row['floor'] / t[name]:.0f}%" if name in t else "n/a" for name in SEGMENTATION_COLUMNS[:2]]
    return (
        f"| {row['kind']} | {n}×{h}×{w}×{c} | " + " | ".join(cells) + " | "
        f"{_slowdown(t, 'fused, axis 1', 'fused, axis last')} | {_ratio(t, 'tf.nn, axis 1 (transpose)', 'fused, axis 1')} | "
        + " | ".join(fractions)
        + " |"
    )


def segmentation_markdown(rows):
    if not rows:
        return []
    return [
        "",
        "Segmentation logits (float32, forward + backward of a mean loss), the same values with the class axis",
        "last (N×H×W×C) and as axis 1 (N×C×H×W, `axis=1`); tf.nn on the latter through a transpose (its sparse op",
        "has no axis). Median milliseconds; floor = 3·N·H·W·C·4 bytes (sparse), 5·N·H·W·C·4 (dense) / copy bandwidth:",
        "",
        "| labels | N×H×W×C | fused, axis last | fused, axis 1 | tf.nn, axis last | tf.nn, axis 1 (transpose) "
        "| axis 1, time of axis last | fused axis 1 vs tf.nn axis 1 | axis last, of floor | axis 1, of floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + [format_segmentation_row(r) for r in rows]


def kernels_alone_markdown(rows):
    if not rows:
        return []
    lines = [
        "",
        "The kernels alone: one call of the compiled module (`fused_xent._core`, no TensorFlow; forward and "
        "backward of sparse rows into buffers allocated once), and an empty `tf.function` step on the same "
        "tensors, the fixed cost of every TensorFlow step above. Floor as above (float32). Median milliseconds:",
        "",
        "| N×C | float32 ms | float32, of floor | bfloat16 ms | bfloat16 vs float32 | empty tf.function step ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["times"]
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {_ms(t, 'float32')} | {100 * r['floor'] / t['float32']:.0f}% | "
            f"{_ms(t, 'bfloat16')} | {t['float32'] / t['bfloat16']:.2f}× | {_ms(t, 'empty tf.function step')} |"
        )
    return lines


def nominal_clock_hz():
    """The CPU's reported clock (/proc/cpuinfo), or None: a scale for cycles per element."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def time_split_markdown(rows, clock_hz):
    """Where the kernels' time goes: forward and backward apart, per element and core."""
    if not rows or "float32 forward" not in rows[0]["times"]:
        return []
    cores = os.cpu_count() or 1
    unit = f"cycles at the reported {clock_hz / 1e9:.2f} GHz" if clock_hz else "ns"
    lines = [
        "",
        f"Where the kernels' time goes, from the same calls: the forward alone, and the backward as the "
        f"difference, in {unit} per element and core ({cores} cores). Logits that fit in the last-level cache "
        "are not limited by memory bandwidth: their time is arithmetic and data movement inside the cores. "
        "The last column is bfloat16's time against its own floor (half of float32's bytes):",
        "",
        "| N×C | logits MB (float32) | float32 forward | float32 backward | bfloat16 forward | "
        "bfloat16 backward | bfloat16, of its floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, (n, c) = r["times"], r["shape"]
        scale = cores / (n * c) * (clock_hz if clock_hz else 1e9)
        cells = []
        for dtype in ("float32", "bfloat16"):
            forward = t[f"{dtype} forward"]
            cells += [f"{forward * scale:.2f}", f"{(t[dtype] - forward) * scale:.2f}"]
        lines.append(
            f"| {n}×{c} | {n * c * 4 / 1e6:.1f} | {' | '.join(cells)} | {100 * (r['floor'] / 2) / t['bfloat16']:.0f}% |"
        )
    return lines


def _find(rows, **keys):
    """The first row whose fields equal `keys` (shapes compared as tuples), or None."""
    for row in rows or []:
        if all((tuple(row[k]) if k == "shape" else row[k]) == v for k, v in keys.items()):
            return row
    return None


def _span(values, fmt="{:.2f}", unit="×"):
    """'low–high' (or the one value) of `values`, formatted."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"


def _verdict(ok):
    return "met" if ok else "**not met**"


def targets_markdown(result):
    """The CPU speed targets, each judged on this run's figures, with what limits the ones not met."""
    rows, lines = result.get("rows"), []

    def fraction(kind, shape):
        row = _find(rows, kind=kind, dtype="float32", shape=shape)
        return None if row is None else row["floor"] / row["times"]["fused"]

    for shape, goal in (((8192, 1000), 0.70), ((65536, 10), 0.40)):
        got = {kind: fraction(kind, shape) for kind in ("sparse", "dense")}
        if None in got.values():
            continue
        text = f"sparse {100 * got['sparse']:.0f}%, dense {100 * got['dense']:.0f}%"
        limit = ""
        alone = _find(result.get("kernels_alone"), shape=shape)
        if min(got.values()) < goal and alone:
            t = alone["times"]
            fixed, kernels = t["empty tf.function step"], t["float32"]
            limit = (
                f"the floor is {alone['floor'] * 1e3:.2f} ms; an empty `tf.function` step takes {fixed * 1e3:.2f} ms "
                f"and the kernels alone {kernels * 1e3:.2f} ms ({100 * alone['floor'] / kernels:.0f}% of the "
                f"floor): the two together allow at most {100 * alone['floor'] / (fixed + kernels):.0f}% (sparse)"
            )
        lines.append(
            f"| float32 at {shape[0]}×{shape[1]}: ≥ {100 * goal:.0f}% of the floor | {text} | "
            f"{_verdict(min(got.values()) >= goal)} | {limit} |"
        )
    dtype_rows = [r for r in result.get("dtype_rows") or []]
    big = [r for r in dtype_rows if r["shape"][1] >= 1000]
    if big:
        ratios = [r["times"]["float32"] / r["times"]["bfloat16"] for r in big]
        alone = [r for r in result.get("kernels_alone") or [] if r["shape"][1] >= 1000]
        limit = ""
        if min(ratios) < 1.5 and alone:
            kernel_ratios = [r["times"]["float32"] / r["times"]["bfloat16"] for r in alone]
            own_floor = [100 * r["floor"] / 2 / r["times"]["bfloat16"] for r in alone]
            limit = (
                f"the kernels alone: bfloat16 {_span(kernel_ratios)} float32, at "
                f"{_span(own_floor, '{:.0f}', '%')} of its own floor: "
                "its time is arithmetic (the same float32 arithmetic per element, plus conversions: see the "
                "cycles per element above), not bytes"
            )
        lines.append(
            f"| bfloat16 ≥ 1.5× as fast as float32 at C ≥ 1000 | {_span(ratios)} | "
            f"{_verdict(min(ratios) >= 1.5)} | {limit} |"
        )
    if dtype_rows:
        ratios = {
            f"{r['kind']} {r['shape'][0]}×{r['shape'][1]}": r["times"]["float32"] / r["times"]["bfloat16"]
            for r in dtype_rows
        }
        worst = min(ratios, key=ratios.get)
        limit = ""
        if ratios[worst] < 1:
            limit = (
                f"slowest: {worst}, {ratios[worst]:.2f}×; logits that fit in the caches gain nothing from half "
                "the bytes and pay the conversions"
            )
        lines.append(
            f"| bfloat16 never slower than float32 | {_span(ratios.values())} | "
            f"{_verdict(ratios[worst] >= 1)} | {limit} |"
        )
    for row in result.get("segmentation") or []:
        t = row["times"]
        if "fused, axis 1" in t and "fused, axis last" in t:
            slowdown = t["fused, axis 1"] / t["fused, axis last"]
            n, h, w, c = row["shape"]
            lines.append(
                f"| {row['kind']} {n}×{h}×{w}×{c}, `axis=1` within 1.3× of the axis last | {slowdown:.2f}× | "
                f"{_verdict(slowdown <= 1.3)} | |"
            )
    if not lines:
        return []
    return [
        "",
        "Speed targets, judged on this run (float32 unless named; the TensorFlow step as in the first table):",
        "",
        "| target | this run | | what limits it |",
        "| --- | --- | --- | --- |",
    ] + lines


def cache_off_markdown(rows):
    if not rows:
        return []
    lines = [
        "",
        "The gradient buffer cache off (`FUSED_XENT_BUFFER_CACHE_MB=0`: every gradient a fresh allocation, "
        "as tf.nn's), sparse float32, forward + backward; measured in a second process against tf.nn, so the "
        "kernels' share of the speedup shows apart from the allocator's. \"fused, cache on\" is the main "
        "table's figure. Median milliseconds:",
        "",
        "| N×C | fused, cache off ms | tf.nn ms | cache off vs tf.nn | cache off, of floor | fused, cache on ms "
        "| cache on vs tf.nn |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, on = r["times"], r["cache_on"]
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {_ms(t, 'fused, cache off')} | {_ms(t, 'tf.nn')} | "
            f"{_ratio(t, 'tf.nn', 'fused, cache off')} | {100 * r['floor'] / t['fused, cache off']:.0f}% | "
            f"{_ms(on, 'fused')} | {_ratio(on, 'tf.nn', 'fused')} |"
        )
    return lines


def lm_head_markdown(head):
    if not head:
        return []
    n, h, v = head["shape"]
    t = head["times"]
    lines = [
        "",
        f"A language-model head's training step (float32, N={n}, H={h}, V={v}): logits = hidden @ W in "
        'the step, a mean sparse loss, gradients for hidden and W; "loss alone" is the loss\'s own step on '
        "logits of that size. Median milliseconds:",
        "",
        "| loss | whole step ms | loss alone ms | loss, share of the step |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("fused", "tf.nn"):
        whole, alone = t[f"{name} step"], t[f"{name} loss alone"]
        lines.append(f"| {name} | {whole * 1e3:.1f} | {alone * 1e3:.2f} | {100 * alone / whole:.0f}% |")
    lines.append(
        f"| tf.nn vs fused | {t['tf.nn step'] / t['fused step']:.2f}× | "
        f"{t['tf.nn loss alone'] / t['fused loss alone']:.1f}× | |"
    )
    return lines


KEPT_HEADING = "\n## Measured by hand"  # from here on the file is other runs' and kept


def write_markdown(path, text):
    """Writes the generated sections, keeping the file's hand-kept tail (KEPT_HEADING onwards)."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    kept = old[old.index(KEPT_HEADING) :] if KEPT_HEADING in old else ""
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n" + kept)


def markdown(result):
    mib = 1 << 20
    if "rows" not in result:  # --only segmentation
        return (
            "\n".join(
                [
                    f"Machine: {result['machine']}; TensorFlow {result['tensorflow']}; kernels: {result['simd']}.",
                    f"Copy bandwidth: {result['bandwidth'] / 1e9:.1f} GB/s. Command: `{result['command']}`",
                ]
                + segmentation_markdown(result["segmentation"])
            )
            + "\n"
        )
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/bench_cpu.py` (the command below reproduces it). Times are medians of",
        "interleaved runs in one process on the same inputs; ratios compare columns of the same run.",
        "The chart is [benchmarks_cpu.png](benchmarks_cpu.png). GPU results (`scripts/gpu_check.sh` on an",
        "NVIDIA H200) are in [cuda.md](cuda.md#status-what-ran-on-hardware). The loss on JAX and PyTorch",
        "(`benchmarks/bench_backends.py`) is in [benchmarks_backends.md](benchmarks_backends.md), the fused",
        "linear head (`benchmarks/bench_linear.py`) in [linear_head.md](linear_head.md#benchmark).",
        "",
        "## CPU",
        "",
        f"Machine: {result['machine']}; TensorFlow {result['tensorflow']}; kernels: {result['simd']}.",
        f"Copy bandwidth (read + write, best of one and all cores): {result['bandwidth'] / 1e9:.1f} GB/s.",
        f"Command: `{result['command']}`",
        "",
        "Forward + backward of a mean loss, median milliseconds; floor = 3·N·C·itemsize / copy bandwidth for sparse",
        "labels, 5·N·C·itemsize / copy bandwidth for dense labels (the labels are read by both passes).",
        "Over 100% is possible: the floor is set by a NumPy copy, which is not the fastest way this machine can move memory.",
        "",
        "fused+XLA is the step compiled with `jit_compile=True`, which calls the fused kernels through XLA custom",
        'calls; "time of fused" is its time over the fused step\'s without XLA (1.00× = no cost). fused+XLA (HLO) is',
        "the same step through the HLO lowering (`FUSED_XENT_XLA_LOWERING=hlo`, the path for devices without a handler).",
        "Speedups are the other column's time over this one's.",
        "",
        "| labels | logits | N×C | fused ms | tf.nn ms | tf.nn+XLA ms | fused vs tf.nn | fused vs tf.nn+XLA "
        "| fused, of floor | fused+XLA ms | fused+XLA, time of fused | fused+XLA vs tf.nn+XLA | fused+XLA (HLO) ms "
        "| fused+XLA (HLO) vs tf.nn+XLA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [format_row(r) for r in result["rows"]]
    if result.get("dtype_rows"):
        lines += [
            "",
            "bfloat16 against float32 logits: the fused step on each, the two interleaved in one loop (the table",
            "above measures the two dtypes minutes apart), median milliseconds:",
            "",
            "| labels | N×C | float32 ms | bfloat16 ms | bfloat16 vs float32 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in result["dtype_rows"]:
            t = r["times"]
            lines.append(
                f"| {r['kind']} | {r['shape'][0]}×{r['shape'][1]} | {_ms(t, 'float32')} | {_ms(t, 'bfloat16')} | "
                f"{t['float32'] / t['bfloat16']:.2f}× |"
            )
    lines += [
        "",
        "Loss only (sparse float32, mean loss, no gradient), median milliseconds; floor = one read of the logits:",
        "",
    ]
    lines += ["| N×C | fused ms | tf.nn ms | fused vs tf.nn | fused, of floor |", "| --- | --- | --- | --- | --- |"]
    for r in result.get("loss_only", []):
        t = r["times"]
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {_ms(t, 'fused')} | {_ms(t, 'tf.nn')} | {_ratio(t, 'tf.nn', 'fused')} | "
            f"{100 * r['floor'] / t['fused']:.0f}% |"
        )
    lines += kernels_alone_markdown(result.get("kernels_alone"))
    lines += time_split_markdown(result.get("kernels_alone"), result.get("clock_hz"))
    lines += cache_off_markdown(result.get("cache_off"))
    lines += lm_head_markdown(result.get("lm_head"))
    lines += segmentation_markdown(result.get("segmentation"))
    lines += targets_markdown(result)
    lines += ["", "NumPy binding (sparse float32, forward + backward), median milliseconds:", ""]
    lines += ["| N×C | fused_xent.numpy | NumPy | speedup |", "| --- | --- | --- | --- |"]
    for r in result["numpy"]:
        t = r["times"]
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {t['fused_xent.numpy'] * 1e3:.2f} | {t['NumPy'] * 1e3:.2f} | "
            f"{t['NumPy'] / t['fused_xent.numpy']:.1f}× |"
        )
    m = result["memory"]
    if m:

        def cell(runs, logits_ratio=False):
            median = statistics.median(runs)
            text = f"{median / mib:.0f} MiB"
            if logits_ratio:
                text += f" ({median / m['logits_bytes']:.2f}× logits)"
            return text + f"; runs {min(runs) / mib:.0f}–{max(runs) / mib:.0f}"

        runs = len(m["train"]["fused"])
        lines += [
            "",
            f"Peak memory above the inputs (process RSS), sparse float32 {m['shape'][0]}×{m['shape'][1]}"
            f" (logits: {m['logits_bytes'] / mib:.0f} MiB); median of {runs} fresh processes each, fused and tf.nn alternating:",
            "",
            "| step | fused | tf.nn |",
            "| --- | --- | --- |",
            f"| training step (logits = hidden @ W, gradient for W) | {cell(m['train']['fused'], True)} | "
            f"{cell(m['train']['tf.nn'], True)} |",
            f"| the same, `MALLOC_MMAP_THRESHOLD_=1048576` | {cell(m['train_fixed_malloc']['fused'], True)} | "
            f"{cell(m['train_fixed_malloc']['tf.nn'], True)} |",
            f"| loss only | {cell(m['loss_only']['fused'])} | {cell(m['loss_only']['tf.nn'])} |",
            "",
            "With glibc's defaults, freed blocks under its self-raising mmap threshold (such as the 8 MiB gradient",
            "of W) stay in the heap, and whether they add to the peak depends on the order of allocations: those",
            "figures move by several MiB between runs and between the two ops. With the threshold fixed at 1 MiB,",
            "every large block goes back to the OS when freed, and the peak follows the tensors alive.",
        ]
    return "\n".join(lines) + "\n"


def chart(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['kind']}\n{r['dtype']}\n{r['shape'][0]}×{r['shape'][1]}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    names = [
        n for n in ("fused", "fused+XLA", "fused+XLA (HLO)", "tf.nn", "tf.nn+XLA") if all(n in r["times"] for r in rows)
    ]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        offset = (k - (len(names) - 1) / 2) * width
        ax.bar(x + offset, [r["times"][name] * 1e3 for r in rows], width=width, label=name)
    ax.scatter(x, [r["floor"] * 1e3 for r in rows], color="black", marker="_", s=200, label="bandwidth floor", zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.legend()
    ax.set_title(f"fused-xent vs tf.nn, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_shapes(text):
    return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--shapes", type=parse_shapes, help="comma-separated NxC list, e.g. 64x10,8x3000")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--only", choices=["segmentation"], help="run only these rows")
    parser.add_argument(
        "--segmentation-shape",
        type=lambda t: tuple(int(d) for d in t.lower().split("x")),
        default=SEGMENTATION_SHAPE,
        help="NxHxWxC of the segmentation rows",
    )
    parser.add_argument(
        "--lm-head-shape",
        type=lambda t: tuple(int(d) for d in t.lower().split("x")),
        default=LM_HEAD_SHAPE,
        help="NxHxV of the language-model head step",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per memory figure")
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--chart", help="write a PNG chart to this file")
    parser.add_argument("--json", help="write raw results to this file")
    args = parser.parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.chart and "rows" in result:
        chart(result, args.chart)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
