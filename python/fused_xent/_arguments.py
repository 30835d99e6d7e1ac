"""Argument checks shared by every framework's functions (TensorFlow, JAX, PyTorch, NumPy): plain
Python and NumPy only, so that each framework's module imports only its own framework and the
messages are the same everywhere."""

import numbers

import numpy as np


def check_smoothing(label_smoothing):
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_z_loss(z_loss):
    if not isinstance(z_loss, numbers.Real) or not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return float(z_loss)


def check_axis(axis, rank, what="logits"):
    """`axis` as an int, checked against `rank` when it is known."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if rank is not None and not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for {what} of rank {rank}")
    return int(axis)


def check_sparse_shapes(labels_shape, logits_shape, axis):
    """Sparse labels have the logits' shape without the class axis (shapes as tuples)."""
    labels_shape, logits_shape = tuple(labels_shape), tuple(logits_shape)
    if len(labels_shape) != len(logits_shape) - 1:
        raise ValueError(
            "`labels.shape.rank` must equal `logits.shape.rank - 1`. Received: "
            f"labels.shape={labels_shape} of rank {len(labels_shape)} and "
            f"logits.shape={logits_shape} of rank {len(logits_shape)}"
        )
    dims = list(logits_shape)
    del dims[axis]
    if labels_shape != tuple(dims):
        raise ValueError(
            "`labels.shape` must equal `logits.shape` except for the class axis. Received: "
            f"labels.shape={labels_shape} and logits.shape={logits_shape}"
        )


def check_weight_values(values):
    """Class weights known now must be finite and >= 0 (others are checked by the CPU kernels)."""
    if values is None:
        return
    values = np.asarray(values)
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if bad.size:
        raise ValueError(f"class_weights must be finite and >= 0, got {values[bad[0]]} for class {bad[0]}")


# ---------------------------------------------------------------- the Keras classes' arguments
#
# Constructor arguments of the Keras 3 and tf_keras losses and metrics, checked when the object
# is built, with Keras's wording (`name` in backticks, "Received: ...").


def keras_axis(axis):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis!r} of type {type(axis)}")
    return int(axis)


def keras_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def keras_z_loss(z_loss):
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real) or not 0.0 <= float(z_loss) < np.inf:
        raise ValueError(f"`z_loss` must be a finite number >= 0. Received: z_loss={z_loss!r}")
    return float(z_loss)


def keras_ignore_class(ignore_class):
    if ignore_class is None:
        return None
    if isinstance(ignore_class, bool) or not isinstance(ignore_class, numbers.Integral):
        raise ValueError(f"`ignore_class` must be an integer or None. Received: ignore_class={ignore_class!r}")
    return int(ignore_class)


def keras_class_weights(class_weights):
    """A plain list of floats, which is what get_config must hold."""
    if class_weights is None:
        return None
    try:
        weights = np.asarray(class_weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`class_weights` must be a vector of numbers: {error}") from None
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"`class_weights` must be a non-empty vector (a weight per class), got shape {weights.shape}")
    bad = np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))
    if bad.size:
        raise ValueError(
            f"`class_weights` must be finite and >= 0. Received: class_weights[{bad[0]}]={weights[bad[0]]}"
        )
    return [float(w) for w in weights]


class CrossentropyArguments:
    """What the Keras 3 and tf_keras losses and metrics keep of their arguments: the per-element
    functions' options and the config entries (attributes of the same names)."""

    _CONFIG_ARGUMENTS = ("from_logits", "label_smoothing", "axis", "z_loss")

    def _argument_config(self):
        return {name: getattr(self, name) for name in self._CONFIG_ARGUMENTS}

    def _per_element_options(self, epsilon, loss_dtype):
        """The arguments of fused_xent._tf_losses' per-element functions."""
        return dict(
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
            z_loss=self.z_loss,
            epsilon=epsilon,
            loss_dtype=loss_dtype,
            name=self.name,
        )

    def _keep_arguments_of(self, loss):
        """A metric's copies of its loss's (checked) arguments."""
        for name in self._CONFIG_ARGUMENTS:
            setattr(self, name, getattr(loss, name))
