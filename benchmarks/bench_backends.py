"""The fused loss on each framework against that framework's own cross-entropy and Keras's loss on
that backend: forward + backward of a mean sparse loss, float32, on the CPU, medians of
interleaved runs in one process per framework (a fresh process each: Keras's backend is fixed at
import).

    python benchmarks/bench_backends.py --reps 15 --markdown docs/benchmarks_backends.md

Rows per framework: ours (`fused_xent.<framework>`), the framework's own composite
(JAX: `jax.nn.log_softmax` + `take_along_axis` under `jax.jit`; PyTorch:
`torch.nn.functional.cross_entropy`), and Keras's `SparseCategoricalCrossentropy` against ours
from `fused_xent.losses` on that Keras backend. A framework that is not installed is skipped.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

SHAPES = [(8192, 1000), (1024, 32000)]

JAX_SCRIPT = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import keras
import fused_xent.jax as fj
from fused_xent import losses as fl

reps, shapes = int(sys.argv[1]), json.loads(sys.argv[2])
HIDDEN = 32

def own(labels, z):
    return -jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), labels[:, None], axis=-1)[:, 0]

def step(loss):
    return jax.jit(jax.value_and_grad(lambda z, y: jnp.mean(loss(y, z))))

results = []
for n, c in shapes:
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(n, c)).astype(np.float32) * 3)
    y = jnp.asarray(rng.integers(0, c, size=n).astype(np.int32))
    variants = {
        "fused_xent.jax": step(fj.sparse_softmax_cross_entropy_with_logits),
        "jax log_softmax": step(own),
        "fused_xent.losses": step(lambda y, z: fl.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y, z)),
        "keras.losses": step(lambda y, z: keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y, z)),
    }
    times = {k: [] for k in variants}
    for fn in variants.values():
        jax.block_until_ready(fn(z, y))
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(z, y))
            times[name].append(time.perf_counter() - start)
    results.append({"shape": [n, c], "ms": {k: float(np.median(v) * 1e3) for k, v in times.items()}})

# The same losses where the logits are made in the program (z = h @ w, as in a model), so
# XLA may write the gradient over them.
def layer_step(loss):
    return jax.jit(jax.grad(lambda w, h, y: jnp.mean(loss(y, h @ w)), argnums=(0, 1)))

for n, c in shapes:
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(n, HIDDEN)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(HIDDEN, c)).astype(np.float32) * 0.3)
    y = jnp.asarray(rng.integers(0, c, size=n).astype(np.int32))
    variants = {
        "fused_xent.jax": layer_step(fj.sparse_softmax_cross_entropy_with_logits),
        "jax log_softmax": layer_step(own),
    }
    times = {k: [] for k in variants}
    for fn in variants.values():
        jax.block_until_ready(fn(w, h, y))
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(w, h, y))
            times[name].append(time.perf_counter() - start)
    results.append({"shape": [n, c], "in_layer": True,
                    "ms": {k: float(np.median(v) * 1e3) for k, v in times.items()}})
print("RESULT " + json.dumps(results))
"""

TORCH_SCRIPT = r"""
import json, sys, time
import numpy as np
import torch
import keras
import fused_xent.torch as ft
from fused_xent import losses as fl

reps, shapes = int(sys.argv[1]), json.loads(sys.argv[2])

def own(labels, z):
    return torch.nn.functional.cross_entropy(z, labels, reduction="none")

def run(loss, z, y):
    z = z.detach().requires_grad_(True)
    loss(y, z).mean().backward()
    return z.grad

results = []
for n, c in shapes:
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32) * 3)
    y = torch.from_numpy(rng.integers(0, c, size=n).astype(np.int64))
    variants = {
        "fused_xent.torch": ft.sparse_softmax_cross_entropy_with_logits,
        "torch cross_entropy": own,
        "fused_xent.losses": fl.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
        "keras.losses": keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
    }
    times = {k: [] for k in variants}
    for fn in variants.values():
        run(fn, z, y)
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            run(fn, z, y)
            times[name].append(time.perf_counter() - start)
    results.append({"shape": [n, c], "ms": {k: float(np.median(v) * 1e3) for k, v in times.items()}})
print("RESULT " + json.dumps(results))
"""

FRAMEWORKS = {  # name: (Keras backend, module that must import, script, ours, its own)
    "JAX": ("jax", "fused_xent.jax", JAX_SCRIPT, "fused_xent.jax", "jax log_softmax"),
    "PyTorch": ("torch", "fused_xent.torch", TORCH_SCRIPT, "fused_xent.torch", "torch cross_entropy"),
}


def run_framework(backend, module, script, reps):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        return None, probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "cannot import"
    done = subprocess.run(
        [sys.executable, "-c", script, str(reps), json.dumps(SHAPES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), None
    return None, (done.stderr.strip().splitlines() or ["no result"])[-1]


def table(name, results, ours, own):
    lines = [
        f"### {name}",
        "",
        f"| N×C | {ours} ms | {own} ms | ours vs {own} | fused_xent.losses ms | keras.losses ms | "
        "ours vs Keras's loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.get("in_layer"):
            continue
        ms = r["ms"]
        n, c = r["shape"]
        lines.append(
            f"| {n}×{c} | {ms[ours]:.2f} | {ms[own]:.2f} | {ms[own] / ms[ours]:.1f}× | "
            f"{ms['fused_xent.losses']:.2f} | {ms['keras.losses']:.2f} | "
            f"{ms['keras.losses'] / ms['fused_xent.losses']:.1f}× |"
        )
    layer = [r for r in results if r.get("in_layer")]
    if layer:
        lines += [
            "",
            "Logits made in the step (z = h @ w with H = 32, gradients to h and w):",
            "",
            f"| N×C | {ours} step ms | {own} step ms | ours vs {own} |",
            "| --- | --- | --- | --- |",
        ]
        for r in layer:
            ms, (n, c) = r["ms"], r["shape"]
            lines.append(f"| {n}×{c} | {ms[ours]:.2f} | {ms[own]:.2f} | {ms[own] / ms[ours]:.1f}× |")
    return "\n".join(lines) + "\n"


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = []
    for name in ("jax", "torch", "keras"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores; " + ", ".join(versions)


KEPT_BEGIN, KEPT_END = "<!-- bench_jax_step: kept by bench_backends.py -->", "<!-- /bench_jax_step -->"


def kept_section(path):
    """The section between KEPT_BEGIN and KEPT_END of the existing file (written from
    benchmarks/bench_jax_step.py's figures), so that rewriting the tables keeps it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    begin, end = text.find(KEPT_BEGIN), text.find(KEPT_END)
    return text[begin : end + len(KEPT_END)] + "\n" if 0 <= begin < end else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args()
    sections = []
    for name, (backend, module, script, ours, own) in FRAMEWORKS.items():
        results, why = run_framework(backend, module, script, args.reps)
        if results is None:
            print(f"{name}: skipped ({why})")
            continue
        sections.append(table(name, results, ours, own))
        print(sections[-1])
    if args.markdown and sections:
        kept = kept_section(args.markdown)
        with open(args.markdown, "w") as out:
            out.write(
                "Forward + backward of a mean sparse float32 loss on the CPU, median milliseconds of "
                'interleaved runs; "vs" columns are the other\'s time over ours. In JAX the backward '
                "writes the gradient to a buffer of its own (docs/xla.md#the-gradients-buffer).\n"
                f"Machine: {machine()}.\n"
                f"Command: `python benchmarks/bench_backends.py --reps {args.reps} --markdown {args.markdown}`\n\n"
            )
            out.write("\n".join(sections))
            if kept:
                out.write("\n" + kept)


if __name__ == "__main__":
    main()
