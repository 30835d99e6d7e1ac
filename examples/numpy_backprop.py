"""Backpropagation through softmax + cross-entropy, by hand, in NumPy.

A two-layer network (sigmoid hidden layer, softmax output) trained with the
three steps of the question in docs/derivation.md:

  1. output error        dE/dz_j = sigma_j - t_j       (from fused_xent.numpy)
  2. output-layer update  W2 -= r * h^T dE/dz
  3. hidden-layer update  W1 -= r * x^T ((dE/dz W2^T) * h (1 - h))

and three measurements:

  (a) finite differences confirm sigma - t and reject the chain rule that keeps
      only the diagonal of the softmax Jacobian;
  (b) mini-batch training on scikit-learn's bundled digits learns;
  (c) per-sample updates with an oversized learning rate reproduce the
      question's symptom (the prediction is whatever label was trained last);
      a sane learning rate or mini-batches do not.

Run:  python examples/numpy_backprop.py [--out numpy_backprop.png]
Needs numpy, scikit-learn and matplotlib; TensorFlow is not used.
"""

import argparse
import sys
import time

import numpy as np

from fused_xent import numpy as fx

SEED = 0
HIDDEN_UNITS = 32
FD_STEP = 1e-5
FD_TOLERANCE = 1e-6

RATE = 5.0  # one learning rate for both runs of the symptom's contrast
BATCH_SIZE = 32
BATCH_EPOCHS = 40
SMALL_RATE = 0.1  # a sane rate for per-sample updates
PER_SAMPLE_EPOCHS = 1


# ---------------------------------------------------------------- the network


def sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # tanh form: no overflow for large |a|


def softmax(z):
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def init_params(inputs, hidden, classes, rng):
    return {
        "W1": rng.normal(0.0, 1.0 / np.sqrt(inputs), (inputs, hidden)),
        "b1": np.zeros(hidden),
        "W2": rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, classes)),
        "b2": np.zeros(classes),
    }


def forward(params, x):
    h = sigmoid(x @ params["W1"] + params["b1"])
    z = h @ params["W2"] + params["b2"]
    return h, z


def predict(params, x):
    return forward(params, x)[1].argmax(axis=1)


def accuracy(params, x, y):
    return float(np.mean(predict(params, x) == y))


def output_error(labels, logits):
    """Step 1: dE/dz of E = mean cross-entropy over the batch, by the fused kernel."""
    _, grad = fx.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=1.0 / len(labels))
    return grad


def diagonal_only_output_error(labels, logits):
    """Step 1 as the question first wrote it: dE/do_j * do_j/dz_j, Jacobian diagonal only.

    dE/do_j = -t_j / o_j and do_j/dz_j = o_j (1 - o_j), so this is -t_j (1 - o_j):
    right for the target column, zero for every other column.
    """
    o = softmax(logits)
    t = np.eye(logits.shape[1])[labels]
    return -t * (1.0 - o) / len(labels)


def backprop(params, x, y, step1=output_error):
    """Steps 1-3: gradients of the mean loss for every parameter (no update yet)."""
    h, z = forward(params, x)
    dz = step1(y, z)  # step 1
    grads = {"W2": h.T @ dz, "b2": dz.sum(axis=0)}  # step 2 uses o_i = h_i
    dh = (dz @ params["W2"].T) * h * (1.0 - h)  # step 3: sum_k E_k w'_jk, old W2
    grads["W1"] = x.T @ dh
    grads["b1"] = dh.sum(axis=0)
    return grads


def sgd_step(params, grads, rate):
    for name, grad in grads.items():
        params[name] -= rate * grad


def mean_loss(params, x, y):
    loss, _ = fx.sparse_softmax_cross_entropy_with_logits(y, forward(params, x)[1], compute_gradient=False)
    return float(loss.mean())


# ---------------------------------------------------- (a) finite differences


def central_difference(f, x, step=FD_STEP):
    """d f / d x for every entry of x by (f(x + h) - f(x - h)) / 2h."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + step
        upper = f()
        x[index] = saved - step
        lower = f()
        x[index] = saved
        grad[index] = (upper - lower) / (2.0 * step)
    return grad


def full_jacobian_chain(labels, logits):
    """dE/dz = J^T dE/do with the whole softmax Jacobian J = diag(o) - o o^T."""
    o = softmax(logits)
    t = np.eye(logits.shape[1])[labels]
    de_do = -t / o
    jacobian = o[:, :, None] * np.eye(o.shape[1]) - o[:, :, None] * o[:, None, :]
    return np.einsum("bij,bi->bj", jacobian, de_do)


def logits_gradient_errors(rng):
    """Max |analytic - finite difference| of dE/dz, E = sum of the rows' losses."""
    labels = rng.integers(0, 10, size=6)
    logits = rng.normal(0.0, 2.0, size=(6, 10))

    def total_loss():
        loss, _ = fx.sparse_softmax_cross_entropy_with_logits(labels, logits, compute_gradient=False)
        return loss.sum()

    numeric = central_difference(total_loss, logits)
    _, fused = fx.sparse_softmax_cross_entropy_with_logits(labels, logits)
    candidates = {
        "sigma - t (fused_xent.numpy)": fused,
        "sigma - t (plain NumPy)": softmax(logits) - np.eye(10)[labels],
        "full Jacobian chain rule": full_jacobian_chain(labels, logits),
        "diagonal-only chain rule": diagonal_only_output_error(labels, logits) * len(labels),
    }
    return {name: float(np.max(np.abs(grad - numeric))) for name, grad in candidates.items()}


def network_gradient_errors(x, y, rng):
    """Max |backprop - finite difference| over all weights of a small network."""
    params = init_params(x.shape[1], 8, 10, rng)
    errors = {}
    for name, step1 in (("sigma - t", output_error), ("diagonal-only", diagonal_only_output_error)):
        grads = backprop(params, x, y, step1)
        worst = 0.0
        for key in ("W1", "b1", "W2", "b2"):
            numeric = central_difference(lambda: mean_loss(params, x, y), params[key])
            worst = max(worst, float(np.max(np.abs(grads[key] - numeric))))
        errors[f"network steps 1-3, step 1 = {name}"] = worst
    return errors


# ------------------------------------------------- (b) and (c) training runs


def train(data, rate, batch_size, epochs, seed, step1=output_error):
    """Plain SGD from scratch. Records, after each update, on the test inputs: the
    accuracy; the share predicted as the label of the update's last example (the
    question's symptom when near 1); how much that label's logit rose; and how far
    below the top logit it was before the update."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    params = init_params(x_train.shape[1], HIDDEN_UNITS, 10, rng)
    history = {"accuracy": [], "follows": [], "rise": [], "gap": []}
    logits = forward(params, x_test)[1]
    for _ in range(epochs):
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sgd_step(params, backprop(params, x_train[batch], y_train[batch], step1), rate)
            last_label = y_train[batch[-1]]
            new_logits = forward(params, x_test)[1]
            predictions = new_logits.argmax(axis=1)
            history["accuracy"].append(np.mean(predictions == y_test))
            history["follows"].append(np.mean(predictions == last_label))
            history["rise"].append(np.mean(new_logits[:, last_label] - logits[:, last_label]))
            history["gap"].append(np.mean(logits.max(axis=1) - logits[:, last_label]))
            logits = new_logits
    return params, {key: np.array(values) for key, values in history.items()}


def largest_class_share(params, x):
    """Share of inputs given the most frequent prediction: 1 means the net predicts one class."""
    return float(np.bincount(predict(params, x), minlength=10).max() / len(x))


# ------------------------------------------------------------------- report


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data / 16.0  # pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def verdict(error):
    return "PASS" if error < FD_TOLERANCE else "FAIL"


def training_runs():
    """(name, learning rate, batch size, epochs, step 1) of each run of parts (b) and (c)."""
    return [
        (f"batches of {BATCH_SIZE}, r = {RATE:g}", RATE, BATCH_SIZE, BATCH_EPOCHS, output_error),
        (f"per-sample, r = {RATE:g}", RATE, 1, PER_SAMPLE_EPOCHS, output_error),
        (f"per-sample, r = {SMALL_RATE:g}", SMALL_RATE, 1, PER_SAMPLE_EPOCHS, output_error),
        (
            f"per-sample, r = {SMALL_RATE:g}, diagonal-only step 1",
            SMALL_RATE,
            1,
            PER_SAMPLE_EPOCHS,
            diagonal_only_output_error,
        ),
    ]


def save_figure(path, logits_errors, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    errors = list(logits_errors.values())
    axes[0].barh(list(logits_errors), errors, color=["C2" if e < FD_TOLERANCE else "C3" for e in errors])
    axes[0].axvline(FD_TOLERANCE, color="k", linestyle="--", label="tolerance")
    axes[0].set_xscale("log")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("max |analytic - finite difference|")
    axes[0].set_title("(a) dE/dz against central differences")
    axes[0].legend(loc="lower right")

    for name, (batch_size, history) in runs.items():
        examples_seen = np.arange(1, len(history["accuracy"]) + 1) * batch_size
        axes[1].plot(examples_seen, history["accuracy"], label=name, linewidth=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training examples seen")
    axes[1].set_ylabel("test accuracy after the update")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("(b) learning the digits")
    axes[1].legend(fontsize=8, loc="upper left")

    for name, (_, history) in runs.items():
        shares = history["follows"]
        window = min(50, len(shares))
        smooth = np.convolve(shares, np.ones(window) / window, mode="valid")
        axes[2].plot(np.arange(window, len(shares) + 1), smooth, label=name)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("update")
    axes[2].set_ylabel("share of test inputs predicted\nas the last label trained on")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("(c) the symptom, moving average of 50 updates")
    axes[2].legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="numpy_backprop.png", help="where to save the figure (PNG)")
    return parser.parse_args(argv)


def report_gradient_checks(x_train, y_train):
    print(
        f"(a) finite-difference check of dE/dz (float64, central differences, h = {FD_STEP:g}, "
        f"tolerance {FD_TOLERANCE:g})"
    )
    rng = np.random.default_rng(SEED)
    logits_errors = logits_gradient_errors(rng)
    network_errors = network_gradient_errors(x_train[:20], y_train[:20], rng)
    for name, error in {**logits_errors, **network_errors}.items():
        print(f"    {name:<42s} max abs error {error:.2e}  {verdict(error)}")
    return logits_errors


def report_training(data):
    x_train, y_train, x_test, y_test = data
    print(
        f"(b, c) SGD from scratch on digits ({len(y_train)} train / {len(y_test)} test images, "
        f"{HIDDEN_UNITS} sigmoid hidden units). Measured on the test images after each update:"
    )
    print(
        "    follows: share predicted as the label y of the update's last example "
        f"(an always-right classifier: {np.mean([np.mean(y_test == label) for label in y_train]):.3f});"
    )
    print(
        "    rise: mean rise of the logit z_y; gap: mean of max_j z_j - z_y before the update "
        "(rise and gap: medians over updates);"
    )
    print("    largest: share of the test images given the most frequent prediction, after training.")
    print(
        f"    {'run':<42s}  {'epochs':>6s}  {'updates':>7s}  {'test acc':>8s}  {'follows':>7s}  "
        f"{'largest':>7s}  {'rise':>6s}  {'gap':>6s}"
    )
    runs = {}
    for name, rate, batch_size, epochs, step1 in training_runs():
        params, history = train(data, rate, batch_size, epochs, SEED, step1)
        runs[name] = (batch_size, history)
        print(
            f"    {name:<42s}  {epochs:6d}  {len(history['follows']):7d}  {history['accuracy'][-1]:8.4f}  "
            f"{history['follows'].mean():7.3f}  {largest_class_share(params, x_test):7.3f}  "
            f"{np.median(history['rise']):6.2f}  {np.median(history['gap']):6.2f}"
        )
    return runs


def main(argv=None):
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    args = parse_args(argv)
    started = time.perf_counter()
    with threadpool_limits(limits=1):  # the matrices are tiny: BLAS threads only add overhead
        run_all(args)
    print(f"runtime {time.perf_counter() - started:.1f} s")
    return 0


def run_all(args):
    data = load_data()
    logits_errors = report_gradient_checks(data[0], data[1])
    runs = report_training(data)
    save_figure(args.out, logits_errors, runs)
    print(f"figure saved to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
