"""fused_xent.jax.linear_cross_entropy against the unfused composite in float64 NumPy
(tests/_support/linear_reference.py): values and gradients to hidden, weight and bias for any
upstream gradient, every option and dtype, chunkings, jit, the memory it holds, bad input,
and the composite it lowers to on platforms without our handlers."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from fused_xent import _core  # noqa: E402
from tests._support.linear_reference import assert_matches, check, reference_result  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)

IGNORE = -100


def make_case(dtype="float32", n=37, h=12, v=53, bias=False, transpose=False, lead=None, seed=0, ignored=True):
    rng = np.random.default_rng(seed)
    rows = n if lead is None else int(np.prod(lead))
    hidden = jnp.asarray(rng.normal(size=(rows, h)), dtype)
    weight = jnp.asarray(rng.normal(size=(v, h) if transpose else (h, v)) * 0.4, dtype)
    b = jnp.asarray(rng.normal(size=(v,)), dtype) if bias else None
    labels = rng.integers(0, v, rows)
    if ignored:
        labels[::5] = IGNORE
    if lead is not None:
        hidden = hidden.reshape(*lead, h)
        labels = labels.reshape(lead)
    return hidden, weight, b, jnp.asarray(labels, jnp.int32)


def run(hidden, weight, bias, labels, upstream, jit=False, **kwargs):
    """(loss, dH, dW[, db]) for sum(loss * upstream)."""

    def total(h, w, b):
        loss = fj.linear_cross_entropy(h, w, labels, bias=b, **kwargs)
        return jnp.sum(loss * jnp.asarray(upstream, loss.dtype)), loss

    argnums = (0, 1) if bias is None else (0, 1, 2)
    step = jax.value_and_grad(total, argnums, has_aux=True)
    (_, loss), grads = (jax.jit(step) if jit else step)(hidden, weight, bias)
    return (loss, *grads)


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
        assert result[0].dtype == jnp.float32  # the loss comes back in float32
    assert all(g.dtype == x.dtype for g, x in zip(result[1:], (hidden, weight, b)))


def test_float64():
    # The kernels take label_smoothing, z_loss and class weights as float32: use values it holds exactly.
    options = {
        "ignore_index": IGNORE,
        "label_smoothing": 0.125,
        "z_loss": 2.0**-7,
        "class_weights": [float(np.float32(c)) for c in np.linspace(0.5, 1.5, 53)],
    }
    with jax.enable_x64(True):
        hidden, weight, b, labels = make_case("float64", bias=True)
        upstream = np.random.default_rng(2).normal(size=labels.shape)
        result = run(hidden, weight, b, labels, upstream, chunk_size=5, **options)
        assert result[0].dtype == jnp.float64
        check(result, hidden, weight, b, labels, upstream, "float64", **options)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 64, None])
@pytest.mark.parametrize("upstream_kind", ["mean", "random"])
def test_chunk_sizes(chunk_size, upstream_kind):
    hidden, weight, b, labels = make_case(bias=True)
    n = labels.shape[0]
    upstream = np.full(n, 1.0 / n) if upstream_kind == "mean" else np.random.default_rng(3).normal(size=n)
    result = run(hidden, weight, b, labels, upstream, chunk_size=chunk_size, ignore_index=IGNORE)
    check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)


@pytest.mark.parametrize("upstream_kind", ["uniform", "uniform_on_counted_rows", "random", "zero"])
@pytest.mark.parametrize("jit", [False, True])
def test_upstream_gradients(upstream_kind, jit):
    """The forward's unit-gradient dW and db are scaled when the counted rows share one upstream
    gradient and rebuilt from recomputed logits otherwise: both exact."""
    hidden, weight, b, labels = make_case(bias=True, transpose=True)
    y = np.asarray(labels)
    upstream = {
        "uniform": np.full(y.shape, 0.3),
        "uniform_on_counted_rows": np.where(y == IGNORE, 7.0, 0.3),  # ignored rows' gradient does not matter
        "random": np.random.default_rng(4).normal(size=y.shape),
        "zero": np.zeros(y.shape),
    }[upstream_kind]
    result = run(hidden, weight, b, labels, upstream, jit, transpose_weight=True, chunk_size=6, ignore_index=IGNORE)
    check(result, hidden, weight, b, labels, upstream, "float32", True, ignore_index=IGNORE)


def test_leading_dimensions():
    hidden, weight, b, labels = make_case(lead=(3, 11), bias=True, transpose=True)
    upstream = np.random.default_rng(5).uniform(size=(3, 11))
    result = run(hidden, weight, b, labels, upstream, transpose_weight=True, chunk_size=4, ignore_index=IGNORE)
    assert result[0].shape == (3, 11) and result[1].shape == hidden.shape
    check(result, hidden, weight, b, labels, upstream, "float32", True, ignore_index=IGNORE)


def test_forward_alone_under_jit():
    hidden, weight, b, labels = make_case(bias=True)
    loss = jax.jit(lambda h, w, b: fj.linear_cross_entropy(h, w, labels, bias=b, chunk_size=9, ignore_index=IGNORE))
    expected, mag = reference_result(hidden, weight, b, labels, np.ones(labels.shape), ignore_index=IGNORE)
    assert_matches(loss(hidden, weight, b), expected[0], mag["loss"], "float32", "loss")


def test_equals_the_jax_numpy_composite_in_float32():
    """Against JAX's own ops: matmul, bias add and log_softmax."""
    hidden, weight, b, labels = make_case(bias=True, ignored=False, n=64, v=200)
    upstream = jnp.asarray(np.random.default_rng(8).uniform(size=64), jnp.float32)
    ours = run(hidden, weight, b, labels, upstream, chunk_size=24)

    def theirs(h, w, b):
        loss = -jnp.take_along_axis(jax.nn.log_softmax(h @ w + b), labels[:, None], -1)[:, 0]
        return jnp.sum(loss * upstream), loss

    (_, loss), grads = jax.value_and_grad(theirs, (0, 1, 2), has_aux=True)(hidden, weight, b)
    for a, e in zip(ours, (loss, *grads)):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


def test_second_derivatives_raise():
    """The head's backward has no derivative of its own: a second derivative is an error,
    never a silently wrong value."""
    hidden, weight, _, labels = make_case(ignored=False)

    def loss(h):
        return fj.linear_cross_entropy(h, weight, labels, chunk_size=8).sum()

    with pytest.raises(NotImplementedError, match="Differentiation rule"):
        jax.jvp(jax.grad(loss), (hidden,), (jnp.ones_like(hidden),))
    with pytest.raises(NotImplementedError, match="Differentiation rule"):
        jax.grad(lambda h: jax.grad(loss)(h).sum())(hidden)


def test_vmap_is_one_head_per_element():
    hidden, weight, b, labels = make_case(lead=(4, 9), bias=True)
    upstream = np.random.default_rng(11).uniform(size=(4, 9))

    def per_element(h, y, g):
        def total(h, w, b):
            return jnp.sum(fj.linear_cross_entropy(h, w, y, bias=b, chunk_size=4, ignore_index=IGNORE) * g)

        return jax.value_and_grad(total, (0, 1, 2))(h, weight, b)

    values, grads = jax.jit(jax.vmap(per_element))(hidden, labels, jnp.asarray(upstream, jnp.float32))
    for i in range(4):
        expected, mag = reference_result(hidden[i], weight, b, labels[i], upstream[i], ignore_index=IGNORE)
        assert_matches(grads[0][i], expected[1], mag["dh"], "float32", f"dH of element {i}")
        assert_matches(grads[1][i], expected[2], mag["dw"], "float32", f"dW of element {i}")
        assert_matches(grads[2][i], expected[3], mag["db"], "float32", f"db of element {i}")
        np.testing.assert_allclose(values[i], np.sum(expected[0] * upstream[i]), rtol=1e-5)


def test_a_planted_error_is_rejected():
    hidden, weight, b, labels = make_case(bias=True)
    upstream = np.random.default_rng(9).uniform(size=labels.shape)
    result = [np.asarray(r) for r in run(hidden, weight, b, labels, upstream, chunk_size=8, ignore_index=IGNORE)]
    check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)
    for index in range(4):
        planted = list(result)
        values = np.array(planted[index], np.float64)
        values.flat[np.argmax(np.abs(values))] *= 1.0001  # a 1e-4 relative error in one entry
        planted[index] = values
        with pytest.raises(AssertionError):
            check(planted, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE)
    with pytest.raises(AssertionError):  # a missed option
        check(result, hidden, weight, b, labels, upstream, "float32", ignore_index=IGNORE, label_smoothing=0.01)


# ---------------------------------------------------------------- memory


def test_holds_a_fraction_of_the_logits():
    """The compiled training step's temporaries (XLA's own count, beside inputs and outputs)
    stay under 25% of the logits; the jax.numpy composite holds them several times over."""
    n, h, v = 4096, 64, 8192
    hidden = jax.ShapeDtypeStruct((n, h), jnp.float32)
    weight = jax.ShapeDtypeStruct((h, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def ours(h, w, y):
        return fj.linear_cross_entropy(h, w, y).mean()

    def composite(h, w, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[:, None], -1))

    def temp(f):
        return jax.jit(jax.grad(f, (0, 1))).lower(hidden, weight, labels).compile().memory_analysis().temp_size_in_bytes

    logits = n * v * 4
    assert temp(ours) <= 0.25 * logits, temp(ours) / logits
    assert temp(composite) >= logits  # what the fused head saves


# ---------------------------------------------------------------- other platforms


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
def test_lowers_to_the_composite_elsewhere(platform):
    hidden, weight, b, labels = make_case(bias=True, ignored=False)

    def step(h, w, b):
        return jax.grad(lambda *a: fj.linear_cross_entropy(*a[:2], labels, bias=a[2], chunk_size=8).mean(), (0, 1, 2))(
            h, w, b
        )

    with jax.enable_x64(False):  # another test module may have turned it on for the process
        text = jax.jit(step).trace(hidden, weight, b).lower(lowering_platforms=(platform,)).as_text()
    assert "fused_xent" not in text and "f64" not in text
    cpu = jax.jit(step).trace(hidden, weight, b).lower(lowering_platforms=("cpu",)).as_text()
    assert "fused_xent_sparse_forward" in cpu


def test_composite_equals_the_kernels():
    from fused_xent.jax import _linear

    hidden, weight, b, labels = make_case(bias=True, transpose=True)
    cfg = _linear.Config(opts=(-1, 0.1, 0.01, IGNORE, 0.0), transpose_weight=True, chunk_size=8, has_bias=True)
    weights = jnp.zeros([0], jnp.float32)
    upstream = jnp.asarray(np.random.default_rng(10).uniform(size=labels.shape), jnp.float32)

    def total(head):
        return jax.grad(lambda h, w, b: jnp.sum(head(cfg, h, w, b, labels, weights) * upstream), (0, 1, 2))

    for fused, composite in zip(total(_linear.fused)(hidden, weight, b), total(_linear.composite)(hidden, weight, b)):
        np.testing.assert_allclose(fused, composite, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- bad input


def _bad(**change):
    hidden, weight, _, labels = make_case(ignored=False)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(change)
    return args


BAD = {
    "hidden rank 1": (_bad(hidden=jnp.zeros([12])), ValueError, "hidden must have rank"),
    "hidden size": (_bad(hidden=jnp.zeros([37, 11])), ValueError, "must equal H=12"),
    "weight rank": (_bad(weight=jnp.zeros([12, 53, 1])), ValueError, "weight must be a matrix"),
    "labels shape": (_bad(labels=jnp.zeros([36], jnp.int32)), ValueError, "labels must have the shape of hidden"),
    "labels dtype": (_bad(labels=jnp.zeros([37])), TypeError, "int32 or int64"),
    "weight dtype": (_bad(weight=jnp.zeros([12, 53], jnp.float16)), TypeError, "must have hidden's dtype"),
    "integer hidden": (_bad(hidden=jnp.zeros([37, 12], jnp.int32)), TypeError, "hidden must be float"),
    "label out of range": (_bad(labels=jnp.full([37], 53)), ValueError, r"labels must lie in \[0, 53\)"),
    "negative label": (_bad(labels=jnp.full([37], -1)), ValueError, r"got -1"),
    "bias shape": (_bad(bias=jnp.zeros([52])), ValueError, "bias must be a vector of V=53"),
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
        fj.linear_cross_entropy(**args)


def test_label_out_of_range_at_run_time():
    hidden, weight, _, _ = make_case(ignored=False)
    step = jax.jit(lambda y: fj.linear_cross_entropy(hidden, weight, y, chunk_size=8))
    with pytest.raises(Exception, match="outside the valid range") as error:
        jax.block_until_ready(step(jnp.full([37], 60, jnp.int32)))
    assert "JaxRuntimeError" in type(error.value).__name__ or "XlaRuntimeError" in type(error.value).__name__
