"""Every argument check of every front end, and its message: one rule, one wording.

Plain Python and NumPy only, on plain values (shapes as tuples, dtype names as strings, scalars),
so that each front end (TensorFlow, JAX, PyTorch, NumPy, CUDA arrays, Keras) imports only its own
framework and a user gets the same answer for the same mistake everywhere. Scalars may be Python
numbers, NumPy scalars or 0-d arrays and tensors of any framework (``float(x)`` reads them);
booleans are refused where a number is meant.
"""

import math
import numbers

import numpy as np

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_INT64 = np.iinfo(np.int64)

# ---------------------------------------------------------------- scalars


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _dtype_name(value):
    """The dtype of a NumPy, JAX, PyTorch or TensorFlow value as a name ("" for none)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return ""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).replace("torch.", "")


def _is_bool(value):
    return isinstance(value, (bool, np.bool_)) or _dtype_name(value) == "bool"


def _finite_float32(number):
    return math.isfinite(number) and abs(number) <= _FLOAT32_MAX


def plain_number(value):
    """A Python float for a real scalar (number, NumPy scalar, 0-d array or tensor), else None."""
    if _is_bool(value):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 or getattr(value, "shape", None) == ():
        if _dtype_name(value).startswith(("float", "int", "uint", "bfloat")):
            try:
                return float(value)
            except (TypeError, ValueError):  # a traced or symbolic tensor: no value yet
                raise TypeError(
                    f"a static option of the kernels needs a concrete number, not a traced value: got {value!r} "
                    "(pass it as a Python number, outside jax.jit / tf.function arguments)"
                ) from None
    return None


def plain_integer(value):
    """A Python int for an integer scalar (int, NumPy integer, 0-d integer array), else None."""
    if _is_bool(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if getattr(value, "ndim", None) == 0 and _dtype_name(value).startswith(("int", "uint")):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return None


def kernel_float(value):
    """The float32 value the kernels see, as a Python float."""
    return float(np.float32(value))


def _fraction(value):
    """The number if `value` is one in [0, 1], else None."""
    number = plain_number(value)
    return number if number is not None and 0.0 <= number <= 1.0 else None


def _finite_nonnegative(value):
    """The number if `value` is one >= 0 that stays finite as the kernels hold it (float32:
    1e300 would become inf there), else None."""
    number = plain_number(value)
    return number if number is not None and 0.0 <= number and _finite_float32(number) else None


def label_smoothing(value):
    number = _fraction(value)
    if number is None:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {value!r}")
    return number


def z_loss(value):
    number = _finite_nonnegative(value)
    if number is None:
        raise ValueError(f"z_loss must be a finite number >= 0 (as a float32), got {value!r}")
    return number


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # a cap below it would make 2 / cap overflow


def softcap(value):
    """The final-logit cap as the float32 value the kernels see: 0.0 for None (no cap)."""
    if value is None:
        return 0.0
    number = plain_number(value)
    valid = number is not None and number > 0 and _finite_float32(number)
    if not valid or kernel_float(number) < _FLOAT32_TINY:
        raise ValueError(f"softcap must be None (no cap) or a finite number > 0, got {value!r}")
    return kernel_float(number)


def kernel_options(smoothing, lam):
    """(label_smoothing, z_loss) checked, as the float32 values the kernels see."""
    return kernel_float(label_smoothing(smoothing)), kernel_float(z_loss(lam))


def axis(value, rank, what="logits"):
    """`value` as an int, checked against `rank` when it is known."""
    number = plain_integer(value)
    if number is None:
        raise TypeError(f"axis must be an integer, got {value!r}")
    if rank is not None and not -rank <= number < rank:
        raise ValueError(f"axis {number} is out of range for {what} of rank {rank}")
    return number


def ignore_index(value):
    """None, or the integer; any integer is allowed (one outside the labels' range ignores nothing)."""
    if value is None:
        return None
    number = plain_integer(value)
    if number is None:
        raise TypeError(f"ignore_index must be an integer or None, got {value!r}")
    return number


def ignore_index_for(value, label_dtype_name):
    """ignore_index, or None when no label of that integer dtype can equal it (it ignores nothing)."""
    number = ignore_index(value)
    if number is None:
        return None
    limits = np.iinfo(np.dtype(label_dtype_name))
    return number if limits.min <= number <= limits.max else None


def chunk_size(value):
    if value is None:
        return None
    number = plain_integer(value)
    if number is None or number < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {value!r}")
    return number


# ---------------------------------------------------------------- dtypes and shapes


def logits_dtype(name):
    if name not in FLOAT_NAMES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {name}")


def logits_rank(rank, logits):
    if rank == 0:
        raise ValueError(f"`logits` cannot be a scalar. Received logits={logits}")


def sparse_label_dtype(name, accepted=("int32", "int64")):
    if name not in accepted:
        raise TypeError(f"labels must be int32 or int64 class indices, got {name}")


def sparse_shapes(labels_shape, logits_shape, axis):
    """Sparse labels have the logits' shape without the class axis (None: unknown dimension)."""
    labels_shape, logits_shape = tuple(labels_shape), tuple(logits_shape)
    if len(labels_shape) != len(logits_shape) - 1:
        raise ValueError(
            "`labels.shape.rank` must equal `logits.shape.rank - 1`. Received: "
            f"labels.shape={labels_shape} of rank {len(labels_shape)} and "
            f"logits.shape={logits_shape} of rank {len(logits_shape)}"
        )
    dims = list(logits_shape)
    del dims[axis]
    if any(a is not None and b is not None and a != b for a, b in zip(labels_shape, dims)):
        raise ValueError(
            "`labels.shape` must equal `logits.shape` except for the class axis. Received: "
            f"labels.shape={labels_shape} and logits.shape={logits_shape}"
        )


def dense_label_shape(labels_shape, logits_shape):
    """Dense labels must broadcast to the logits' shape (both fully known)."""
    labels_shape, logits_shape = tuple(labels_shape), tuple(logits_shape)
    if labels_shape == logits_shape:
        return
    try:
        broadcast = np.broadcast_shapes(labels_shape, logits_shape)
    except ValueError:
        broadcast = None
    if broadcast != logits_shape:
        raise ValueError(
            f"logits and labels must be broadcastable: logits_size={list(logits_shape)} "
            f"labels_size={list(labels_shape)}"
        )


def grad_loss_shape(grad_shape, loss_shape):
    """The upstream gradient must broadcast to the loss's shape."""
    grad_shape, loss_shape = tuple(grad_shape), tuple(loss_shape)
    try:
        broadcast = np.broadcast_shapes(grad_shape, loss_shape)
    except ValueError:
        broadcast = None
    if broadcast != loss_shape:
        raise ValueError(f"grad_loss of shape {grad_shape} does not broadcast to the loss's shape {loss_shape}")


def layout(shape, axis):
    """(outer, classes, inner, loss shape): the kernels' [outer, C, inner] view of the logits."""
    rank = len(shape)
    axis = globals()["axis"](axis, rank) % rank
    classes = shape[axis]
    if classes == 0:
        raise ValueError(f"Must have at least one class, but got logits shape {tuple(shape)}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return outer, classes, inner, tuple(shape[:axis]) + tuple(shape[axis + 1 :])


# ---------------------------------------------------------------- the linear head


def linear_shapes(hidden_shape, weight_shape, labels_shape, bias_shape, transpose_weight):
    """(H, V) of a linear head's weight, after checking every shape against them (None: unknown)."""
    if not isinstance(transpose_weight, bool):
        raise TypeError(f"transpose_weight must be a bool, got {transpose_weight!r}")
    weight_shape = tuple(weight_shape)
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be a matrix, got shape {weight_shape}")
    if None in weight_shape:
        raise ValueError(f"weight must have a static shape, got {weight_shape}")
    vocab, hidden_size = weight_shape if transpose_weight else weight_shape[::-1]
    layout = "V x H (transpose_weight=True)" if transpose_weight else "H x V"
    hidden_shape = None if hidden_shape is None else tuple(hidden_shape)
    if hidden_shape is None or len(hidden_shape) < 2:
        raise ValueError(f"hidden must have rank >= 2 (rows x H), got shape {hidden_shape}")
    if hidden_shape[-1] is not None and hidden_shape[-1] != hidden_size:
        raise ValueError(
            f"hidden's last dimension ({hidden_shape[-1]}) must equal H={hidden_size} of weight {weight_shape} ({layout})"
        )
    if labels_shape is not None:
        labels_shape, rows = tuple(labels_shape), hidden_shape[:-1]
        if len(labels_shape) != len(rows) or any(
            a is not None and b is not None and a != b for a, b in zip(labels_shape, rows)
        ):
            raise ValueError(
                f"labels must have the shape of hidden without its last axis: labels {labels_shape}, hidden {hidden_shape}"
            )
    if bias_shape is not None and (len(tuple(bias_shape)) != 1 or tuple(bias_shape)[0] not in (None, vocab)):
        raise ValueError(f"bias must be a vector of V={vocab} entries, got shape {tuple(bias_shape)}")
    return hidden_size, vocab


def linear_dtypes(hidden, weight, bias, labels):
    """A linear head's dtypes, as names: floats of one type, integer labels."""
    if hidden not in FLOAT_NAMES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden}")
    if weight != hidden:
        raise TypeError(f"weight ({weight}) must have hidden's dtype ({hidden})")
    if bias is not None and bias != hidden:
        raise TypeError(f"bias ({bias}) must have hidden's dtype ({hidden})")
    if labels not in ("int32", "int64"):
        raise TypeError(f"labels must be int32 or int64 class indices, got {labels}")


def static_labels(values, classes, ignore_index):
    """Labels known when a call is built must lie in [0, classes) or equal ignore_index."""
    values = np.asarray(values).ravel()
    bad = (values < 0) | (values >= classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bad.any():
        raise ValueError(f"labels must lie in [0, {classes}) (or equal ignore_index), got {values[bad][0]}")


# ---------------------------------------------------------------- class weights


def class_weight_dtype(kind_or_name):
    """Class weights must be floating point (a NumPy kind letter or a dtype name)."""
    name = str(kind_or_name).replace("torch.", "")
    if name in ("b", "i", "u") or name.startswith(("int", "uint", "bool")):
        raise TypeError(f"class_weights must be floating point, got {name}")


def class_weight_shape(shape, classes):
    """One weight per class: `classes` may be None (unknown)."""
    shape = tuple(shape)
    if len(shape) != 1:
        raise ValueError(f"class_weights must be a vector (one weight per class), got shape {shape}")
    if classes is not None and shape[0] is not None and shape[0] != classes:
        raise ValueError(f"class_weights has {shape[0]} entries but logits have {classes} classes")


def class_weight_values(values):
    """Class weights known now must be finite and >= 0 (others are checked by the CPU kernels)."""
    if values is None:
        return
    values = np.asarray(values)
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if bad.size:
        raise ValueError(f"class_weights must be finite and >= 0, got {values[bad[0]]} for class {bad[0]}")


def bad_label_error(value, classes, ignore_index=None):
    message = f"Received a label value of {value} which is outside the valid range of [0, {classes})"
    if ignore_index is not None:
        message += f" and is not ignore_index ({ignore_index})"
    return ValueError(message)


# ---------------------------------------------------------------- Keras constructor arguments
#
# Checked when a Keras 3 or tf_keras loss, metric or layer is built, with Keras's wording
# (`name` in backticks, "Received: ...").


def keras_axis(value):
    number = plain_integer(value)
    if number is None:
        raise ValueError(f"`axis` must be of type `int`. Received: axis={value!r} of type {type(value)}")
    return number


def keras_fraction(name, value):
    number = _fraction(value)
    if number is None:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return number


def keras_softcap(value, from_logits):
    """None (no cap) or the cap, a finite number > 0; it caps logits, so it needs from_logits."""
    if value is None:
        return None
    number = plain_number(value)
    if number is None or not (number > 0 and _finite_float32(number)) or kernel_float(number) < _FLOAT32_TINY:
        raise ValueError(f"`softcap` must be None or a finite number > 0. Received: softcap={value!r}")
    if not from_logits:
        raise ValueError(
            f"`softcap` caps logits (softcap * tanh(logits / softcap)), so it needs `from_logits=True`. "
            f"Received: softcap={value!r}, from_logits={from_logits!r}"
        )
    return number


def keras_z_loss(value):
    number = _finite_nonnegative(value)
    if number is None:
        raise ValueError(f"`z_loss` must be a finite number >= 0. Received: z_loss={value!r}")
    return number


def keras_ignore_class(value, name="ignore_class"):
    if value is None:
        return None
    number = plain_integer(value)
    if number is None:
        raise ValueError(f"`{name}` must be an integer or None. Received: {name}={value!r}")
    return number


def keras_positive_integer(name, value):
    number = plain_integer(value)
    if number is None or number < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
    return number


def keras_class_weights(value):
    """A plain list of floats, which is what get_config must hold."""
    if value is None:
        return None
    try:
        weights = np.asarray(value, dtype=np.float64)
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
