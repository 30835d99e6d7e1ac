"""The XLA lowerings, each test under both: the custom call to the fused
kernels' FFI handlers (default on CPU) and the HLO lowering
(FUSED_XENT_XLA_LOWERING=hlo). jit_compile=True gives what the CPU kernels give
(bitwise, through the custom call) and what the float64 reference gives, for
every dtype, option and axis, to second order; bad labels raise (custom call) or
give NaN rows (HLO); the compiled HLO holds the chosen lowering; Keras trains
the same with and without jit_compile."""

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import (
    ToleranceError,
    assert_rows_close,
    dense_target_terms,
    label_gradient_terms,
    rows_tolerance,
    target_terms,
)
from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402
from fused_xent._tf.loader import load_op_library  # noqa: E402


def _build_has_xla():
    """False for a build made with FUSED_XENT_XLA=OFF, whose stub names itself."""
    try:
        probe = lambda z: fused_xent.sparse_softmax_cross_entropy_with_logits([0], z)  # noqa: E731
        tf.function(probe, jit_compile=True)(tf.zeros([1, 2]))
        return True
    except tf.errors.UnimplementedError as error:
        if "built without XLA support" in str(error):
            return False
        raise


HAS_XLA = _build_has_xla()
HAS_CUSTOM_CALL = fused_xent.build_info()["xla"] == "custom_call"


@pytest.fixture(autouse=True, params=["custom_call", "hlo"])
def lowering(request, monkeypatch):
    """Runs each test under both lowerings; @only_lowering("hlo") keeps one."""
    if not HAS_XLA and request.node.originalname != "test_build_without_xla_says_so":
        pytest.skip("fused_xent was built with FUSED_XENT_XLA=OFF")
    only = request.node.get_closest_marker("only_lowering")
    if only and request.param not in only.args:
        pytest.skip(f"a test of the {only.args[0]} lowering")
    if request.param == "custom_call" and HAS_XLA and not HAS_CUSTOM_CALL:
        pytest.skip("this build has no XLA FFI handlers")
    monkeypatch.setenv("FUSED_XENT_XLA_LOWERING", request.param)
    return request.param


def _assert_matches_plain(jit, plain, lowering):
    """The custom call runs the same kernels as eager TensorFlow: bitwise equal.
    The HLO lowering is XLA's own arithmetic: the tests compare it (and the
    custom call) with the float64 reference instead, element by element."""
    if lowering == "custom_call":
        for actual, expected in zip(jit, plain):
            np.testing.assert_array_equal(actual, expected)


def f32(value):
    """label_smoothing and z_loss are float32 attributes: the reference uses the same numbers."""
    return float(np.float32(value))


DTYPES = ["float16", "bfloat16", "float32", "float64"]
C = 5
WEIGHTS = [0.5, 2.0, 1.0, 3.0, 0.25]

SPARSE_OPTIONS = [
    {},
    {"label_smoothing": 0.25},
    {"z_loss": 0.0625},
    {"ignore_index": 1},
    {"class_weights": WEIGHTS},
    {"label_smoothing": 0.125, "z_loss": 0.03125, "ignore_index": -100, "class_weights": WEIGHTS},
]
DENSE_OPTIONS = [{}, {"label_smoothing": 0.375}, {"z_loss": 0.0625}, {"label_smoothing": 0.125, "z_loss": 0.03125}]


def _ids(case):
    return ",".join(case) or "defaults"


def _jit_and_plain(fn, *args):
    """fn's results compiled by XLA and run by the CPU kernels, as NumPy arrays."""
    jit = tf.function(fn, jit_compile=True)(*args)
    plain = tf.function(fn, jit_compile=False)(*args)
    to_numpy = lambda results: [np.asarray(tf.cast(r, tf.float64)) for r in results]  # noqa: E731
    return to_numpy(jit), to_numpy(plain)


def _logits(shape, dtype, seed=0):
    values = np.random.default_rng(seed).normal(size=shape) * 3.0
    return tf.constant(values, dtype)  # rounded to dtype: the reference reads the same values


def _labels(shape, dtype, seed=1, ignore_index=None):
    values = np.random.default_rng(seed).integers(0, C, size=shape)
    if ignore_index is not None:
        values.flat[::3] = ignore_index  # may lie outside [0, C): such rows are ignored, not bad
    return tf.constant(values, dtype)


def _sparse_loss_and_grad(labels, grad_loss, axis, options):
    def fn(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, z, axis=axis, **options)
            total = tf.reduce_sum(loss * tf.cast(grad_loss, loss.dtype))
        return loss, tape.gradient(total, z)

    return fn


# --- First order: every dtype, label dtype, option and axis ------------------------------


def _grid(options, other_axis):
    """Every dtype x option on the last axis; the first and last options on another axis."""
    cases = [(d, o, -1) for o in options for d in DTYPES]
    cases += [(d, o, other_axis) for o in (options[0], options[-1]) for d in DTYPES]
    return pytest.mark.parametrize("dtype,options,axis", cases, ids=[f"{d}-{_ids(o)}-axis{a}" for d, o, a in cases])


@_grid(SPARSE_OPTIONS, 1)
def test_sparse_matches_cpu_kernel_and_reference(dtype, options, axis, lowering):
    label_dtype = tf.int32 if (len(options) + (axis == 1)) % 2 else tf.int64  # both, across the grid
    shape = (4, C, 3) if axis == 1 else (6, 7, C)
    row_shape = shape[:axis] + shape[axis + 1 :] if axis >= 0 else shape[:-1]
    z = _logits(shape, dtype)
    labels = _labels(row_shape, label_dtype, ignore_index=options.get("ignore_index"))
    grad_loss = tf.constant(np.random.default_rng(2).normal(size=row_shape), dtype)

    (loss, grad), plain = _jit_and_plain(_sparse_loss_and_grad(labels, grad_loss, axis, options), z)

    _assert_matches_plain((loss, grad), plain, lowering)
    g64 = tf.cast(grad_loss, tf.float64).numpy()
    ref_loss, ref_grad = reference.sparse(
        labels.numpy(), tf.cast(z, tf.float64).numpy(), axis=axis, grad_loss=g64, **options
    )
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = target_terms(labels.numpy(), shape, axis, grad_loss=g64, **options)
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")


@_grid(DENSE_OPTIONS, 0)
def test_dense_matches_cpu_kernel_and_reference(dtype, options, axis, lowering):
    shape = (C, 4, 3) if axis == 0 else (6, C)
    z = _logits(shape, dtype)
    t = tf.nn.softmax(_logits(shape, tf.float64, seed=3), axis=axis)
    t = tf.cast(tf.where(t < 0.05, tf.zeros_like(t), t), dtype)  # zeros too
    grad_loss = _logits([d for i, d in enumerate(shape) if i != axis % len(shape)], dtype, seed=4)

    def fn(z, t):
        with tf.GradientTape() as tape:
            tape.watch([z, t])
            loss = fused_xent.softmax_cross_entropy_with_logits(t, z, axis=axis, **options)
            total = tf.reduce_sum(loss * grad_loss)
        return (loss, *tape.gradient(total, [z, t]))

    jit, plain = _jit_and_plain(fn, z, t)
    _assert_matches_plain(jit, plain, lowering)
    t64, z64, g64 = (tf.cast(a, tf.float64).numpy() for a in (t, z, grad_loss))
    ref = reference.dense(t64, z64, axis=axis, grad_loss=g64, **options)
    smoothing = options.get("label_smoothing", 0.0)
    loss, grad, grad_labels = jit
    ref_loss, ref_grad, ref_grad_labels = ref
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = dense_target_terms(t64, shape, axis, smoothing, g64)
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")
    terms = label_gradient_terms(z64, g64, smoothing, axis)
    assert_rows_close(grad_labels, ref_grad_labels, dtype, axis=axis, terms=terms, what="label gradient")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_raw_ops_lse_and_lse_gradient_match(sparse, dtype, lowering):
    """lse (float64), and the Grad op reading it (its legacy grad_lse input empty)."""
    lib = load_op_library()
    z = _logits((6, C), dtype)
    g = _logits((6,), dtype, seed=5)
    g_lse = tf.zeros([0], tf.float64)
    labels = tf.constant([2, 2, 0, 4, 1, 2], tf.int64)
    if sparse:
        attrs = dict(label_smoothing=0.1, z_loss=0.05, has_ignore_index=True, ignore_index=2)
        weights = tf.constant(WEIGHTS, tf.float32)

        def fn(z):
            loss, lse = lib.fused_xent_sparse_softmax_cross_entropy(z, labels, weights, **attrs)
            grad = lib.fused_xent_sparse_softmax_cross_entropy_grad(z, labels, weights, lse, g, g_lse, **attrs)
            return loss, lse, grad
    else:
        t = tf.cast(tf.one_hot(labels, C) * 0.7 + 0.06, dtype)
        attrs = dict(label_smoothing=0.1, z_loss=0.05)

        def fn(z):
            loss, lse = lib.fused_xent_softmax_cross_entropy(z, t, **attrs)
            grad = lib.fused_xent_softmax_cross_entropy_grad(z, t, lse, g, g_lse, **attrs)
            return loss, lse, grad

    jit, plain = _jit_and_plain(fn, z)
    _assert_matches_plain(jit, plain, lowering)
    loss, lse, grad = jit
    z64, g64 = (tf.cast(a, tf.float64).numpy() for a in (z, g))
    options = dict(label_smoothing=f32(0.1), z_loss=f32(0.05))
    if sparse:
        ref_loss, ref_grad = reference.sparse(
            labels.numpy(), z64, ignore_index=2, class_weights=WEIGHTS, grad_loss=g64, **options
        )
        terms = target_terms(labels.numpy(), z64.shape, ignore_index=2, class_weights=WEIGHTS, grad_loss=g64, **options)
    else:
        t64 = tf.cast(t, tf.float64).numpy()
        ref_loss, ref_grad, _ = reference.dense(t64, z64, grad_loss=g64, **options)
        terms = dense_target_terms(t64, z64.shape, label_smoothing=options["label_smoothing"], grad_loss=g64)
    ref_lse = reference._lse(z64)
    # lse is float64 from the kernels' float32 sums (float64 ones for float64 logits).
    assert_rows_close(lse, ref_lse, "float64" if dtype == "float64" else "float32", axis=None, what="lse")
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(grad, ref_grad, dtype, terms=terms, what="gradient")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_nonempty_grad_lse_from_an_old_graph_is_refused(sparse, lowering):
    """The Grad ops' grad_lse input is kept for graphs saved by earlier versions: a
    non-empty one (an old second-order graph) raises instead of a different gradient."""
    lib = load_op_library()
    z = _logits((6, C), "float32")
    g = tf.ones([6])
    labels = tf.constant([2, 2, 0, 4, 1, 2], tf.int64)
    if sparse:
        fn = lambda z: lib.fused_xent_sparse_softmax_cross_entropy_grad(  # noqa: E731
            z, labels, tf.zeros([0]), tf.zeros([6], tf.float64), g, tf.ones([6], tf.float64)
        )
    else:
        fn = lambda z: lib.fused_xent_softmax_cross_entropy_grad(  # noqa: E731
            z, tf.one_hot(labels, C), tf.zeros([6], tf.float64), g, tf.ones([6], tf.float64)
        )
    for run in (fn, tf.function(fn, jit_compile=True)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"grad_lse must be empty.*re-export it"):
            run(z)


def test_masked_logits_match(lowering):
    """-inf logits (masking) away from the label, and a 0 dense label against -inf."""
    z = np.random.default_rng(7).normal(size=(4, C)).astype(np.float32)
    z[:, 3] = -np.inf
    z[1, :2] = -np.inf
    labels = tf.constant([0, 2, 4, 1])
    t = tf.one_hot(labels, C)

    def fn(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            a = fused_xent.sparse_softmax_cross_entropy_with_logits(labels, z, z_loss=0.01)
            b = fused_xent.softmax_cross_entropy_with_logits(t, z)
            total = a + b
        return a, b, tape.gradient(total, z)

    jit, plain = _jit_and_plain(fn, tf.constant(z))
    _assert_matches_plain(jit, plain, lowering)
    assert np.isfinite(jit[0]).all() and np.isfinite(jit[1]).all()
    z64, t64 = z.astype(np.float64), t.numpy().astype(np.float64)
    ref_a, grad_a = reference.sparse(labels.numpy(), z64, z_loss=f32(0.01))
    ref_b, grad_b, _ = reference.dense(t64, z64)
    assert_rows_close(jit[0], ref_a, "float32", axis=None, what="sparse loss")
    assert_rows_close(jit[1], ref_b, "float32", axis=None, what="dense loss")
    terms = target_terms(labels.numpy(), z.shape) + dense_target_terms(t64, z.shape)
    assert_rows_close(jit[2], grad_a + grad_b, "float32", terms=terms, what="gradient")


@pytest.mark.parametrize("shape", [(0, C), (C,), (2, 0, C)], ids=str)
def test_empty_batch_and_single_row(shape, lowering):
    labels = tf.constant(np.zeros(shape[:-1], np.int32) + 2)
    z = _logits(shape, "float32")
    options = {"class_weights": WEIGHTS, "ignore_index": 2**40}
    fn = _sparse_loss_and_grad(labels, tf.ones(shape[:-1]), -1, options)
    jit, plain = _jit_and_plain(fn, z)
    _assert_matches_plain(jit, plain, lowering)
    ref_loss, ref_grad = reference.sparse(labels.numpy(), tf.cast(z, tf.float64).numpy(), **options)
    assert_rows_close(jit[0], ref_loss, "float32", axis=None, what="loss")
    terms = target_terms(labels.numpy(), shape, **options)
    assert_rows_close(jit[1], ref_grad, "float32", terms=terms, what="gradient")


@pytest.mark.only_lowering("custom_call")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_custom_call_is_bitwise_equal_on_rows_split_over_threads(dtype):
    """Large enough that XLA's pool and TensorFlow's split the rows differently."""
    shape = (3000, 1001)
    z = _logits(shape, dtype)
    labels = tf.constant(np.random.default_rng(12).integers(0, shape[1], size=shape[0]))
    fn = _sparse_loss_and_grad(labels, tf.ones([shape[0]]), -1, {"label_smoothing": 0.125, "z_loss": 1e-3})
    jit, plain = _jit_and_plain(fn, z)
    _assert_matches_plain(jit, plain, "custom_call")
    t = tf.nn.softmax(_logits(shape, tf.float32, seed=13))
    dense = lambda z: fused_xent.softmax_cross_entropy_with_logits(tf.cast(t, z.dtype), z)  # noqa: E731
    _assert_matches_plain(*_jit_and_plain(lambda z: [dense(z)], z), "custom_call")


@pytest.mark.only_lowering("custom_call")
def test_assert_matches_plain_rejects_one_unit_in_the_last_place():
    """The bitwise comparison can fail: one value moved to its float32 neighbour is caught.
    (The HLO results are held to the reference by assert_rows_close; test_tolerances.py shows it failing.)"""
    values = np.linspace(0.5, 2.0, 12, dtype=np.float32)
    nudged = values.copy()
    nudged[5] = np.nextafter(nudged[5], np.float32(3))
    _assert_matches_plain([values], [values.copy()], "custom_call")
    with pytest.raises(AssertionError):
        _assert_matches_plain([nudged], [values], "custom_call")


# --- Second order: Hessian-vector products --------------------------------------------


def _hvp(loss_fn):
    """v -> H v of sum(loss(z)^2): the squared loss makes grad_loss depend on z."""

    def fn(z, v):
        with tf.GradientTape() as outer:
            outer.watch(z)
            with tf.GradientTape() as inner:
                inner.watch(z)
                total = tf.reduce_sum(loss_fn(z) ** 2)
            directional = tf.reduce_sum(inner.gradient(total, z) * v)
        return total, outer.gradient(directional, z)

    return fn


def _assert_hvp_matches_reference(actual, expected, terms, dtype, axes, what="jit Hessian-vector product"):
    """The jit results against reference.py's float64 Hessian-vector products, element by element.
    terms (the same formulas with every term's magnitude) bound what cancels: the products are
    differences such as p_j v_j - p_j (p . v) and 2 L (H v) with L = lse - z_y, so an element may
    be far below the numbers the kernels add up to make it. With that, assert_rows_close's default allowance
    (a few roundings of the dtype) holds with room (errors up to 0.13 of it seen), and a 1% error
    in any nonzero element is beyond it, which is checked on the data itself, not only planted once."""
    for a, e, t, axis in zip(actual, expected, terms, axes):
        assert_rows_close(a, e, dtype, axis=axis, terms=t, what=what)
        tol = rows_tolerance(e, dtype, axis=axis, terms=t)
        assert (np.abs(a + 0.01 * e - e) > tol)[e != 0].all(), "a 1% error would pass somewhere"
        with pytest.raises(ToleranceError):
            assert_rows_close(a * 1.01, e, dtype, axis=axis, terms=t)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [SPARSE_OPTIONS[0], SPARSE_OPTIONS[-1]], ids=_ids)
@pytest.mark.parametrize("axis", [-1, 0])
def test_sparse_hessian_vector_product(dtype, options, axis):
    shape = (C, 6) if axis == 0 else (6, C)
    labels = tf.constant([0, 3, -100 if "ignore_index" in options else 3, 4, 1, 2])
    z, v = _logits(shape, dtype), _logits(shape, dtype, seed=8)
    loss = lambda x: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, x, axis=axis, **options)  # noqa: E731
    jit, plain = _jit_and_plain(_hvp(loss), z, v)
    assert np.abs(jit[1]).max() > 1e-3  # not trivially zero
    args = (labels.numpy(), tf.cast(z, tf.float64).numpy(), tf.cast(v, tf.float64).numpy())
    expected = reference.sparse_hvp(*args, axis=axis, **options)
    terms = reference.sparse_hvp(*args, axis=axis, magnitudes=True, **options)
    for results, what in ((jit, "jit Hessian-vector product"), (plain, "Hessian-vector product without XLA")):
        _assert_hvp_matches_reference(results, expected, terms, dtype, axes=(None, axis), what=what)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_hessian_vector_product_and_label_gradient(dtype):
    z, v = _logits((6, C), dtype), _logits((6, C), dtype, seed=9)
    t = tf.cast(tf.nn.softmax(_logits((6, C), tf.float64, seed=10)), dtype)

    def fn(z, t, v):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([z, t])
            with tf.GradientTape() as inner:
                inner.watch(z)
                loss = fused_xent.softmax_cross_entropy_with_logits(t, z, label_smoothing=0.1, z_loss=0.05)
                total = tf.reduce_sum(loss**2)
            directional = tf.reduce_sum(inner.gradient(total, z) * v)
        return outer.gradient(directional, [z, t])

    jit, plain = _jit_and_plain(fn, z, t, v)
    args = [tf.cast(a, tf.float64).numpy() for a in (t, z, v)]
    options = dict(label_smoothing=f32(0.1), z_loss=f32(0.05))  # float32 attributes
    expected = reference.dense_hvp(*args, **options)[1:]
    terms = reference.dense_hvp(*args, magnitudes=True, **options)[1:]
    for results, what in ((jit, "jit Hessian-vector product"), (plain, "Hessian-vector product without XLA")):
        _assert_hvp_matches_reference(results, expected, terms, dtype, axes=(-1, -1), what=what)


# --- Bad labels: an error through the custom call, NaN rows through HLO ----------------------


def _bad_label_case(label_dtype):
    z = _logits((5, C), "float32")
    labels = tf.constant([0, C, 2, -1, -7], label_dtype)  # -7 is ignore_index: not bad
    fn = _sparse_loss_and_grad(labels, tf.ones([5]), -1, {"ignore_index": -7, "label_smoothing": 0.1})
    return z, labels, fn


@pytest.mark.only_lowering("custom_call")
@pytest.mark.parametrize("label_dtype", [tf.int32, tf.int64])
def test_out_of_range_labels_raise_as_without_xla(label_dtype):
    z, labels, fn = _bad_label_case(label_dtype)
    message = r"label value of 5 which is outside the valid range of \[0, 5\) and is not ignore_index \(-7\)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(fn, jit_compile=True)(z)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(fn, jit_compile=False)(z)
    loss_only = lambda z: fused_xent.sparse_softmax_cross_entropy_with_logits(labels, z, ignore_index=-7)  # noqa: E731
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(loss_only, jit_compile=True)(z)


@pytest.mark.only_lowering("custom_call")
@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_bad_class_weight_values_raise_as_without_xla(bad):
    z = _logits((4, C), "float32")
    labels = tf.constant([0, 1, 2, 3])

    def fn(weights):
        loss, grad = _sparse_loss_and_grad(labels, tf.ones([4]), -1, {"class_weights": weights})(z)
        return loss, grad

    weights = tf.constant([1.0, bad, 1.0, 1.0, 1.0])
    message = r"class_weights must be finite and >= 0, got .* for class 1"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(fn, jit_compile=True)(weights)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(fn, jit_compile=False)(weights)


@pytest.mark.only_lowering("hlo")
@pytest.mark.parametrize("label_dtype", [tf.int32, tf.int64])
def test_out_of_range_labels_give_nan_rows_only(label_dtype):
    z, labels, fn = _bad_label_case(label_dtype)
    loss, grad = (np.asarray(r) for r in tf.function(fn, jit_compile=True)(z))
    bad = np.array([False, True, False, True, False])
    assert np.isnan(loss[bad]).all() and np.isnan(grad[bad]).all()
    good_labels = np.where(bad, 0, labels.numpy())
    options = dict(ignore_index=-7, label_smoothing=f32(0.1))
    ref_loss, ref_grad = reference.sparse(good_labels, z.numpy().astype(np.float64), **options)
    assert_rows_close(loss[~bad], ref_loss[~bad], "float32", axis=None, what="loss")
    terms = target_terms(good_labels, z.shape, **options)[~bad]
    assert_rows_close(grad[~bad], ref_grad[~bad], "float32", terms=terms, what="gradient")
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        tf.function(fn, jit_compile=False)(z)  # the CPU kernel still raises


# --- The lowering is what runs --------------------------------------------------------------


def _compiled_hlo(stage="hlo"):
    z = _logits((8, C), "float32")
    labels = tf.constant(np.arange(8) % C)
    fn = tf.function(_sparse_loss_and_grad(labels, tf.ones([8]), -1, {"label_smoothing": 0.1}), jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(z)(stage=stage)
    return re.sub(r", metadata=\{[^}]*\}", "", hlo)  # op names live in metadata


@pytest.mark.only_lowering("hlo")
def test_compiled_hlo_holds_the_hlo_lowering():
    body = _compiled_hlo()
    assert "custom-call" not in body and "outfeed" not in body and "send(" not in body
    assert body.count(" reduce(") >= 3  # row max, sum of exp, label logit, mean gap
    assert " exponential(" in body and " log(" in body and " iota(" in body


@pytest.mark.only_lowering("custom_call")
def test_compiled_hlo_calls_the_fused_kernels():
    body = _compiled_hlo(stage="optimized_hlo")
    assert 'custom_call_target="fused_xent_sparse_forward"' in body
    assert 'custom_call_target="fused_xent_sparse_backward"' in body
    assert body.count("api_version=API_VERSION_TYPED_FFI") == 2
    assert " exponential(" not in body and " log(" not in body  # the math is not re-expressed
    assert "label_smoothing = 0x3DCCCCCD : f32" in body  # 0.1 as float32 bits, exact


@pytest.mark.only_lowering("custom_call")
def test_unknown_lowering_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSED_XENT_XLA_LOWERING", "fast")
    fn = lambda z: fused_xent.sparse_softmax_cross_entropy_with_logits([0, 1], z)  # noqa: E731
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="FUSED_XENT_XLA_LOWERING must be auto, custom_call or hlo"
    ):
        tf.function(fn, jit_compile=True)(tf.zeros([2, 3]))


def test_lowering_registered_when_loaded_after_eager_start():
    """The library is loaded after TensorFlow has run (and compiled) something."""
    code = textwrap.dedent(
        """
        import tensorflow as tf
        tf.function(lambda x: x * 2, jit_compile=True)(tf.ones([2]))  # XLA and eager context up
        import fused_xent
        f = tf.function(lambda z: fused_xent.sparse_softmax_cross_entropy_with_logits([1, 0], z), jit_compile=True)
        print("LOSS", f(tf.zeros([2, 4])).numpy().tolist())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    values = eval(result.stdout.split("LOSS", 1)[1])
    np.testing.assert_allclose(values, [np.log(4.0)] * 2, rtol=1e-6)


@pytest.mark.skipif(HAS_XLA, reason="this build has the XLA lowerings")
def test_build_without_xla_says_so():
    fn = lambda z: fused_xent.softmax_cross_entropy_with_logits(tf.ones([2, 3]) / 3, z)  # noqa: E731
    with pytest.raises(tf.errors.UnimplementedError, match="built without XLA support.*FUSED_XENT_XLA"):
        tf.function(fn, jit_compile=True)(tf.zeros([2, 3]))


# --- Keras -----------------------------------------------------------------------------------


def _fused_sparse_loss(y_true, y_pred):
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)  # Keras hands labels over as floats
    return fused_xent.sparse_softmax_cross_entropy_with_logits(labels, y_pred, label_smoothing=0.1)


def _train(jit_compile, x, y, init):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((x.shape[1],)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(C)]
    )
    model.set_weights(init)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=_fused_sparse_loss, jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"], model.get_weights(), model


def test_keras_fit_with_jit_compile_matches_without(lowering):
    import keras

    rng = np.random.default_rng(11)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = rng.integers(0, C, size=48)
    keras.utils.set_random_seed(0)
    init = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16), keras.layers.Dense(C)]).get_weights()

    jit_losses, jit_weights, jit_model = _train(True, x, y, init)
    plain_losses, plain_weights, _ = _train(False, x, y, init)
    assert jit_model.jit_compile
    np.testing.assert_allclose(jit_losses, plain_losses, rtol=1e-5)
    assert jit_losses[1] < jit_losses[0]
    for a, b, start in zip(jit_weights, plain_weights, init):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert not np.allclose(a, start)  # it trained

    # The compiled step runs the lowering: a bad label raises through the custom
    # call, and is a NaN loss through HLO.
    bad = y[:16].copy()
    bad[3] = C + 2
    if lowering == "custom_call":
        with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 7"):
            jit_model.fit(x[:16], bad, batch_size=16, verbose=0)
    else:
        assert np.isnan(jit_model.fit(x[:16], bad, batch_size=16, verbose=0).history["loss"][0])
