"""The fused JAX losses under sharding against the XLA-partitioned jax.numpy formula, on 8
virtual CPU devices: per layout, the elements one jit(value_and_grad) step moves between
devices (its collectives, read from the optimized HLO), its temporary bytes per device
(memory_analysis) and its median wall time.

    python benchmarks/bench_sharding.py [--rows 1024] [--classes 32000] [--rounds 5] [--markdown]

The last layout has one class more (32001 over 8: shards of 4001 columns, the last with 3994
valid). A jax.Array cannot be split so, so its step takes the logits (and dense labels) padded
to 32008 columns, evenly sharded, and cuts them to 32001 inside (each device keeps its own
columns: nothing moves); the loss then sees classes the shards do not divide.

The devices share this machine's cores, so the wall times compare the two programs, not a
real cluster. Run from the repository root (it reads the HLO with tests/_support)."""

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from tests._support.hlo_collectives import collectives  # noqa: E402

LAYOUTS = {  # name: (mesh shape, mesh axes, logits spec, classes more than --classes)
    "rows (8)": ((8,), ("data",), P("data", None), 0),
    "classes (8)": ((8,), ("model",), P(None, "model"), 0),
    "rows (4) x classes (2)": ((4, 2), ("data", "model"), P("data", "model"), 0),
    "classes (8), one class more (uneven)": ((8,), ("model",), P(None, "model"), 1),
}


def _cut(fn, classes, sharding, dense):
    """fn on the first `classes` columns of padded logits (and dense labels), split like them."""

    def cut(z, labels):
        z = jax.lax.with_sharding_constraint(z[:, :classes], sharding)
        if dense:
            labels = jax.lax.with_sharding_constraint(labels[:, :classes], sharding)
        return fn(z, labels)

    return cut


def _losses(labels_kind):
    if labels_kind == "sparse":
        ours = lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean()  # noqa: E731
        ref = lambda z, y: -jnp.take_along_axis(jax.nn.log_softmax(z, -1), y[:, None], -1).mean()  # noqa: E731
    else:
        ours = lambda z, t: fj.softmax_cross_entropy_with_logits(t, z).mean()  # noqa: E731
        ref = lambda z, t: -jnp.sum(t * jax.nn.log_softmax(z, -1), -1).mean()  # noqa: E731
    return {"fused_xent": ours, "jnp": ref}


def _measure(fn, z, labels, rounds):
    step = jax.jit(jax.value_and_grad(fn))
    compiled = step.lower(z, labels).compile()
    moved = sum(e for _, e in collectives(compiled.as_text()))
    gathers = max((e for op, e in collectives(compiled.as_text()) if op == "all-gather"), default=0)
    jax.block_until_ready(step(z, labels))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(step(z, labels))
        times.append(time.perf_counter() - start)
    return moved, gathers, compiled.memory_analysis().temp_size_in_bytes, statistics.median(times) * 1e3


def print_table(rows, markdown, width=22):
    """rows[0] is the header: a Markdown table, or aligned columns."""
    if markdown:
        print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    else:
        for r in rows:
            print("  ".join(f"{c:>{width}}" for c in r))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [("layout", "labels", "loss", "moved elements", "largest all-gather", "temp MiB/device", "step ms")]
    for layout, (shape, names, spec, more) in LAYOUTS.items():
        classes = args.classes + more
        padded = -(-classes // 8) * 8
        z = np.zeros((args.rows, padded), np.float32)
        z[:, :classes] = rng.standard_normal((args.rows, classes))
        y = rng.integers(0, classes, args.rows).astype(np.int32)
        t = np.zeros_like(z)
        t[:, :classes] = 1.0 / classes
        mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
        zs = jax.device_put(z, NamedSharding(mesh, spec))
        for kind in ("sparse", "dense"):
            labels = (
                jax.device_put(y, NamedSharding(mesh, P(spec[0])))
                if kind == "sparse"
                else jax.device_put(t, NamedSharding(mesh, spec))
            )
            for name, fn in _losses(kind).items():
                if more:
                    fn = _cut(fn, classes, NamedSharding(mesh, spec), kind == "dense")
                moved, gathered, temp, ms = _measure(fn, zs, labels, args.rounds)
                rows.append((layout, kind, name, str(moved), str(gathered), f"{temp / 2**20:.1f}", f"{ms:.1f}"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"{args.rows}x{args.classes} float32, jit(value_and_grad(mean loss)), 8 virtual CPU devices on "
        f"{os.cpu_count()} cores ({cpu}), JAX {jax.__version__}"
    )
    print_table(rows, args.markdown)


if __name__ == "__main__":
    main()
