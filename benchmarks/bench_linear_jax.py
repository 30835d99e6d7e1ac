"""fused_xent.jax.linear_cross_entropy against the jax.numpy head (matmul, log_softmax) in a
jit(value_and_grad(mean loss)) training step: median step time and XLA's temporary bytes
(memory_analysis) on one device, and per sharded layout on 8 virtual CPU devices the
elements one step moves between devices (tests/_support/hlo_collectives.py: loops counted
by their trip counts), the temporaries per device and the step time.

    python benchmarks/bench_linear_jax.py [--n 4096] [--h 256] [--v 32000] [--dtype float32]
        [--sharded-n 2048] [--rounds 5] [--markdown]

The virtual devices share this machine's cores: their times compare the two programs, not a
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
from bench_sharding import print_table  # noqa: E402  (this script's folder is sys.path[0])
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from tests._support.hlo_collectives import moved_per_step  # noqa: E402

LAYOUTS = {  # name: (mesh shape, mesh axes, hidden spec, weight spec)
    "rows (8)": ((8,), ("data",), P("data", None), P()),
    "classes (8)": ((8,), ("model",), P(), P(None, "model")),
    "rows (4) x classes (2)": ((4, 2), ("data", "model"), P("data", None), P(None, "model")),
}


def _heads():
    def ours(h, w, y):
        return fj.linear_cross_entropy(h, w, y).mean()

    def jnp_head(h, w, y):
        z = (h @ w).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])

    return {"fused_xent": ours, "jnp": jnp_head}


def _measure(fn, args, rounds):
    step = jax.jit(jax.value_and_grad(fn, (0, 1)))
    compiled = step.lower(*args).compile()
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    temp = compiled.memory_analysis().temp_size_in_bytes
    return moved_per_step(compiled.as_text()), temp, statistics.median(times) * 1e3


def _data(n, h, v, dtype):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, h)), dtype)
    weight = jnp.asarray(rng.standard_normal((h, v)) / np.sqrt(h), dtype)
    return hidden, weight, jnp.asarray(rng.integers(0, v, n), jnp.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=256)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--sharded-n", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    itemsize = jnp.dtype(args.dtype).itemsize
    rows = [("layout", "head", "moved elements", "temp MiB/device", "temp / logits per device", "step ms")]
    single = jax.devices()[0]
    data = [jax.device_put(x, single) for x in _data(args.n, args.h, args.v, args.dtype)]
    for name, fn in _heads().items():
        _, temp, ms = _measure(fn, data, args.rounds)
        ratio = temp / (args.n * args.v * itemsize)
        rows.append(("one device", name, "0", f"{temp / 2**20:.1f}", f"{ratio:.2f}", f"{ms:.1f}"))
    hidden, weight, labels = _data(args.sharded_n, args.h, args.v, args.dtype)
    for layout, (shape, names, hidden_spec, weight_spec) in LAYOUTS.items():
        mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
        placed = [
            jax.device_put(hidden, NamedSharding(mesh, hidden_spec)),
            jax.device_put(weight, NamedSharding(mesh, weight_spec)),
            jax.device_put(labels, NamedSharding(mesh, P(hidden_spec[0] if len(hidden_spec) else None))),
        ]
        logits = placed[0].addressable_shards[0].data.shape[0] * placed[1].addressable_shards[0].data.shape[1]
        for name, fn in _heads().items():
            moved, temp, ms = _measure(fn, placed, args.rounds)
            ratio = temp / (logits * itemsize)
            rows.append((layout, name, str(moved), f"{temp / 2**20:.1f}", f"{ratio:.2f}", f"{ms:.1f}"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"hidden {args.n}x{args.h} (sharded: {args.sharded_n}x{args.h}), weight {args.h}x{args.v}, {args.dtype}, "
        f"jit(value_and_grad(mean loss)) to hidden and weight; {os.cpu_count()} cores ({cpu}), JAX {jax.__version__}"
    )
    print_table(rows, args.markdown, width=24)


if __name__ == "__main__":
    main()
