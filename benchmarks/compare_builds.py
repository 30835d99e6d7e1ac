"""Two builds of the CPU kernels side by side: loads two `_core` extension modules (the
pybind11 module, no TensorFlow) into one process and times their forward + backward on the
same arrays, interleaved, so that a kernel change is measured against its baseline in one run.

    python benchmarks/compare_builds.py --baseline old/_core.cpython-311-x86_64-linux-gnu.so \
        --candidate build/dev/_core.cpython-311-x86_64-linux-gnu.so --reps 21 [--dtype bfloat16]

Cases include "confident" rows (the label's logit 25 above the others: p_label ~ 1), which
take the forward's exact re-summation when the max was found mid-row.
"""

import argparse
import importlib.machinery
import importlib.util
import time

import numpy as np

CASES = [  # (rows, classes, dense labels, confident rows, inner: positions after the class axis)
    (65536, 10, False, False, 1),
    (65536, 10, False, True, 1),
    (8192, 1000, False, False, 1),
    (8192, 1000, False, True, 1),
    (1024, 32000, False, False, 1),
    (1024, 32000, False, True, 1),
    (1024, 32000, True, False, 1),
    (128, 128256, False, True, 1),
    # Segmentation logits 8×21×256×256 with the class axis at 1 (8 rows of 21 × 65536).
    (8, 21, False, False, 65536),
    (8, 21, True, False, 65536),
]


def load_core(path, name):
    """The extension at `path` as module `name` (its init function is PyInit__core either way)."""
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._core", path)
    spec = importlib.util.spec_from_file_location(f"{name}._core", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_case(rows, classes, dense, confident, inner, rng):
    """Logits [rows, classes, inner] (labels [rows, inner]; dense labels one-hot, like the logits)."""
    z = (rng.normal(size=(rows, classes, inner)) * 3).astype(np.float32)
    y = rng.integers(0, classes, size=(rows, inner))
    picked = (np.arange(rows)[:, None], y, np.arange(inner)[None, :])
    if confident:
        z[picked] += 25
    t = None
    if dense:
        t = np.zeros_like(z)
        t[picked] = 1
    return z, y.astype(np.int64), t


def case_label(rows, classes, dense, confident, inner):
    shape = f"{rows}×{classes}" if inner == 1 else f"{rows}×{classes}×{inner}, class axis 1"
    return f"{'dense' if dense else 'sparse'} {shape}{', confident' if confident else ''}"


def outputs_for(z):
    """Output buffers, made once per case: fresh pages would add their faults to every call."""
    outer, _, inner = z.shape
    return (
        np.empty(outer * inner, z.dtype),
        np.empty(outer * inner, np.float64),
        np.ones(outer * inner, z.dtype),
        np.empty_like(z),
    )


def run(core, z, y, t, outputs, dtype="float32"):
    outer, classes, inner = z.shape
    loss, lse, grad_loss, grad = outputs
    if t is None:
        core.sparse(dtype, z, y, outer, classes, inner, 0.0, 0.0, None, None, loss, lse, grad_loss, grad)
    else:
        core.dense(dtype, z, t, outer, classes, inner, 0.0, 0.0, loss, lse, grad_loss, grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the logits' (and dense labels') dtype",
    )
    parser.add_argument("--match", default="", help="only the cases whose label contains this text")
    args = parser.parse_args()
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    cores = {"baseline": load_core(args.baseline, "baseline"), "candidate": load_core(args.candidate, "candidate")}
    rng = np.random.default_rng(0)
    print("| case | baseline ms | candidate ms | candidate / baseline |")
    print("| --- | --- | --- | --- |")
    for rows, classes, dense, confident, inner in CASES:
        label = case_label(rows, classes, dense, confident, inner)
        if args.match not in label:
            continue
        z, y, t = make_case(rows, classes, dense, confident, inner, rng)
        z, t = z.astype(np_dtype), None if t is None else t.astype(np_dtype)
        times = {name: [] for name in cores}
        outputs = outputs_for(z)
        for _ in range(args.reps):
            for name, core in cores.items():
                start = time.perf_counter()
                run(core, z, y, t, outputs, args.dtype)
                times[name].append(time.perf_counter() - start)
        base, cand = (np.median(times[k]) * 1e3 for k in ("baseline", "candidate"))
        print(f"| {label} | {base:.2f} | {cand:.2f} | {cand / base:.2f}× |")


if __name__ == "__main__":
    main()
