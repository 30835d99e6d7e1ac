"""The linear head's reference, framework-free: logits = hidden @ W (+ b) in float64 NumPy,
the loss and logit gradient G from tests/_support/reference.py, dH = G W^T, dW = h^T G,
db = sum G; and a check of a head's (loss, dH, dW[, db]) against it with tolerances scaled
by the magnitudes of the terms behind each entry. Arrays of any framework that NumPy reads."""

import numpy as np

from tests._support import reference

UNIT = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _float64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def reference_result(hidden, weight, bias, labels, upstream, transpose=False, ignore_index=None, **options):
    """(loss, dH, dW, db) of the composite in float64, and magnitudes for the tolerances."""
    hidden, weight, bias = _float64(hidden), _float64(weight), _float64(bias)
    label_shape = np.shape(labels)
    h = hidden.reshape(-1, hidden.shape[-1])
    w_hv = weight.T if transpose else weight
    z = h @ w_hv + (0.0 if bias is None else bias)
    y = np.asarray(labels).reshape(-1)
    g = np.asarray(upstream, np.float64).reshape(-1)
    loss, grad = reference.sparse(y, z, ignore_index=ignore_index, grad_loss=g, **options)
    # Magnitude of the terms behind each gradient entry (the label entry cancels).
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gmag = np.abs(grad) + np.abs(g)[:, None] * (p + 1.0 / z.shape[1] + (np.arange(z.shape[1]) == y[:, None]))
    dw = h.T @ grad
    zmax = np.abs(z).max(1)
    mag = {
        "loss": ((1.0 + zmax) * (1.0 + 2 * options.get("z_loss", 0.0) * zmax) ** 2).reshape(label_shape),
        "dh": np.abs(gmag) @ np.abs(w_hv.T),
        "dw": (np.abs(h.T) @ gmag).T if transpose else np.abs(h.T) @ gmag,
        "db": gmag.sum(0),
        "zmax": 1.0 + np.abs(z).max(),
    }
    if options.get("class_weights") is not None:
        scale = max(1.0, float(np.max(options["class_weights"])))
        mag = {k: v * scale for k, v in mag.items()}
    return (loss.reshape(label_shape), grad @ w_hv.T, dw.T if transpose else dw, grad.sum(0)), mag


def assert_matches(actual, expected, magnitude, dtype, name, factor=16.0):
    actual = _float64(actual).reshape(np.shape(expected))
    tol = factor * UNIT[dtype] * magnitude
    bad = np.abs(actual - expected) > tol
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {bad.sum()} of {bad.size} entries off; at {i}: {actual[i]} vs {expected[i]} "
            f"(tolerance {np.broadcast_to(tol, bad.shape)[i]:.3g})"
        )


def check(result, hidden, weight, bias, labels, upstream, dtype, transpose=False, ignore_index=None, **options):
    """result: (loss, dH, dW[, db]) of a head called with these arguments and upstream gradient."""
    expected, mag = reference_result(hidden, weight, bias, labels, upstream, transpose, ignore_index, **options)
    # Half types: the logits themselves are rounded (error ~ u |z|), which every output inherits.
    grow = mag["zmax"] if dtype in ("float16", "bfloat16") else 1.0
    loss, dh, dw, *db = result
    assert_matches(loss, expected[0], mag["loss"], dtype, "loss")
    assert_matches(dh, expected[1], mag["dh"] * grow, dtype, "dH")
    assert_matches(dw, expected[2], mag["dw"] * grow, dtype, "dW")
    if bias is not None:
        assert_matches(db[0], expected[3], mag["db"] * grow, dtype, "db")
