"""A word-level language model on the Python standard library's own sources,
trained with model.fit twice from the same initial weights: once with a Dense
output layer + keras.losses.SparseCategoricalCrossentropy, once with
fused_xent.layers.LinearCrossEntropy, which never builds the batch's
tokens x vocabulary logits. Prints both loss curves' largest gap and a table of
peak memory and step time, and draws them (--out).

    python examples/language_model.py                      # about 1-2 minutes on 2 cores
    python examples/language_model.py --steps 400 --epochs 3 --vocab 32000 --out lm.png
"""

import argparse
import collections
import os
import pathlib
import re
import sys
import time

# Freed memory leaves the RSS, so that the peaks below follow the tensors alive.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "true")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
os.environ.setdefault("FUSED_XENT_BUFFER_CACHE_MB", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

WORD = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


def stdlib_tokens(limit):
    """Words, numbers and punctuation of the standard library's .py files, in a fixed order."""
    root = pathlib.Path(os.__file__).parent
    tokens = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        try:
            tokens.extend(WORD.findall(path.read_text(encoding="utf-8", errors="ignore")))
        except OSError:
            continue
        if len(tokens) >= limit:
            break
    return tokens[:limit]


def encode(tokens, vocab):
    counts = collections.Counter(tokens)
    words = ["<unk>"] + [w for w, _ in counts.most_common(vocab - 1)]
    index = {w: i for i, w in enumerate(words)}
    return np.array([index.get(t, 0) for t in tokens], np.int32), len(words)


def windows(ids, length, count):
    starts = np.arange(count) * length
    x = np.stack([ids[s : s + length] for s in starts])
    y = np.stack([ids[s + 1 : s + length + 1] for s in starts])
    return x, y


def body(keras, vocab, dim, length):
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, dim)(tokens)
    x = keras.layers.GRU(dim, return_sequences=True)(x)
    return tokens, keras.layers.Dense(dim, activation="tanh")(x)


def keras_model(keras, vocab, dim, length):
    tokens, hidden = body(keras, vocab, dim, length)
    model = keras.Model(tokens, keras.layers.Dense(vocab, use_bias=False, name="head")(hidden))
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fused_model(keras, vocab, dim, length):
    from fused_xent.layers import LinearCrossEntropy

    tokens, hidden = body(keras, vocab, dim, length)
    labels = keras.Input((length,), dtype="int32", name="labels")
    loss = LinearCrossEntropy(vocab, name="head")(hidden, labels)  # adds its mean to the model's losses
    model = keras.Model([tokens, labels], loss)
    model.compile(keras.optimizers.Adam(2e-3))  # no Keras loss: the head's added loss is the loss
    return model


def rss_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def train(name, make, keras, x, y, args):
    keras.utils.set_random_seed(0)  # the same initial weights for both runs
    model = make(keras, args.vocab_size, args.dim, args.length)
    inputs = x if name == "keras" else [x, y]
    targets = y if name == "keras" else None

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses, self.times, self.peak = [], [], 0.0

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1 and not self.times:  # after the first step (tracing): measure from here
                self.base = rss_mb("VmRSS")
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))
            if batch >= 1 or self.times:
                self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, logs=None):
            self.peak = rss_mb("VmHWM") - self.base

    recorder = Recorder()
    print(f"--- {name}", flush=True)
    model.fit(
        inputs,
        targets,
        batch_size=args.batch,
        epochs=args.epochs,
        shuffle=False,
        callbacks=[recorder],
        verbose=args.verbose,
    )
    return recorder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--verbose", type=int, default=1, help="Keras's progress output (0, 1 or 2)")
    parser.add_argument("--out", help="PNG of the loss curves, peak memory and step time")
    args = parser.parse_args()

    import keras

    import fused_xent  # noqa: F401

    sequences = args.steps * args.batch
    ids, args.vocab_size = encode(stdlib_tokens(sequences * args.length + 1 + 200_000), args.vocab_size)
    x, y = windows(ids, args.length, sequences)
    tokens = args.batch * args.length
    print(
        f"{len(ids)} tokens of the standard library, vocabulary {args.vocab_size}; "
        f"{tokens} tokens per step: the logits of a step are {tokens * args.vocab_size * 4 / 1e6:.0f} MB"
    )

    runs = {
        name: train(name, make, keras, x, y, args)
        for name, make in (("keras", keras_model), ("fused_xent", fused_model))
    }
    gap = max(abs(a - b) for a, b in zip(runs["keras"].losses, runs["fused_xent"].losses))
    print(f"largest difference between the two training-loss curves: {gap:.2e}")
    print(f"final training loss: keras {runs['keras'].losses[-1]:.4f}, fused_xent {runs['fused_xent'].losses[-1]:.4f}")
    print("\n| output layer + loss | peak RSS above the first step's (MB) | step time, median (ms) |")
    print("| --- | ---: | ---: |")
    for name, label in (("keras", "Dense + SparseCategoricalCrossentropy"), ("fused_xent", "LinearCrossEntropy")):
        r = runs[name]
        print(f"| {label} | {r.peak:.0f} | {1e3 * float(np.median(r.times)):.0f} |")
    if args.out:
        plot(runs, args.out)
        print(f"wrote {args.out}")


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, memory, speed) = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2, 1, 1]})
    for name, style in (("keras", "-"), ("fused_xent", "--")):
        curve.plot(runs[name].losses, style, label=name)
    curve.set_xlabel("step")
    curve.set_ylabel("training loss (running mean)")
    curve.legend()
    names = list(runs)
    memory.bar(names, [runs[n].peak for n in names], color=["C0", "C1"])
    memory.set_ylabel("peak RSS above first step (MB)")
    speed.bar(names, [1e3 * float(np.median(runs[n].times)) for n in names], color=["C0", "C1"])
    speed.set_ylabel("step time, median (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
