"""Train a Keras MLP on scikit-learn's digits with fused_xent's loss, then with Keras's.

The digits data ship with scikit-learn (no download). Both runs start from the
same seed, so their loss curves should lie on top of each other; the script
prints each run's test accuracy and time per epoch and saves both loss curves
to a PNG.

    python examples/train_digits.py [--epochs 25] [--out digits_loss.png]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import fused_xent  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits_loss.png", help="where to save the plot of the loss curves")
    return parser.parse_args()


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # pixel intensities are 0..16
    return train_test_split(x, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)


def build_model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),  # logits: the losses take from_logits=True
        ]
    )


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)


def train(name, loss, data, args):
    x_train, x_test, y_train, y_test = data
    print(f"\n=== {name} ===")
    keras.utils.set_random_seed(args.seed)  # same initial weights and batches for both losses
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    timer = EpochTimer()
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_test, y_test),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[timer],
        verbose=1,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    steady = timer.seconds[1:] or timer.seconds  # the first epoch also traces the graphs
    return {
        "name": name,
        "history": history.history,
        "accuracy": accuracy,
        "first_epoch_s": timer.seconds[0],
        "epoch_s": sum(steady) / len(steady),
    }


def plot(runs, path):
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run, style in zip(runs, ["-", "--"]):
        epochs = range(1, len(run["history"]["loss"]) + 1)
        axes.plot(epochs, run["history"]["loss"], style, label=f"{run['name']}: training")
        axes.plot(epochs, run["history"]["val_loss"], style, label=f"{run['name']}: test", alpha=0.6)
    axes.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="Digits MLP: fused_xent vs Keras loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    args = parse_args()
    data = load_data(args.seed)
    runs = [
        train("fused_xent", fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True), data, args),
        train("keras", keras.losses.SparseCategoricalCrossentropy(from_logits=True), data, args),
    ]
    print(f"\n{'loss':<12}{'test accuracy':>15}{'final loss':>12}{'s/epoch':>10}{'1st epoch s':>13}")
    for run in runs:
        print(
            f"{run['name']:<12}{run['accuracy']:>15.4f}{run['history']['loss'][-1]:>12.5f}"
            f"{run['epoch_s']:>10.3f}{run['first_epoch_s']:>13.2f}"
        )
    gap = max(abs(a - b) for a, b in zip(runs[0]["history"]["loss"], runs[1]["history"]["loss"]))
    print(f"largest difference between the two training-loss curves: {gap:.2e}")
    plot(runs, args.out)
    print(f"loss curves saved to {args.out}")


if __name__ == "__main__":
    main()
