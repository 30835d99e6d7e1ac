"""The cases the framework tests share (fused_xent.jax, fused_xent.torch and the XLA FFI handlers
called from JAX): the same inputs, compared with the same float64 reference in each file."""

import ml_dtypes
import numpy as np

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
C = 7
WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0, 0.25, 1.5, 0.75], np.float32)
SPARSE_OPTIONS = [
    {},
    {"label_smoothing": 0.25, "z_loss": 0.0625},
    {"ignore_index": -100, "class_weights": WEIGHTS, "label_smoothing": 0.125},
]
DENSE_OPTIONS = {"label_smoothing": 0.125, "z_loss": 0.0625}


def logits(shape, dtype, seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * 3).astype(DTYPES[dtype])


def f64(a):
    return np.asarray(a, np.float64)


def rows(shape, axis):
    return tuple(d for i, d in enumerate(shape) if i != axis % len(shape))


def sparse_case(dtype, options, axis):
    """(shape, logits, labels, upstream gradient): C classes on `axis` (-1 or 1), every
    fourth label ignore_index when the options have one."""
    shape = (5, C, 3) if axis == 1 else (9, C)
    z = logits(shape, dtype)
    labels = np.random.default_rng(1).integers(0, C, size=rows(shape, axis)).astype(np.int32 if axis == 1 else np.int64)
    if "ignore_index" in options:
        labels.flat[::4] = options["ignore_index"]
    g = np.random.default_rng(2).normal(size=rows(shape, axis)).astype(DTYPES[dtype])
    return shape, z, labels, g


def dense_case(dtype, axis):
    """(shape, logits, labels summing to 1 on `axis` (-1 or 0), upstream gradient)."""
    shape = (C, 4) if axis == 0 else (6, C)
    z = logits(shape, dtype)
    t = np.random.default_rng(3).random(shape)
    t = (t / t.sum(axis=axis, keepdims=True)).astype(DTYPES[dtype])
    g = np.random.default_rng(4).normal(size=rows(shape, axis)).astype(DTYPES[dtype])
    return shape, z, t, g
