"""fused_xent.losses against Keras's own losses on the same inputs (values and gradients)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from fused_xent import losses as fused_losses  # noqa: E402
from tests._support import keras_versions  # noqa: E402

REDUCTIONS = keras_versions.reductions(["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None, "none"])
CLASSES = 5
RTOL, ATOL = 2e-5, 2e-6  # float32 rounding of two different summation orders


def _logits(shape, seed=0, scale=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _labels(shape, seed=1, classes=CLASSES):
    return np.random.default_rng(seed).integers(0, classes, size=shape)


def _probabilities(shape, seed=0, saturated_row=True):
    """Softmax computed in NumPy (so no Keras logits are attached); the first row one-hot, so clipped."""
    z = _logits(shape, seed).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if saturated_row:
        p.reshape(-1, shape[-1])[0] = np.eye(shape[-1])[0]
    return p.astype(np.float32)


def _sample_weight(kind, shape, seed=3):
    rng = np.random.default_rng(seed)
    return {
        "none": None,
        "scalar": 2.5,
        "per_sample": rng.uniform(0.1, 2.0, size=(shape[0], 1)).astype(np.float32),
        "per_element": rng.uniform(0.0, 2.0, size=shape).astype(np.float32),
    }[kind]


def _value_and_gradient(loss, y_true, y_pred, sample_weight=None):
    y_pred = tf.convert_to_tensor(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        value = loss(y_true, y_pred, sample_weight=sample_weight)
        total = tf.reduce_sum(tf.cast(value, tf.float64))
    return value, tape.gradient(total, y_pred)


def assert_same_as_keras(ours, theirs, y_true, y_pred, sample_weight=None, rtol=RTOL, atol=ATOL):
    value, grad = _value_and_gradient(ours, y_true, y_pred, sample_weight)
    expected, expected_grad = _value_and_gradient(theirs, y_true, y_pred, sample_weight)
    assert value.dtype == expected.dtype and value.shape == expected.shape, (value, expected)
    np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=rtol, atol=atol)
    return value


# ---------------------------------------------------------------- same values as Keras


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "scalar", "per_sample", "per_element"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, 2, -1])
def test_sparse_matches_keras(reduction, weights, from_logits, ignore_class):
    shape = (6, 4, CLASSES)  # per-time-step losses
    y_pred = _logits(shape) if from_logits else _probabilities(shape)
    y_true = _labels(shape[:-1])
    if ignore_class == -1:
        y_true[0, :2] = -1
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction)
    assert_same_as_keras(
        fused_losses.SparseCategoricalCrossentropy(**kwargs),
        keras.losses.SparseCategoricalCrossentropy(**kwargs),
        y_true,
        y_pred,
        _sample_weight(weights, shape[:-1]),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "scalar", "per_sample", "per_element"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_categorical_matches_keras(reduction, weights, from_logits, label_smoothing):
    shape = (6, 4, CLASSES)
    y_pred = _logits(shape) if from_logits else _probabilities(shape)
    y_true = np.eye(CLASSES, dtype=np.float32)[_labels(shape[:-1])]
    y_true[1, 1] = np.random.default_rng(4).dirichlet(np.ones(CLASSES))  # a soft label
    kwargs = dict(from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction)
    assert_same_as_keras(
        fused_losses.CategoricalCrossentropy(**kwargs),
        keras.losses.CategoricalCrossentropy(**kwargs),
        y_true,
        y_pred,
        _sample_weight(weights, shape[:-1]),
    )


def test_unnormalised_probabilities_match_keras():
    y_pred = np.abs(_logits((8, CLASSES))) + 0.01  # rows do not sum to 1
    y_pred[0, :2] = 0.0
    labels = _labels(8)
    assert_same_as_keras(
        fused_losses.CategoricalCrossentropy(reduction=None),
        keras.losses.CategoricalCrossentropy(reduction=None),
        np.eye(CLASSES, dtype=np.float32)[labels],
        y_pred,
    )
    assert_same_as_keras(
        fused_losses.SparseCategoricalCrossentropy(reduction=None),
        keras.losses.SparseCategoricalCrossentropy(reduction=None),
        labels,
        y_pred,
    )


def test_keras_doc_examples():
    y_pred = np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    for reduction in ["sum_over_batch_size", "sum", None]:
        for sample_weight in [None, np.array([0.3, 0.7])]:
            assert_same_as_keras(
                fused_losses.SparseCategoricalCrossentropy(reduction=reduction),
                keras.losses.SparseCategoricalCrossentropy(reduction=reduction),
                np.array([1, 2]),
                y_pred,
                sample_weight,
            )
            assert_same_as_keras(
                fused_losses.CategoricalCrossentropy(reduction=reduction),
                keras.losses.CategoricalCrossentropy(reduction=reduction),
                np.array([[0, 1, 0], [0, 0, 1]]),
                y_pred,
                sample_weight,
            )


@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_softmax_outputs_use_their_logits_like_keras(loss_class):
    logits = tf.constant(_logits((16, CLASSES), scale=12.0))  # saturated: clipping would show
    labels = _labels(16)
    y_true = labels if loss_class.startswith("Sparse") else np.eye(CLASSES, dtype=np.float32)[labels]
    ours, theirs = getattr(fused_losses, loss_class)(), getattr(keras.losses, loss_class)()

    def both(x, softmax):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            probabilities = softmax(x)
            values = ours(y_true, probabilities), theirs(y_true, probabilities)
        return [(v, tape.gradient(v, x)) for v in values]

    for fn in [lambda x: both(x, keras.activations.softmax), tf.function(lambda x: both(x, tf.nn.softmax))]:
        (value, grad), (expected, expected_grad) = fn(logits)
        np.testing.assert_allclose(value, expected, rtol=RTOL)
        np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL)
    with pytest.warns(UserWarning, match="from_logits=True"):
        getattr(fused_losses, loss_class)(from_logits=True)(y_true, keras.activations.softmax(logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_class", [None, 1])
def test_keras_masks_match_keras(reduction, ignore_class):
    x = _logits((4, 6, 3), seed=5)
    x[0, 3:] = 0.0  # padded time steps
    x[2, 1:] = 0.0
    y_pred = keras.layers.Dense(CLASSES)(keras.layers.Masking(0.0)(x))
    assert getattr(y_pred, "_keras_mask", None) is not None
    y_true = _labels((4, 6), seed=6)
    for sample_weight in [None, _sample_weight("per_element", (4, 6))]:
        kwargs = dict(from_logits=True, reduction=reduction, ignore_class=ignore_class)
        assert_same_as_keras(
            fused_losses.SparseCategoricalCrossentropy(**kwargs),
            keras.losses.SparseCategoricalCrossentropy(**kwargs),
            y_true,
            y_pred,
            sample_weight,
        )
    one_hot = np.eye(CLASSES, dtype=np.float32)[y_true]
    assert_same_as_keras(
        fused_losses.CategoricalCrossentropy(from_logits=True, reduction=reduction),
        keras.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction),
        one_hot,
        y_pred,
    )


@pytest.mark.parametrize("label_shape", ["squeezed", "trailing_one"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", None])
def test_segmentation_maps_with_void_class(label_shape, reduction):
    shape = (2, 6, 7, CLASSES)
    y_true = _labels(shape[:-1])
    y_true[0, :3, :3] = 255
    if label_shape == "trailing_one":
        y_true = y_true[..., None]
    kwargs = dict(from_logits=True, ignore_class=255, reduction=reduction)
    ours = fused_losses.SparseCategoricalCrossentropy(**kwargs)
    theirs = keras.losses.SparseCategoricalCrossentropy(**kwargs)
    if label_shape == "trailing_one" and not keras_versions.SQUEEZES_LABELS_BEFORE_IGNORE_CLASS:
        # Keras 3.0 to 3.3 raise on these labels (their mask broadcasts against the logits):
        # their value is that of the same labels without the size-1 axis.
        theirs_call = theirs.__call__
        theirs = lambda y_true, y_pred, sample_weight=None: theirs_call(y_true[..., 0], y_pred, sample_weight)  # noqa: E731
    assert_same_as_keras(ours, theirs, y_true.astype(np.uint8), _logits(shape))


def test_call_gives_the_per_element_losses():
    y_pred, labels = tf.constant(_logits((6, 4, CLASSES))), tf.constant(_labels((6, 4)))
    for name, y_true in [("SparseCategoricalCrossentropy", labels), ("CategoricalCrossentropy", tf.one_hot(labels, 5))]:
        value = getattr(fused_losses, name)(from_logits=True).call(y_true, y_pred)
        expected = getattr(keras.losses, name)(from_logits=True).call(y_true, y_pred)
        np.testing.assert_allclose(value, expected, rtol=RTOL)


def test_integer_labels_of_any_type_and_float_labels():
    y_pred, labels = _logits((8, CLASSES)), _labels(8)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, y_pred)
    loss = fused_losses.SparseCategoricalCrossentropy(from_logits=True)
    for dtype in [np.uint8, np.int16, np.int32, np.int64, np.float32]:
        np.testing.assert_allclose(loss(labels.astype(dtype), y_pred), expected, rtol=RTOL)


# ---------------------------------------------------------------- beyond Keras


@pytest.mark.parametrize("from_logits", [True, False])
def test_channels_first_axis(from_logits):
    last = _logits((3, 4, 4, CLASSES)) if from_logits else _probabilities((3, 4, 4, CLASSES))
    first = np.moveaxis(last, -1, 1)
    labels = _labels((3, 4, 4))
    sparse = fused_losses.SparseCategoricalCrossentropy(from_logits=from_logits, axis=1, ignore_class=0)
    value, grad = _value_and_gradient(sparse, labels, first)
    expected, expected_grad = _value_and_gradient(
        keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, ignore_class=0), labels, last
    )
    np.testing.assert_allclose(value, expected, rtol=RTOL)
    np.testing.assert_allclose(grad, np.moveaxis(expected_grad.numpy(), -1, 1), rtol=RTOL, atol=ATOL)
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    for smoothing in [0.0, 0.1]:  # Keras smooths with the size of the last axis, so compare channels-last
        value = fused_losses.CategoricalCrossentropy(from_logits, smoothing, axis=1)(np.moveaxis(one_hot, -1, 1), first)
        expected = keras.losses.CategoricalCrossentropy(from_logits, smoothing)(one_hot, last)
        np.testing.assert_allclose(value, expected, rtol=RTOL)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
def test_sparse_label_smoothing_equals_keras_categorical(from_logits, reduction):
    shape = (10, CLASSES)
    # Keras normalises (and clips) categorical probabilities but not sparse ones: equal without saturation.
    y_pred = _logits(shape) if from_logits else _probabilities(shape, saturated_row=False)
    labels = _labels(10)
    ours = fused_losses.SparseCategoricalCrossentropy(from_logits, label_smoothing=0.15, reduction=reduction)
    value, grad = _value_and_gradient(ours, labels, y_pred)
    expected, expected_grad = _value_and_gradient(
        keras.losses.CategoricalCrossentropy(from_logits, label_smoothing=0.15, reduction=reduction),
        np.eye(CLASSES, dtype=np.float32)[labels],
        y_pred,
    )
    np.testing.assert_allclose(value, expected, rtol=RTOL)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_class", [None, 3])
@pytest.mark.parametrize("weights", ["none", "per_sample"])
def test_class_weights_act_like_sample_weights(reduction, ignore_class, weights):
    """class_weights == Keras with sample weights of each element's label weight (fit(class_weight=) semantics)."""
    shape = (6, 4, CLASSES)
    y_pred, y_true = _logits(shape), _labels(shape[:-1])
    class_weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    sample_weight = _sample_weight(weights, shape[:-1])
    label_weight = class_weights[y_true] * (1.0 if sample_weight is None else sample_weight)
    kwargs = dict(from_logits=True, reduction=reduction, ignore_class=ignore_class)
    ours = fused_losses.SparseCategoricalCrossentropy(**kwargs, class_weights=class_weights)
    value, grad = _value_and_gradient(ours, y_true, y_pred, sample_weight)
    expected, expected_grad = _value_and_gradient(
        keras.losses.SparseCategoricalCrossentropy(**kwargs), y_true, y_pred, label_weight
    )
    np.testing.assert_allclose(value, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_z_loss_adds_squared_logsumexp(loss_class):
    logits, labels = _logits((12, CLASSES)), _labels(12)
    y_true = labels if loss_class.startswith("Sparse") else np.eye(CLASSES, dtype=np.float32)[labels]
    value = getattr(fused_losses, loss_class)(from_logits=True, z_loss=1e-2, reduction=None)(y_true, logits)
    expected = getattr(keras.losses, loss_class)(from_logits=True, reduction=None)(y_true, logits)
    expected += 1e-2 * tf.reduce_logsumexp(logits, -1) ** 2
    np.testing.assert_allclose(value, expected, rtol=RTOL)


def test_per_sample_weights_broadcast_over_time_steps():
    """Keras fails on (batch,) weights for (batch, time) losses; ours broadcast them like (batch, 1)."""
    shape = (6, 4, CLASSES)
    y_pred, y_true = _logits(shape), _labels(shape[:-1])
    per_sample = _sample_weight("per_sample", shape[:-1])
    for reduction in REDUCTIONS:
        value = fused_losses.SparseCategoricalCrossentropy(True, reduction=reduction)(y_true, y_pred, per_sample[:, 0])
        expected = keras.losses.SparseCategoricalCrossentropy(True, reduction=reduction)(y_true, y_pred, per_sample)
        np.testing.assert_allclose(value, expected, rtol=RTOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64", "mixed_bfloat16"])
@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_dtype_argument_sets_the_result_dtype(dtype, loss_class):
    logits, labels = _logits((32, CLASSES)), _labels(32)
    y_true = labels if loss_class.startswith("Sparse") else np.eye(CLASSES, dtype=np.float32)[labels]
    value = getattr(fused_losses, loss_class)(from_logits=True, dtype=dtype)(y_true, logits)
    keras_value = _keras_loss_in(loss_class, dtype)(y_true, logits)
    exact = _keras_loss_in(loss_class, "float64")(y_true, logits)
    assert value.dtype == keras_value.dtype
    rtol = {"bfloat16": 8e-3, "float16": 1e-3, "float64": 1e-6}[value.dtype.name]
    np.testing.assert_allclose(float(value), float(exact), rtol=rtol)  # ours: float32 math, then rounded
    np.testing.assert_allclose(float(value), float(keras_value), rtol=2 * rtol)


def _keras_loss_in(loss_class, dtype):
    """Keras's loss computing in `dtype` (or a policy's compute dtype). Keras before 3.5 takes no
    policy in its losses (before 3.4 no dtype at all): there its Loss computes in its plain
    `dtype` attribute, set here."""
    if keras_versions.LOSS_DTYPE_POLICIES:
        return getattr(keras.losses, loss_class)(from_logits=True, dtype=dtype)
    loss = getattr(keras.losses, loss_class)(from_logits=True)
    loss.dtype = keras.mixed_precision.DTypePolicy(dtype).compute_dtype
    return loss


def test_labels_stay_integers_whatever_the_dtype():
    """Keras converts labels to the loss dtype first: in bfloat16, label 257 becomes 256."""
    logits, labels = _logits((4, 300)), np.array([257, 259, 261, 299])
    loss = fused_losses.SparseCategoricalCrossentropy(from_logits=True, dtype="bfloat16", reduction=None)
    value = loss(labels, logits)
    exact = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(labels, logits)
    np.testing.assert_allclose(tf.cast(value, tf.float32), exact, rtol=8e-3)


# ---------------------------------------------------------------- configuration and errors


def _sparse_full():
    return fused_losses.SparseCategoricalCrossentropy(
        from_logits=True,
        ignore_class=-1,
        reduction="sum",
        axis=1,
        name="seg",
        dtype="bfloat16",
        label_smoothing=0.1,
        class_weights=np.array([1.0, 2.0, 0.5]),
        z_loss=1e-4,
    )


def _categorical_full():
    return fused_losses.CategoricalCrossentropy(
        from_logits=True,
        label_smoothing=0.2,
        axis=1,
        reduction="mean_with_sample_weight" if keras_versions.MEAN_REDUCTIONS else "sum",
        name="cce",
        dtype="float16",
        z_loss=1e-3,
    )


@pytest.mark.parametrize("make", [_sparse_full, _categorical_full])
def test_config_round_trip(make):
    loss = make()
    config = loss.get_config()
    assert config["axis"] == 1 and config["dtype"] == loss.dtype and config["z_loss"] > 0
    rebuilt = type(loss).from_config(config)
    assert rebuilt.get_config() == config and rebuilt.dtype == loss.dtype
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == config
    y_pred = _logits((4, 3, 2))
    y_true = _labels((4, 2), classes=3)
    if isinstance(loss, fused_losses.CategoricalCrossentropy):
        y_true = np.moveaxis(np.eye(3, dtype=np.float32)[y_true], -1, 1)
    assert float(restored(y_true, y_pred)) == float(loss(y_true, y_pred))


def test_defaults_and_registration_match_keras():
    for name in ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"]:
        ours, theirs = getattr(fused_losses, name)().get_config(), getattr(keras.losses, name)().get_config()
        assert {key: ours[key] for key in theirs} == theirs
        assert keras.saving.get_registered_name(getattr(fused_losses, name)) == f"fused_xent>{name}"


@pytest.mark.parametrize(
    "loss_class, kwargs, match",
    [
        ("SparseCategoricalCrossentropy", dict(ignore_class=1.5), "ignore_class"),
        ("SparseCategoricalCrossentropy", dict(ignore_class="void"), "ignore_class"),
        ("SparseCategoricalCrossentropy", dict(ignore_class=True), "ignore_class"),
        ("SparseCategoricalCrossentropy", dict(reduction="avg"), "reduction"),
        ("CategoricalCrossentropy", dict(reduction="batch"), "reduction"),
        ("SparseCategoricalCrossentropy", dict(label_smoothing=-0.1), "label_smoothing"),
        ("CategoricalCrossentropy", dict(label_smoothing=-0.1), "label_smoothing"),
        ("CategoricalCrossentropy", dict(label_smoothing=1.5), "label_smoothing"),
        ("CategoricalCrossentropy", dict(z_loss=-1.0), "z_loss"),
        ("SparseCategoricalCrossentropy", dict(axis=True), "axis"),
        ("SparseCategoricalCrossentropy", dict(class_weights=[[1.0, 2.0]]), "class_weights"),
        ("SparseCategoricalCrossentropy", dict(class_weights=[1.0, -0.5]), "class_weights.*>= 0.*-0.5"),
        ("SparseCategoricalCrossentropy", dict(class_weights=[1.0, float("nan")]), "class_weights.*finite"),
        ("SparseCategoricalCrossentropy", dict(class_weights=[float("inf"), 1.0]), "class_weights.*finite"),
    ],
)
def test_bad_arguments_raise_at_construction(loss_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fused_losses, loss_class)(**kwargs)


def test_shape_mismatch_raises_value_error_like_keras():
    y_pred = _logits((4, 3, CLASSES))
    with pytest.raises(ValueError, match=r"same shape except for the class axis.*y_true.shape=\(4, 2\)"):
        fused_losses.SparseCategoricalCrossentropy(from_logits=True)(_labels((4, 2)), y_pred)
    with pytest.raises(ValueError, match="rank"):
        fused_losses.SparseCategoricalCrossentropy(from_logits=True)(_labels(4), y_pred)
    with pytest.raises(ValueError, match=r"same shape. Received: y_true.shape=\(4, 3, 4\)"):
        fused_losses.CategoricalCrossentropy(from_logits=True)(np.zeros((4, 3, 4)), y_pred)
    with pytest.raises(ValueError, match="same rank"):
        fused_losses.CategoricalCrossentropy(from_logits=True)(np.zeros((4, CLASSES)), y_pred)
    with pytest.raises(ValueError, match="axis"):
        fused_losses.SparseCategoricalCrossentropy(axis=3)(_labels((4, 3)), y_pred)


def test_out_of_range_labels_reach_the_op_error():
    loss = fused_losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 7"):
        loss(np.array([0, 7]), _logits((2, CLASSES)))
    traced = tf.function(lambda y, x: loss(y, x))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label value of -2"):
        traced(tf.constant([0, -2]), tf.constant(_logits((2, CLASSES))))
    if keras_versions.MEAN_REDUCTIONS:  # the class weights go into the sample weights (label_weights)
        weighted = fused_losses.SparseCategoricalCrossentropy(
            from_logits=True, class_weights=np.ones(CLASSES), reduction="mean_with_sample_weight"
        )
        with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 9"):
            weighted(np.array([9, 0]), _logits((2, CLASSES)))


@pytest.mark.skipif(keras_versions.MEAN_REDUCTIONS, reason="Keras 3.7 and later have these reductions")
@pytest.mark.parametrize("reduction", ["mean", "mean_with_sample_weight"])
@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_reductions_keras_lacks_are_refused_as_keras_does(loss_class, reduction):
    with pytest.raises(ValueError) as theirs:
        getattr(keras.losses, loss_class)(reduction=reduction)
    with pytest.raises(ValueError) as ours:
        getattr(fused_losses, loss_class)(reduction=reduction)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "backend, message",
    [
        ("numpy", "runs on Keras's TensorFlow, JAX or PyTorch backend, but Keras runs on the 'numpy' backend"),
        # JAX and PyTorch are supported (tests/keras/test_losses_backends.py), but not by a module imported for TensorFlow
        ("jax", "imported for Keras's 'tensorflow' backend, but Keras now runs on 'jax'"),
        ("torch", "imported for Keras's 'tensorflow' backend, but Keras now runs on 'torch'"),
    ],
)
def test_other_keras_backends_are_refused(monkeypatch, backend, message):
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    for name in ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"]:
        with pytest.raises(RuntimeError, match=message):
            getattr(fused_losses, name)()


@pytest.mark.parametrize("labels_dtype", [np.int32, np.int64])
def test_ignore_class_no_label_can_hold_masks_nothing(labels_dtype):
    # 2**32 is 0 as an int32: a cast of ignore_class would mask every element labelled 0.
    y_pred = _logits((6, CLASSES))
    y_true = tf.constant([0, 1, 0, 3, 4, 0], labels_dtype)
    for reduction in ["sum_over_batch_size", None]:
        ours = fused_losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2**32, reduction=reduction)
        plain = fused_losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
        np.testing.assert_allclose(ours(y_true, y_pred).numpy(), plain(y_true, y_pred).numpy(), rtol=1e-6)


@pytest.mark.parametrize("loss_class", ["SparseCategoricalCrossentropy", "CategoricalCrossentropy"])
def test_ragged_and_sparse_inputs_are_refused_with_a_hint(loss_class):
    loss = getattr(fused_losses, loss_class)(from_logits=True)
    dense_true = _labels(2) if loss_class.startswith("Sparse") else np.eye(CLASSES, dtype=np.float32)[:2]
    ragged = tf.ragged.constant([[0.0] * CLASSES, [1.0] * CLASSES])
    sparse = tf.sparse.from_dense(tf.ones([2, CLASSES]))
    with pytest.raises(TypeError, match=r"y_pred .*\.to_tensor\(\)"):
        loss(dense_true, ragged)
    with pytest.raises(TypeError, match=r"y_pred .*tf\.sparse\.to_dense"):
        loss(dense_true, sparse)
    with pytest.raises(TypeError, match=r"y_true .*\.to_tensor\(\)"):
        loss(tf.ragged.constant([[0, 1], [2]]), _logits((2, 2, CLASSES)))
