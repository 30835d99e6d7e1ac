"""End to end on Keras's JAX backend: a language-model head, Input(H) -> Dense(C) logits ->
sparse cross-entropy from logits, trained with SGD, with fused_xent's loss against Keras's own
(keras.losses.SparseCategoricalCrossentropy(from_logits=True)), in float32 and under
keras.mixed_precision "mixed_bfloat16" (bfloat16 logits: ours reads them as they are, Keras's
loss computes in float32).

    python benchmarks/bench_keras_lm_head.py [--quick] [--json results.json]

The step is Keras's own train step, compiled as model.fit compiles it (jax.jit of
model.train_step, the state donated), run on data already on the device; its time is the
median over --steps steps after warm-up, each waited for. Each configuration runs in a
process of its own, so that the device's peak memory (memory_stats()["peak_bytes_in_use"],
on GPUs) is that configuration's alone; the compiled step's temporary bytes
(memory_analysis()) are reported too, on every device. Default shape 8192 tokens x 1024
hidden x 128256 classes (--quick: 256 x 64 x 4000, to check the script; no targets).
Targets, per policy: ours faster than Keras's and with a lower peak. Prints a table and one
line "RESULT {json}"; exits with status 1 when a target is missed (--no-check: never).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ["float32", "mixed_bfloat16"]
LOSSES = ["ours", "keras"]


def child(policy, loss_name, tokens, hidden, classes, steps):
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np

    from fused_xent import losses as fl

    assert keras.backend.backend() == "jax"
    keras.mixed_precision.set_global_policy(policy)
    loss = (
        fl.SparseCategoricalCrossentropy(from_logits=True)
        if loss_name == "ours"
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((hidden,)), keras.layers.Dense(classes)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=True)
    device = jax.devices()[0]
    rng = np.random.default_rng(0)
    x_host = rng.normal(size=(tokens, hidden)).astype(np.float32)
    y_host = rng.integers(0, classes, tokens).astype(np.int32)
    first_loss = float(model.train_on_batch(x_host[:8], y_host[:8]))  # builds model, optimizer, metrics
    x, y = jax.device_put(x_host, device), jax.device_put(y_host, device)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    started = time.perf_counter()
    step = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y, None)).compile()
    compile_s = time.perf_counter() - started
    text = step.as_text()
    memory = step.memory_analysis()
    times, losses = [], []
    for i in range(steps + 3):  # 3 warm-up steps
        start = time.perf_counter()
        logs, state = step(state, (x, y, None))
        jax.block_until_ready(state)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(logs["loss"]))
    stats = device.memory_stats() or {}
    return dict(
        policy=policy,
        loss=loss_name,
        device=device.device_kind,
        step_ms=statistics.median(times),
        step_ms_samples=[round(t, 3) for t in times],
        compile_s=compile_s,
        peak_bytes=stats.get("peak_bytes_in_use"),
        temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        fused_calls=text.count('custom_call_target="fused_xent_'),
        first_loss=first_loss,
        losses=[losses[0], losses[-1]],
    )


def run_child(args, policy, loss_name):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        policy,
        loss_name,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--classes",
        str(args.classes),
        "--steps",
        str(args.steps),
    ]
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return dict(
        policy=policy,
        loss=loss_name,
        error=f"exit status {process.returncode}: " + (process.stderr.strip().splitlines() or ["no output"])[-1][-500:],
    )


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, to check the script (no targets)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--json", help="write the JSON result here")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("POLICY", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    default = (256, 64, 4000) if args.quick else (8192, 1024, 128256)
    args.tokens, args.hidden, args.classes = (
        args.tokens or default[0],
        args.hidden or default[1],
        args.classes or default[2],
    )
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.tokens, args.hidden, args.classes, args.steps)))
        return 0
    if args.quick:
        args.steps = min(args.steps, 5)
    results = [run_child(args, policy, loss) for policy in POLICIES for loss in LOSSES]
    print(
        f"Keras (JAX backend) LM head {args.tokens} tokens x {args.hidden} hidden x {args.classes} classes, "
        f"SGD, median of {args.steps} steps"
    )
    print(f"{'policy':>15} {'loss':>6} {'step ms':>9} {'peak':>10} {'temp':>10} {'fused calls':>11} {'loss':>9}")
    by_key = {(r["policy"], r["loss"]): r for r in results}
    missed = []
    for r in results:
        if "error" in r:
            print(f"{r['policy']:>15} {r['loss']:>6} FAILED: {r['error']}")
            missed.append(f"{r['policy']} {r['loss']}: {r['error']}")
            continue
        print(
            f"{r['policy']:>15} {r['loss']:>6} {r['step_ms']:9.2f} {fmt_bytes(r['peak_bytes']):>10} "
            f"{fmt_bytes(r['temp_bytes']):>10} {r['fused_calls']:>11} {r['losses'][-1]:9.4f}"
        )
    for policy in POLICIES:
        ours, keras_ = by_key.get((policy, "ours")), by_key.get((policy, "keras"))
        if not ours or not keras_ or "error" in ours or "error" in keras_:
            continue
        if ours["fused_calls"] < 2:
            missed.append(f"{policy}: the step with our loss has no fused custom calls")
        if not ours["step_ms"] < keras_["step_ms"]:
            missed.append(
                f"{policy}: ours {ours['step_ms']:.2f} ms, not faster than Keras's {keras_['step_ms']:.2f} ms"
            )
        peak_ours, peak_keras = ours["peak_bytes"], keras_["peak_bytes"]
        if peak_ours is not None and peak_keras is not None and not peak_ours < peak_keras:
            missed.append(f"{policy}: ours peaks at {fmt_bytes(peak_ours)}, not below Keras's {fmt_bytes(peak_keras)}")
        if peak_ours is None:
            missed.append(f"{policy}: no memory_stats() on this device (peak not compared)")
    checked = not args.quick
    for line in missed:
        print(("MISSED: " if checked else "(not checked) ") + line)
    result = dict(
        shape=[args.tokens, args.hidden, args.classes],
        steps=args.steps,
        results=results,
        targets_checked=checked,
        missed=missed if checked else [],
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
    )
    print("RESULT " + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if (missed and checked and not args.no_check) else 0


if __name__ == "__main__":
    sys.exit(main())
