"""fused_xent.linear_cross_entropy and its Keras layers against the unfused composite:
logits = hidden @ W (+ b) in float64 NumPy, the loss and logit gradient from
tests/_support/reference.py, and dH = G W^T, dW = h^T G, db = sum G."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from fused_xent.linear import linear_cross_entropy  # noqa: E402
from tests._support import ROOT, keras_versions  # noqa: E402
from tests._support.linear_reference import assert_matches, check, reference_result  # noqa: E402

IGNORE = -100


def make_case(dtype="float32", n=37, h=12, v=53, bias=False, transpose=False, lead=None, seed=0, ignored=True):
    rng = np.random.default_rng(seed)
    tf_dtype = tf.as_dtype(dtype)
    rows = n if lead is None else int(np.prod(lead))
    hidden = tf.cast(rng.normal(size=(rows, h)), tf_dtype)
    weight = tf.cast(rng.normal(size=(v, h) if transpose else (h, v)) * 0.4, tf_dtype)
    b = tf.cast(rng.normal(size=(v,)), tf_dtype) if bias else None
    labels = rng.integers(0, v, rows)
    if ignored:
        labels[::5] = IGNORE
    if lead is not None:
        hidden = tf.reshape(hidden, (*lead, h))
        labels = labels.reshape(lead)
    return hidden, weight, b, tf.constant(labels, tf.int32)


def run(hidden, weight, bias, labels, upstream, **kwargs):
    watched = [t for t in (hidden, weight, bias) if t is not None]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, **kwargs)
        total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
    return (loss, *tape.gradient(total, watched))


OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": IGNORE},
    "label_smoothing": {"label_smoothing": 0.2},
    "class_weights": {"class_weights": list(np.linspace(0.0, 2.0, 53))},
    "z_loss": {"z_loss": 0.01},
    "all": {
        "ignore_index": IGNORE,
        "label_smoothing": 0.1,
        "class_weights": list(np.linspace(0.5, 1.5, 53)),
        "z_loss": 0.005,
    },
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_and_dtypes_match_the_composite(option, dtype):
    index = list(OPTIONS).index(option)
    bias, transpose = index % 2 == 1, index % 3 == 2
    hidden, weight, b, labels = make_case(
        dtype, bias=bias, transpose=transpose, ignored="ignore_index" in OPTIONS[option] or option == "all"
    )
    upstream = np.random.default_rng(1).uniform(0.2, 2.0, labels.shape)  # not uniform: exercises every path
    result = run(hidden, weight, b, labels, upstream, transpose_weight=transpose, chunk_size=8, **OPTIONS[option])
    check(result, hidden, weight, b, labels, upstream, dtype, transpose, **OPTIONS[option])
    if dtype in ("float16", "bfloat16"):
        assert result[0].dtype == tf.float32  # the loss comes back in float32


def test_float64():
    # The kernels take label_smoothing, z_loss and class weights as float32: use values it holds exactly.
    options = {
        "ignore_index": IGNORE,
        "label_smoothing": 0.125,
        "z_loss": 2.0**-7,
        "class_weights": [float(np.float32(c)) for c in np.linspace(0.5, 1.5, 53)],
    }
    hidden, weight, b, labels = make_case("float64", bias=True)
    upstream = np.random.default_rng(2).normal(size=labels.shape)
    result = run(hidden, weight, b, labels, upstream, chunk_size=5, **options)
    check(result, hidden, weight, b, labels, upstream, "float64", **options)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 64, None])
@pytest.mark.parametrize("upstream_kind", ["mean", "random"])
def test_chunk_sizes(chunk_size, upstream_kind):
    hidden, weight, b, labels = make_case(bias=True)
    n = labels.shape[0]
    upstream = np.full(n, 1.0 / n) if upstream_kind == "mean" else np.random.default_rng(3).normal(size=n)
    result = run(hidden, weight, b, labels, upstream, chunk_size=chunk_size, ignore_index=IGNORE)
    check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)


@pytest.mark.parametrize("strategy", ["auto", "recompute"])
@pytest.mark.parametrize("upstream_kind", ["uniform", "uniform_on_counted_rows", "random", "zero"])
def test_upstream_gradients(strategy, upstream_kind):
    """The forward-computed gradients are scaled when the upstream gradient is the same on all
    counted rows, corrected by recomputation otherwise: both must be exact."""
    hidden, weight, b, labels = make_case(bias=True, transpose=True)
    y = np.asarray(labels)
    upstream = {
        "uniform": np.full(y.shape, 0.3),
        "uniform_on_counted_rows": np.where(y == IGNORE, 7.0, 0.3),  # ignored rows' gradient does not matter
        "random": np.random.default_rng(4).normal(size=y.shape),
        "zero": np.zeros(y.shape),
    }[upstream_kind]
    result = run(
        hidden,
        weight,
        b,
        labels,
        upstream,
        transpose_weight=True,
        chunk_size=6,
        ignore_index=IGNORE,
        _strategy=strategy,
    )
    check(result, hidden, weight, b, labels, upstream, "float32", True, ignore_index=IGNORE)


def test_leading_dimensions():
    hidden, weight, b, labels = make_case(lead=(3, 11), bias=True, transpose=True)
    upstream = np.random.default_rng(5).uniform(size=(3, 11))
    result = run(hidden, weight, b, labels, upstream, transpose_weight=True, chunk_size=4, ignore_index=IGNORE)
    assert result[0].shape == (3, 11) and result[1].shape == hidden.shape
    check(result, hidden, weight, b, labels, upstream, "float32", True, ignore_index=IGNORE)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_tf_function_and_xla(jit, option):
    hidden, weight, b, labels = make_case(bias=True, transpose=option == "all", ignored=option == "all")
    upstream = tf.constant(np.random.default_rng(6).uniform(0.1, 1.0, labels.shape), tf.float32)
    opts = OPTIONS[option]

    @tf.function(jit_compile=jit)
    def step(hidden, weight, b):
        return run(hidden, weight, b, labels, upstream, transpose_weight=option == "all", chunk_size=10, **opts)

    check(step(hidden, weight, b), hidden, weight, b, labels, upstream, "float32", option == "all", **opts)


def test_forward_without_tape_and_symbolic_gradient():
    """No tape while tracing (a tf.function differentiated from outside): the loss keeps only
    the log-sum-exp and the backward recomputes the logits."""
    hidden, weight, b, labels = make_case(bias=True)
    upstream = np.random.default_rng(7).uniform(size=labels.shape)
    f = tf.function(lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, chunk_size=9, ignore_index=IGNORE))
    expected, mag = reference_result(hidden, weight, b, labels, upstream, ignore_index=IGNORE)
    assert_matches(f(hidden, weight, b), expected[0], mag["loss"], "float32", "loss")
    with tf.GradientTape() as tape:
        tape.watch([hidden, weight, b])
        total = tf.reduce_sum(f(hidden, weight, b) * upstream)
    result = (f(hidden, weight, b), *tape.gradient(total, [hidden, weight, b]))
    check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)


def test_equals_dense_and_tf_nn_in_float32():
    """Against TensorFlow's own composite: matmul, bias add and tf.nn's sparse cross-entropy."""
    hidden, weight, b, labels = make_case(bias=True, ignored=False, n=64, v=200)
    upstream = tf.constant(np.random.default_rng(8).uniform(size=64), tf.float32)
    ours = run(hidden, weight, b, labels, upstream, chunk_size=24)
    with tf.GradientTape() as tape:
        tape.watch([hidden, weight, b])
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, hidden @ weight + b)
        total = tf.reduce_sum(loss * upstream)
    theirs = (loss, *tape.gradient(total, [hidden, weight, b]))
    for a, e in zip(ours, theirs):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


def test_a_planted_error_is_rejected():
    hidden, weight, b, labels = make_case(bias=True)
    upstream = np.random.default_rng(9).uniform(size=labels.shape)
    result = list(run(hidden, weight, b, labels, upstream, chunk_size=8, ignore_index=IGNORE))
    check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)
    for index in range(4):
        planted = list(result)
        values = np.array(planted[index], np.float64)
        values.flat[np.argmax(np.abs(values))] *= 1.0001  # a 1e-4 relative error in one entry
        planted[index] = values
        with pytest.raises(AssertionError):
            check(planted, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)
    wrong_option = list(result)  # a missed option (no smoothing where smoothing was asked) too
    with pytest.raises(AssertionError):
        check(wrong_option, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE, label_smoothing=0.01)


# ------------------------------------------------------------------ bad input


def _bad(**change):
    hidden, weight, _, labels = make_case(ignored=False)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(change)
    return args


BAD = {
    "hidden rank 1": (_bad(hidden=tf.zeros([12])), ValueError, "hidden must have rank"),
    "hidden size": (_bad(hidden=tf.zeros([37, 11])), ValueError, "must equal H=12"),
    "weight rank": (_bad(weight=tf.zeros([12, 53, 1])), ValueError, "weight must be a matrix"),
    "labels shape": (_bad(labels=tf.zeros([36], tf.int32)), ValueError, "labels must have the shape of hidden"),
    "labels dtype": (_bad(labels=tf.zeros([37])), TypeError, "int32 or int64"),
    "weight dtype": (_bad(weight=tf.zeros([12, 53], tf.float64)), TypeError, "must have hidden's dtype"),
    "integer hidden": (_bad(hidden=tf.zeros([37, 12], tf.int32)), TypeError, "hidden must be float"),
    "label out of range": (_bad(labels=tf.fill([37], 53)), ValueError, r"labels must lie in \[0, 53\)"),
    "negative label": (_bad(labels=tf.fill([37], -1)), ValueError, r"got -1"),
    "bias shape": (_bad(bias=tf.zeros([52])), ValueError, "bias must be a vector of V=53"),
    "chunk 0": (_bad(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
    "chunk float": (_bad(chunk_size=2.5), ValueError, "chunk_size must be a positive integer"),
    "chunk bool": (_bad(chunk_size=True), ValueError, "chunk_size must be a positive integer"),
    "class weights size": (
        _bad(class_weights=[1.0] * 52),
        ValueError,
        "class_weights has 52 entries but logits have 53 classes",
    ),
    "negative class weight": (_bad(class_weights=[-1.0] * 53), ValueError, "finite and >= 0"),
    "smoothing": (_bad(label_smoothing=1.5), ValueError, "label_smoothing"),
    "z_loss": (_bad(z_loss=-1.0), ValueError, "z_loss"),
    "transpose flag": (_bad(transpose_weight="yes"), TypeError, "transpose_weight must be a bool"),
    "transposed shape": (_bad(transpose_weight=True), ValueError, "must equal H=53"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_explained(case):
    args, error, message = BAD[case]
    with pytest.raises(error, match=message):
        linear_cross_entropy(**args)


def test_label_out_of_range_at_run_time():
    hidden, weight, _, _ = make_case(ignored=False)
    f = tf.function(lambda y: linear_cross_entropy(hidden, weight, y, chunk_size=8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        f(tf.fill([37], 60))


# ------------------------------------------------------------------ Keras


def _lm(keras, layer_kind, vocab=97, dim=16, steps=10, **head_options):
    from fused_xent.layers import LinearCrossEntropy, TiedEmbedding

    tokens = keras.Input((steps,), dtype="int32", name="tokens")
    labels = keras.Input((steps,), dtype="int32", name="labels")
    if layer_kind == "tied":
        embed = TiedEmbedding(vocab, dim, **head_options)
        x = keras.layers.Dense(dim, activation="tanh")(embed(tokens))
        loss = embed(x, labels, reverse=True)
    else:
        x = keras.layers.Dense(dim, activation="tanh")(keras.layers.Embedding(vocab, dim)(tokens))
        loss = LinearCrossEntropy(vocab, use_bias=True, name="head", **head_options)(x, labels)
    return keras.Model([tokens, labels], loss)


def _data(vocab=97, rows=48, steps=10):
    rng = np.random.default_rng(10)
    x = rng.integers(0, vocab, (rows, steps)).astype(np.int32)
    y = np.roll(x, -1, 1)
    y[:, -2:] = IGNORE
    return x, y


@pytest.mark.parametrize("layer_kind", ["head", "tied"])
def test_keras_fit_save_load(layer_kind, tmp_path):
    keras = pytest.importorskip("keras")
    model = _lm(keras, layer_kind, ignore_index=IGNORE)
    model.compile(keras.optimizers.Adam(0.01))
    x, y = _data()
    history = model.fit([x, y], epochs=3, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0]
    per_token = model.predict([x, y], verbose=0)
    counted = y != IGNORE
    assert np.all(per_token[~counted] == 0)
    np.testing.assert_allclose(
        model.evaluate([x, y], verbose=0, batch_size=48), per_token[counted].mean(), rtol=1e-5
    )  # the added loss: mean over counted tokens
    path = tmp_path / "model.keras"
    model.save(path)
    if layer_kind == "tied" and not keras_versions.LOADS_LAYERS_SHARED_AT_TWO_DEPTHS:
        pytest.skip(keras_versions.NO_LAYERS_SHARED_AT_TWO_DEPTHS + " (the tied embedding is called twice)")
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict([x, y], verbose=0), per_token)
    assert len(loaded.weights) == len(model.weights)  # tying survives loading: still one matrix


def test_keras_head_loss_and_logits_match_reference():
    pytest.importorskip("keras")
    from fused_xent.layers import LinearCrossEntropy

    head = LinearCrossEntropy(53, use_bias=True, label_smoothing=0.1, add_loss=False)
    hidden, _, _, labels = make_case(ignored=False)
    loss = head(hidden, labels)
    kernel, bias = head.kernel.numpy(), head.bias.numpy()
    expected, mag = reference_result(
        hidden, tf.constant(kernel), tf.constant(bias), labels, np.ones(37), label_smoothing=0.1
    )
    assert_matches(loss, expected[0], mag["loss"], "float32", "loss")
    np.testing.assert_allclose(head(hidden), np.asarray(hidden) @ kernel + bias, rtol=1e-5, atol=1e-5)
    values, indices = head.top_k(hidden, k=3)
    np.testing.assert_array_equal(indices, np.argsort(-(np.asarray(hidden) @ kernel + bias), 1)[:, :3])
    assert head.losses == []


def test_keras_mixed_precision():
    keras = pytest.importorskip("keras")
    keras_versions.set_dtype_policy(keras, "mixed_bfloat16")
    try:
        model = _lm(keras, "tied", ignore_index=IGNORE)
        model.compile(keras.optimizers.Adam(0.01))
        x, y = _data()
        history = model.fit([x, y], epochs=2, batch_size=16, verbose=0).history["loss"]
        assert model.layers[1].embeddings.dtype == "float32"
        assert model.output.dtype == "float32"
        assert np.isfinite(history).all() and history[-1] < history[0]
    finally:
        keras_versions.set_dtype_policy(keras, "float32")


MIRRORED_SCRIPT = """
import json, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, fused_xent, sys
sys.path.insert(0, sys.argv[1])  # the repository root, where the tests package is
from tests.tensorflow.test_linear_cross_entropy import _lm, _data, IGNORE
x, y = _data()
losses = {}
for name, strategy in [("mirrored", tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])),
                       ("default", tf.distribute.get_strategy())]:
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _lm(keras, "head", ignore_index=IGNORE)
        model.compile(keras.optimizers.SGD(0.5))
    history = model.fit([x, y], epochs=2, batch_size=16, verbose=0, shuffle=False).history["loss"]
    losses[name] = {"loss": history, "kernel": model.get_layer("head").kernel.numpy().ravel()[:50].tolist(),
                    "replicas": strategy.num_replicas_in_sync}
print(json.dumps(losses))
"""


def test_mirrored_strategy_trains_like_one_device():
    """Two replicas with half the batch each follow the single-device run: same reported
    loss, same weights."""
    pytest.importorskip("keras")
    if not keras_versions.LOSSES_SCALED_FOR_REPLICAS:
        pytest.skip(keras_versions.NOT_SCALED_FOR_REPLICAS + " (the head adds its loss)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(ROOT)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads(out.stdout.strip().splitlines()[-1])
    # Each replica averages over its own counted tokens; with the same count per replica (the
    # ignored tokens are the last two of every row) the two runs agree to rounding.
    assert losses["mirrored"]["replicas"] == 2
    np.testing.assert_allclose(losses["mirrored"]["loss"], losses["default"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(losses["mirrored"]["kernel"], losses["default"]["kernel"], atol=2e-5)


# ------------------------------------------------------------------ memory


def test_memory_target_in_a_fresh_process():
    """The training step's peak RSS above inputs, weights and weight gradient stays under 25%
    of the N x V logits (benchmarks/bench_linear.py's measurement, one shape)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_linear
    finally:
        sys.path.pop(0)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **bench_linear.MEMORY_ENV)
    n, h, v = 2048, 256, 32000
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_linear.py"),
        "--child",
        "memory",
        "--method",
        "fused",
        "--n",
        str(n),
        "--h",
        str(h),
        "--v",
        str(v),
        "--dtype",
        "float32",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_mb"]
    logits_mb = n * v * 4 / 1e6
    assert peak <= 0.25 * logits_mb, f"peak {peak:.1f} MB is {100 * peak / logits_mb:.1f}% of the logits"


# ---------------------------------------------------------------- the in-place row add (dW accumulation)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_add_to_rows_matches_numpy(dtype):
    """AddToRows adds in float (double for float64) and rounds once, like NumPy on the widened
    values; rows outside the range stay as they were; a NaN stays a NaN."""
    import ml_dtypes

    from fused_xent._tf.loader import load_op_library

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    wide = np.float64 if dtype == "float64" else np.float32
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(9, 37)) * 3).astype(np_dtype)
    values = (rng.normal(size=(4, 37)) * 1e-2).astype(np_dtype)
    values[1, 5] = np.nan
    expected = x.copy()
    expected[3:7] = (x[3:7].astype(wide) + values.astype(wide)).astype(np_dtype)
    buffer = tf.raw_ops.Empty(shape=[9, 37], dtype=getattr(tf, dtype), init=True)  # a buffer of our own
    buffer = load_op_library().fused_xent_add_to_rows(buffer, 0, tf.constant(x))
    got = load_op_library().fused_xent_add_to_rows(buffer, 3, tf.constant(values)).numpy()
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))  # bitwise; NaN == NaN
    planted = expected.copy()
    bits = planted.view(f"u{planted.itemsize}")
    bits[4, 0] ^= bits.dtype.type(1)  # one unit in the last place (a NumPy 1 scalar would widen)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(got.view(np.uint8), planted.view(np.uint8))


@pytest.mark.parametrize(
    "start, rows, width, message",
    [
        (5, 2, 3, r"rows \[5, 7\) are outside x's 6 rows"),
        (-1, 2, 3, r"rows \[-1, 1\) are outside"),
        (0, 2, 4, r"do not match the rows of x"),
    ],
)
def test_add_to_rows_refuses_rows_outside(start, rows, width, message):
    from fused_xent._tf.loader import load_op_library

    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        load_op_library().fused_xent_add_to_rows(tf.zeros([6, 3]), start, tf.ones([rows, width]))
