"""Every front end checks its arguments with one rule and one message (fused_xent._checks): the
same bad option gives the same exception type and text on NumPy, JAX, PyTorch and TensorFlow, and
scalars a user thinks of as numbers (NumPy scalars, 0-d arrays and tensors) are accepted."""

import re

import numpy as np
import pytest

FRONT_ENDS = ("numpy", "jax", "torch", "tensorflow")
LOGITS = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]])
LABELS = np.array([2, 0])


def _sparse(front_end, dtype="float64", **options):
    """The per-row loss of the front end's sparse function, as a float64 NumPy array."""
    logits = LOGITS.astype(dtype)
    if front_end == "numpy":
        from fused_xent import numpy as fxnp

        return fxnp.sparse_softmax_cross_entropy_with_logits(LABELS, logits, **options)[0]
    if front_end == "jax":
        pytest.importorskip("jax")
        import jax

        jax.config.update("jax_enable_x64", True)
        import fused_xent.jax as fj

        return np.asarray(fj.sparse_softmax_cross_entropy_with_logits(LABELS, logits, **options))
    if front_end == "torch":
        torch = pytest.importorskip("torch")
        import fused_xent.torch as ft

        return ft.sparse_softmax_cross_entropy_with_logits(
            torch.tensor(LABELS), torch.tensor(logits), **options
        ).numpy()
    pytest.importorskip("tensorflow")
    import fused_xent

    return fused_xent.sparse_softmax_cross_entropy_with_logits(LABELS, logits, **options).numpy()


BAD_OPTIONS = [
    ({"z_loss": 1e300}, ValueError, "z_loss must be a finite number >= 0"),  # inf as the kernels' float32
    ({"z_loss": True}, ValueError, "z_loss must be a finite number >= 0"),
    ({"z_loss": -1.0}, ValueError, "z_loss must be a finite number >= 0"),
    ({"label_smoothing": True}, ValueError, "label_smoothing must be a number in [0, 1]"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be a number in [0, 1]"),
    ({"label_smoothing": "0.1"}, ValueError, "label_smoothing must be a number in [0, 1]"),
    ({"axis": True}, TypeError, "axis must be an integer"),
    ({"axis": 1.0}, TypeError, "axis must be an integer"),
    ({"axis": 2}, ValueError, "axis 2 is out of range for logits of rank 2"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an integer or None"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an integer or None"),
    ({"class_weights": [1.0, 2.0]}, ValueError, "class_weights has 2 entries but logits have 3 classes"),
    ({"class_weights": [1.0, -2.0, 1.0]}, ValueError, "class_weights must be finite and >= 0"),
]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[repr(o) for o, _, _ in BAD_OPTIONS])
def test_bad_options_raise_the_same_everywhere(front_end, options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _sparse(front_end, **options)


def _scalars(front_end, value):
    """The ways a user of `front_end` may write a number."""
    scalars = [value, np.float32(value), np.float64(value), np.array(value)]
    if front_end == "jax":
        import jax.numpy as jnp

        scalars += [jnp.float32(value), jnp.asarray(value)]
    if front_end == "torch":
        import torch

        scalars += [torch.tensor(value), torch.tensor(value, dtype=torch.float64)]
    if front_end == "tensorflow":
        import tensorflow as tf

        scalars += [tf.constant(value)]
    return scalars


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_zero_dimensional_scalars_are_numbers(front_end):
    expected = _sparse(front_end, label_smoothing=0.1, z_loss=0.01)
    for scalar in _scalars(front_end, 0.1):
        np.testing.assert_array_equal(_sparse(front_end, label_smoothing=scalar, z_loss=0.01), expected)
    for scalar in _scalars(front_end, 0.01):
        np.testing.assert_array_equal(_sparse(front_end, label_smoothing=0.1, z_loss=scalar), expected)
    np.testing.assert_array_equal(_sparse(front_end, label_smoothing=0.1, z_loss=0.01, axis=np.int64(-1)), expected)


def test_the_scalar_comparison_sees_a_different_option():
    """A z-loss that is not applied would not pass test_zero_dimensional_scalars_are_numbers."""
    with_z = _sparse("numpy", label_smoothing=0.1, z_loss=0.01)
    without_z = _sparse("numpy", label_smoothing=0.1, z_loss=0.0)
    assert not np.array_equal(with_z, without_z)


def test_numpy_names_the_argument_of_a_bad_shape():
    from fused_xent import numpy as fxnp

    with pytest.raises(ValueError, match=re.escape("logits and labels must be broadcastable")):
        fxnp.softmax_cross_entropy_with_logits(np.ones((2, 2)), LOGITS)
    with pytest.raises(
        ValueError, match=re.escape("grad_loss of shape (3,) does not broadcast to the loss's shape (2,)")
    ):
        fxnp.sparse_softmax_cross_entropy_with_logits(LABELS, LOGITS, grad_loss=np.ones(3))
    with pytest.raises(
        ValueError, match=re.escape("`labels.shape` must equal `logits.shape` except for the class axis")
    ):
        fxnp.sparse_softmax_cross_entropy_with_logits(np.array([0, 1, 2]), LOGITS)


def test_a_traced_option_is_named_as_such():
    jax = pytest.importorskip("jax")
    import fused_xent.jax as fj

    def loss(smoothing):
        return fj.sparse_softmax_cross_entropy_with_logits(LABELS, LOGITS.astype(np.float32), label_smoothing=smoothing)

    with pytest.raises(TypeError, match="needs a concrete number, not a traced value"):
        jax.jit(loss)(0.1)
