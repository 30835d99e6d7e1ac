"""The JAX training step of the fused loss: jax.jit(jax.grad(loss)) with the logits as a
jit parameter that is NOT donated (the caller keeps them), against the memory floor
(GPU) or against the other ways to place the gradient (CPU).

    python benchmarks/bench_jax_step.py --cpu [--quick]   # CPU: the aliasing study, 2048x32000 float32
    python benchmarks/bench_jax_step.py [--quick]         # GPU: step time against the copy floor

Prints a table and one line "RESULT {json}"; --json writes the same JSON to a file. Exits
with status 1 when a target below is missed (--no-check: never).

CPU (--cpu), docs/xla.md#the-gradients-buffer: each variant is timed once per round, the
rounds interleaved, and the medians compared:
  fresh           the default: the gradient in a buffer of its own, logits not donated
  fresh, no THP   the same with the CPU handler's huge-page hint off (FUSED_XENT_HUGE_PAGES=0)
  fresh, donated  the default, logits donated (XLA then writes the result over them via a copy)
  aliased         the old lowering, gradient over the logits (FUSED_XENT_JAX_ALIAS_GRADIENT=1):
                  XLA copies the logits first
  aliased, donated  the old lowering with the logits donated: written in place, no copy
  jnp formula     jax.nn.log_softmax and take_along_axis, jit(grad)
Targets: "fresh" within 1.25x of the fastest donated variant and at least 4x faster than the
jnp formula.

GPU: per shape and dtype, the sparse loss's step (forward, mean, backward) timed as device
time: a jax.lax.fori_loop of K steps inside one jit (labels shifted each step, so nothing is
hoisted; the logits a loop-invariant parameter, so an aliased gradient would be copied each
step), divided by K. The floor is 3 * N * C * bytes / B (the forward reads the logits, the
backward reads them and writes the gradient; B the device-to-device copy bandwidth measured
here with a jnp copy, bytes read plus written). Also reported, not checked: the wall time of
one jit(grad) call in a stream of calls, and a forward-only program. Targets: >= 85% of the
floor at 8192x32000 and 4096x128256, >= 50% at 8x262144, float32 and bfloat16.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

GPU_SHAPES = [(8192, 32000), (4096, 128256), (8, 262144)]
GPU_TARGETS = {(8192, 32000): 0.85, (4096, 128256): 0.85, (8, 262144): 0.50}
GPU_DTYPES = ["float32", "bfloat16"]
QUICK_GPU_SHAPES = [(256, 4000), (4, 40000)]  # --quick: tiny, to check the script (no targets)
CPU_SHAPE = (2048, 32000)
QUICK_CPU_SHAPE = (256, 8000)
CPU_TARGET_DONATED = 1.25
CPU_TARGET_JNP = 4.0


def _jax():
    import jax
    import jax.numpy as jnp

    import fused_xent.jax as fj

    return jax, jnp, fj


def fused_mean(fj, y):
    return lambda z: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean()


def jnp_mean(jax, jnp, y):
    return lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z.astype(jnp.float32)), y[:, None], 1).mean()


def compiled(jax, make_fn, z, donate=False, alias=False):
    """make_fn() compiled for z, traced with the gradient aliased to the logits or not. A new
    function each time: JAX caches a function's trace, which would keep the first aliasing."""
    old = os.environ.get("FUSED_XENT_JAX_ALIAS_GRADIENT")
    os.environ["FUSED_XENT_JAX_ALIAS_GRADIENT"] = "1" if alias else "0"
    try:
        return jax.jit(make_fn(), donate_argnums=(0,) if donate else ()).lower(z).compile()
    finally:
        if old is None:
            del os.environ["FUSED_XENT_JAX_ALIAS_GRADIENT"]
        else:
            os.environ["FUSED_XENT_JAX_ALIAS_GRADIENT"] = old


def cpu_study(shape, rounds):
    jax, jnp, fj = _jax()
    rows, classes = shape
    rng = np.random.default_rng(0)
    z = jnp.asarray((rng.normal(size=shape) * 3).astype(np.float32))
    y = jnp.asarray(rng.integers(0, classes, rows).astype(np.int32))

    def grad_fused():
        return jax.grad(fused_mean(fj, y))

    variants = {
        "fresh": (compiled(jax, grad_fused, z), False, None),
        "fresh, no THP": (compiled(jax, grad_fused, z), False, "0"),
        "fresh, donated": (compiled(jax, grad_fused, z, donate=True), True, None),
        "aliased": (compiled(jax, grad_fused, z, alias=True), False, None),
        "aliased, donated": (compiled(jax, grad_fused, z, donate=True, alias=True), True, None),
        "jnp formula": (compiled(jax, lambda: jax.grad(jnp_mean(jax, jnp, y)), z), False, None),
    }
    for name, (fn, _, _) in variants.items():  # what each variant compiled to
        copies = copies_in(fn.as_text(), rows, classes)
        print(f"  {name}: {copies} logits-sized copies in the optimized HLO")
    times = {name: [] for name in variants}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (fn, donate, huge_pages) in variants.items():
            arg = (z + 0).block_until_ready() if donate else z
            if huge_pages is not None:
                os.environ["FUSED_XENT_HUGE_PAGES"] = huge_pages
            start = time.perf_counter()
            out = fn(arg)
            out.block_until_ready()
            elapsed = time.perf_counter() - start
            os.environ.pop("FUSED_XENT_HUGE_PAGES", None)
            del out, arg
            times[name].append(elapsed * 1e3)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    donated = min(medians["fresh, donated"], medians["aliased, donated"])
    result = dict(
        mode="cpu",
        shape=list(shape),
        dtype="float32",
        rounds=rounds,
        median_ms=medians,
        samples_ms={name: [round(t, 2) for t in ts[1:]] for name, ts in times.items()},
        fresh_over_donated=medians["fresh"] / donated,
        jnp_over_fresh=medians["jnp formula"] / medians["fresh"],
        cpu=cpu_name(),
        threads=os.cpu_count(),
    )
    print(
        f"jit(grad) of the mean sparse loss, {rows}x{classes} float32, {cpu_name()}, "
        f"median of {rounds} interleaved rounds"
    )
    print(f"{'variant':>18} {'median ms':>10} {'/ fresh':>8}")
    for name, ms in medians.items():
        print(f"{name:>18} {ms:10.1f} {ms / medians['fresh']:8.2f}")
    missed = []
    if result["fresh_over_donated"] > CPU_TARGET_DONATED:
        missed.append(f"fresh is {result['fresh_over_donated']:.2f}x the donated step (target <= {CPU_TARGET_DONATED})")
    if result["jnp_over_fresh"] < CPU_TARGET_JNP:
        missed.append(f"the jnp formula is only {result['jnp_over_fresh']:.2f}x fresh (target >= {CPU_TARGET_JNP})")
    return result, missed


def copies_in(hlo_text, rows, classes):
    import re

    pattern = re.compile(rf"= f32\[{rows},{classes}\]\S* (copy|copy-start)\(")
    return sum(1 for line in hlo_text.splitlines() if pattern.search(line))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def copy_bandwidth(jax, jnp, device):
    """Device-to-device copy bandwidth in bytes per second (bytes read plus written)."""
    x = jax.device_put(jnp.zeros((1 << 28,), jnp.float32), device)  # 1 GiB
    copy = jax.jit(lambda a: a + 1.0)
    ms = time_calls(lambda: copy(x), calls=10, rounds=5)
    return 2 * x.nbytes / (ms * 1e-3)


def time_calls(fn, calls, rounds):
    """Median over `rounds` of the wall time per call of `calls` calls issued back to back
    (asynchronous dispatch: the host runs ahead of the device), in milliseconds."""
    out = fn()
    out.block_until_ready()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        out.block_until_ready()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def gpu_study(shapes, dtypes, steps, rounds, device_kind):
    jax, jnp, fj = _jax()
    device = jax.devices(device_kind)[0]
    bandwidth = copy_bandwidth(jax, jnp, device)
    print(f"device: {device.device_kind}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print(
        f"{'dtype':>9} {'N':>6} {'C':>7} {'floor ms':>9} {'step ms':>9} {'of floor':>8} {'call ms':>9} "
        f"{'fwd ms':>8} {'fwd of floor':>12}"
    )
    rows_out, missed = [], []
    for dtype in dtypes:
        for rows, classes in shapes:
            rng = np.random.default_rng(0)
            z = jax.device_put(jnp.asarray(rng.normal(size=(rows, classes)).astype(np.float32) * 3, dtype), device)
            y = jax.device_put(jnp.asarray(rng.integers(0, classes, rows).astype(np.int32)), device)
            itemsize = jnp.dtype(dtype).itemsize
            floor_ms = 3 * rows * classes * itemsize / bandwidth * 1e3

            def loop(z, y):
                def body(i, acc):
                    g = jax.grad(lambda z: fj.sparse_softmax_cross_entropy_with_logits((y + i) % classes, z).mean())(z)
                    return acc + g[i % rows, 0].astype(jnp.float32)

                return jax.lax.fori_loop(0, steps, body, jnp.float32(0))

            looped = jax.jit(loop)
            step_ms = time_calls(lambda: looped(z, y), calls=1, rounds=rounds) / steps
            grad = jax.jit(jax.grad(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean()))
            call_ms = time_calls(lambda: grad(z, y), calls=20, rounds=rounds)
            forward = jax.jit(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean())
            forward_ms = time_calls(lambda: forward(z, y), calls=20, rounds=rounds)
            forward_floor_ms = floor_ms / 3
            row = dict(
                dtype=dtype,
                N=rows,
                C=classes,
                floor_ms=floor_ms,
                step_ms=step_ms,
                fraction_of_floor=floor_ms / step_ms,
                call_ms=call_ms,
                forward_ms=forward_ms,
                forward_fraction_of_floor=forward_floor_ms / forward_ms,
            )
            rows_out.append(row)
            print(
                f"{dtype:>9} {rows:>6} {classes:>7} {floor_ms:9.3f} {step_ms:9.3f} {floor_ms / step_ms:8.0%} "
                f"{call_ms:9.3f} {forward_ms:8.3f} {forward_floor_ms / forward_ms:12.0%}",
                flush=True,
            )
            target = GPU_TARGETS.get((rows, classes))
            if target is not None and row["fraction_of_floor"] < target:
                missed.append(
                    f"{dtype} {rows}x{classes}: jit(grad) step at {row['fraction_of_floor']:.0%} of the "
                    f"floor (target >= {target:.0%})"
                )
            z = None  # frees the logits before the next shape
    result = dict(mode="gpu", device=device.device_kind, copy_bandwidth=bandwidth, steps=steps, results=rows_out)
    return result, missed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU aliasing study (default where JAX has no GPU)")
    parser.add_argument(
        "--gpu-mode-on-cpu",
        action="store_true",
        help="run the GPU study's code on the CPU device (to check the script; no targets)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (no targets)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="GPU: steps per timed loop")
    parser.add_argument("--json", help="write the JSON result here")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even when a target is missed")
    args = parser.parse_args()
    import jax

    from fused_xent import _core

    if not _core.ffi_targets().get("cpu"):
        print("bench_jax_step: this build has no XLA FFI handlers; skipped")
        return 0
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    if args.cpu or (not has_gpu and not args.gpu_mode_on_cpu):
        result, missed = cpu_study(
            QUICK_CPU_SHAPE if args.quick else CPU_SHAPE, args.rounds or (3 if args.quick else 9)
        )
    else:
        shapes = QUICK_GPU_SHAPES if args.quick else GPU_SHAPES
        result, missed = gpu_study(
            shapes,
            GPU_DTYPES,
            args.steps if not args.quick else 3,
            args.rounds or 5,
            "gpu" if has_gpu and not args.gpu_mode_on_cpu else "cpu",
        )
    checked = not (args.quick or args.gpu_mode_on_cpu)
    result.update(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        targets_checked=checked,
        missed=missed if checked else [],
        jax=jax.__version__,
    )
    for line in missed:
        print(("MISSED: " if checked else "(not checked) ") + line)
    print("RESULT " + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if (missed and checked and not args.no_check) else 0


if __name__ == "__main__":
    sys.exit(main())
