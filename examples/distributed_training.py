"""Multi-worker data-parallel training with fused_xent's Keras loss.

Starts `--workers` worker processes on 127.0.0.1, each with its own TF_CONFIG,
which train one Keras model together with tf.distribute.MultiWorkerMirroredStrategy
on scikit-learn's bundled digits data (no download). The loss is
fused_xent.losses.SparseCategoricalCrossentropy: inside the strategy it divides
its mean by the number of replicas (as Keras's losses do, from Keras 3.8 on:
this script needs it) and the Keras optimizer sums the gradients over the
workers, so every worker ends with the same weights, which this script checks. Keras 3's model.fit fails under this
strategy whatever the loss (keras-team/keras#20585), so the workers run the
equivalent custom loop. On real hosts, run the worker part (`--worker`) on each
host with TF_CONFIG naming all of them.

    python examples/distributed_training.py [--workers 2] [--epochs 3] [--timeout 300]

Exits with status 0 when every worker finished in time and all agree.
`--single-process` trains the same model on the same global batches in this
process alone (no strategy), the result the workers should reproduce;
`--save-weights FILE.npz` writes the trained weights (worker 0's), to compare.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

RESULT_PREFIX = "RESULT "


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="number of local worker processes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (all workers)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the workers are stopped")
    parser.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="sgd (learning rate 0.1) makes a wrongly scaled loss show in the weights",
    )
    parser.add_argument("--save-weights", metavar="FILE", help="write the trained weights to this .npz file")
    parser.add_argument(
        "--single-process",
        action="store_true",
        help="train on the same global batches in this process alone, without workers",
    )
    parser.add_argument("--worker", action="store_true", help="run as one worker (TF_CONFIG must be set)")
    return parser.parse_args()


# ---------------------------------------------------------------- one worker


def run_worker(args):
    # A worker whose peer died waits for it forever: bound it even if the launcher is gone.
    watchdog = threading.Timer(args.timeout, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # the workers share this machine's cores
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import fused_xent

    if args.single_process:  # the default strategy: one replica, the same code below
        strategy, index = tf.distribute.get_strategy(), 0
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; waits for all workers
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int64")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)  # equal shares: the mean of means is the global mean
        .with_options(options)
    )

    keras.utils.set_random_seed(0)  # same initial weights on every worker
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
        )
        optimizer = keras.optimizers.Adam(3e-3) if args.optimizer == "adam" else keras.optimizers.SGD(0.1)
        # Inside strategy.run it divides its mean by the number of replicas, as Keras's losses do.
        loss_fn = fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))  # sums them over replicas
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
        return loss, correct

    @tf.function
    def train_step(batch):
        loss, correct = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", correct, axis=None)

    # model.fit's loop, written out (model.fit fails under this strategy, see above).
    distributed = strategy.experimental_distribute_dataset(dataset)
    losses = []
    for epoch in range(args.epochs):
        started, total_loss, total_correct, steps = time.monotonic(), 0.0, 0.0, 0
        for batch in distributed:
            loss, correct = train_step(batch)
            total_loss, total_correct, steps = total_loss + float(loss), total_correct + float(correct), steps + 1
        losses.append(total_loss / steps)
        accuracy = total_correct / (steps * args.batch_size)
        if index == 0:
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.4f}, accuracy {accuracy:.3f}, "
                f"{time.monotonic() - started:.1f} s",
                flush=True,
            )
    result = {
        "worker": index,
        "replicas": strategy.num_replicas_in_sync,
        "loss": losses,
        "accuracy": accuracy,
        "weights_checksum": float(sum(abs(w).sum() for w in model.get_weights())),
    }
    if args.save_weights and index == 0:
        np.savez(args.save_weights, *model.get_weights())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the launcher


def free_ports(count):
    """Ports free now (held together so that they differ), for the workers to bind."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(args):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(args.workers)]}
    workers = []
    for index in range(args.workers):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--timeout",
            str(args.timeout),
            "--optimizer",
            args.optimizer,
        ]
        if args.save_weights:
            command += ["--save-weights", os.path.abspath(args.save_weights)]
        workers.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )  # its own process group, to stop it with its threads
        )
    return workers


def wait_for(workers, timeout):
    """Each worker's (exit status, output); status None for one stopped at the deadline."""
    deadline = time.monotonic() + timeout
    outcomes = []
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=max(0.0, deadline - time.monotonic()))
            outcomes.append((worker.returncode, output))
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            output, _ = worker.communicate()
            outcomes.append((None, output))
    return outcomes


def result_of(output):
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


def report(outcomes, timeout):
    results, ok = [], True
    for index, (status, output) in enumerate(outcomes):
        result = result_of(output)
        if status != 0 or result is None:
            why = f"stopped after {timeout:.0f} s" if status is None else f"exit status {status}"
            print(f"worker {index} failed ({why}); the end of its output:\n{output[-3000:]}")
            ok = False
        results.append(result)
    if not ok:
        return False
    print("\n".join(line for line in outcomes[0][1].splitlines() if line.startswith("epoch ")))  # worker 0's progress
    for result in results:
        losses = ", ".join(f"{value:.4f}" for value in result["loss"])
        print(
            f"worker {result['worker']}: {result['replicas']} replicas, loss per epoch [{losses}], "
            f"accuracy {result['accuracy']:.3f}, weights checksum {result['weights_checksum']:.6f}"
        )
    checksums = [result["weights_checksum"] for result in results]
    if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
        print("workers disagree: their weights differ")
        return False
    print(f"all {len(results)} workers agree on the trained weights")
    return True


def main():
    args = parse_args()
    if args.worker or args.single_process:
        run_worker(args)
        return 0
    started = time.monotonic()
    outcomes = wait_for(start_workers(args), args.timeout)
    ok = report(outcomes, args.timeout)
    print(f"{'done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
