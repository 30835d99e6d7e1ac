"""fused_xent.jax's optax-style losses (softmax_cross_entropy, ..._with_integer_labels,
safe_softmax_cross_entropy): values and gradients against a float64 NumPy reference of optax's
semantics written here, and against optax itself where it is installed; optax's own test cases
(optax/losses/_classification_test.py) ported; argument errors. Each comparison is also shown to
reject a planted error.

The reference gives what optax gives except where fused_xent documents a difference (a -inf logit
with label 0 adds 0 to softmax_cross_entropy, where optax has NaN; masked-out labels get a zero
gradient): those cases are checked against optax on their own.
"""

import functools

import numpy as np
import pytest

from tests._support.assertions import assert_close
from tests._support.framework_cases import DTYPES

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)
fj = pytest.importorskip("fused_xent.jax")

try:
    import optax
except ImportError:  # the comparisons with optax skip; the reference's run
    optax = None

needs_optax = pytest.mark.skipif(optax is None, reason="optax is not installed")
INF = np.inf


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------- float64 reference of optax's semantics


def _class_axes(axis, rank):
    if axis is None:
        return tuple(range(rank))
    return tuple(a % rank for a in (axis if isinstance(axis, tuple) else (axis,)))


def _to_rows(x, axes):
    """x with the class axes moved to the end (in the order given) and flattened into one."""
    rest = [i for i in range(x.ndim) if i not in axes]
    moved = np.transpose(x, rest + list(axes))
    return moved.reshape(moved.shape[: len(rest)] + (-1,))


def _from_rows(x, shape, axes):
    """The inverse of _to_rows for an array of `shape`."""
    rest = [i for i in range(len(shape)) if i not in axes]
    order = rest + list(axes)
    moved = x.reshape(tuple(shape[i] for i in order))
    return np.transpose(moved, np.argsort(order))


def _mask(where, shape, axes):
    if where is None:
        return np.ones(shape, bool)
    where = np.asarray(where, bool)
    if where.ndim != len(shape):
        where = np.expand_dims(where, axes)
    return np.broadcast_to(where, shape)


def _kept_softmax(z, kept):
    """(lse over the kept classes, softmax over them, 0 elsewhere; rows with none kept: 0, 0)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        zk = np.where(kept, z, -INF)
        m = np.max(zk, axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(kept, np.exp(zk - m), 0.0)
        lse = m + np.log(e.sum(-1, keepdims=True))
        p = np.where(kept, np.exp(zk - lse), 0.0)
    some = kept.any(-1, keepdims=True)
    return np.where(some, lse, 0.0), np.where(some, p, 0.0), some


def reference_integer(logits, labels, axis=-1, where=None, cotangent=None):
    """(loss, gradient for the logits) of lse_where(z) - z[label], in float64."""
    logits = np.asarray(logits, np.float64)
    axes = _class_axes(axis, logits.ndim)
    z, kept = _to_rows(logits, axes), _to_rows(_mask(where, logits.shape, axes), axes)
    classes = z.shape[-1]
    labels = np.broadcast_to(np.asarray(labels).astype(np.int64), z.shape[:-1])
    inside = (labels >= -classes) & (labels < classes)
    index = np.where(inside, labels % classes, 0)
    label_logit = np.where(inside, np.take_along_axis(z, index[..., None], -1)[..., 0], np.nan)
    lse, p, some = _kept_softmax(z, kept)
    with np.errstate(invalid="ignore"):
        loss = np.where(some[..., 0], lse[..., 0] - label_logit, 0.0)
    onehot = np.zeros(z.shape)
    np.put_along_axis(onehot, index[..., None], inside[..., None].astype(np.float64), -1)
    g = np.ones(loss.shape) if cotangent is None else np.asarray(cotangent, np.float64)
    grad = np.where(some, g[..., None] * (p - onehot), 0.0)
    return loss, _from_rows(grad, logits.shape, axes)


def reference_dense(logits, labels, axis=-1, where=None, cotangent=None):
    """(loss, gradient for the logits, gradient for the labels) of sum_kept t (lse_where - z), in
    float64, with 0 * inf taken as 0 (a -inf logit with label 0 adds nothing)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    shape = np.broadcast_shapes(logits.shape, labels.shape)
    added = len(shape) - logits.ndim
    axes = tuple(a + added for a in _class_axes(axis, logits.ndim))
    kept = _mask(where, logits.shape, _class_axes(axis, logits.ndim))
    z, t = (_to_rows(np.broadcast_to(x, shape), axes) for x in (logits, labels))
    kept = _to_rows(np.broadcast_to(kept, shape), axes)
    t = np.where(kept, t, 0.0)
    lse, p, some = _kept_softmax(z, kept)
    with np.errstate(invalid="ignore"):
        gap = np.where(kept, lse - z, 0.0)
        loss = np.sum(np.where(t == 0, 0.0, t * gap), -1)
    g = np.ones(loss.shape) if cotangent is None else np.asarray(cotangent, np.float64)
    grad_z = np.where(some, g[..., None] * (t.sum(-1, keepdims=True) * p - t), 0.0)
    grad_t = np.where(kept, g[..., None] * gap, 0.0)
    grad_z, grad_t = _from_rows(grad_z, shape, axes), _from_rows(grad_t, shape, axes)
    return loss, _summed_to(grad_z, logits.shape), _summed_to(grad_t, labels.shape)


def _summed_to(grad, shape):
    """A gradient over the broadcast shape, summed back to an input's shape."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape))))
    return grad.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1 and grad.shape[i] != 1), keepdims=True)


# ---------------------------------------------------------------- running ours and optax's


def integer_run(f, logits, labels, axis=-1, where=None, cotangent=None):
    """(loss, gradient for the logits) of `f` (ours or optax's) under jax.jit and jax.vjp."""

    @functools.partial(jax.jit, static_argnums=0)
    def run(axis, z, y, where, g):
        loss, vjp = jax.vjp(lambda z: f(z, y, axis=axis, where=where), z)
        return loss, vjp(jnp.ones_like(loss) if g is None else g.astype(loss.dtype))[0]

    return [np.asarray(r) for r in run(axis, jnp.asarray(logits), jnp.asarray(labels), where, cotangent)]


def dense_run(f, logits, labels, cotangent=None, **kwargs):
    """(loss, gradient for the logits, gradient for the labels) of `f` under jax.jit."""

    @jax.jit
    def run(z, t, g):
        loss, vjp = jax.vjp(lambda z, t: f(z, t, **kwargs), z, t)
        return (loss, *vjp(jnp.ones_like(loss) if g is None else g.astype(loss.dtype)))

    return [np.asarray(r) for r in run(jnp.asarray(logits), jnp.asarray(labels), cotangent)]


def _array(values, dtype="float32"):
    return np.asarray(values).astype(DTYPES[dtype])


def assert_matches(actual, expected, dtype="float32", what="values"):
    """Element-wise within 4 times the dtype's tolerance (tests/_support/assertions.py, relative to
    max(1, |expected|)) of the expected values; NaN and +-inf must be where they are expected."""
    try:
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf
            assert_close(np.asarray(actual, np.float64), np.asarray(expected, np.float64), dtype, scale=4.0)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None


def test_comparison_rejects_planted_error():
    z = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 1])
    loss, grad = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels)
    ref_loss, ref_grad = reference_integer(z, labels)
    assert_matches(grad, ref_grad)
    planted = np.array(grad)
    planted[1, 3] += 1e-4
    with pytest.raises(AssertionError):
        assert_matches(planted, ref_grad)
    with pytest.raises(AssertionError):  # a NaN where a number is expected
        assert_matches(np.where(np.arange(4) == 2, np.nan, loss), ref_loss)


def test_reference_rejects_planted_error():
    """The reference itself tells a wrong answer from a right one: the masked label's -1 in the
    gradient (optax's rule) and a class left out of the masked logsumexp both show."""
    z = np.array([[1.0, 2.0, 3.0]])
    where = np.array([[True, True, False]])
    loss, grad = reference_integer(z, [2], where=where)
    assert_matches(loss, [np.log(np.exp(1) + np.exp(2)) - 3.0], "float64")
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    assert_matches(grad, [[p[0], p[1], -1.0]], "float64")
    with pytest.raises(AssertionError):
        assert_matches(loss, reference_integer(z, [2])[0], "float64")


# ---------------------------------------------------------------- optax's own test cases, ported

# optax/losses/_classification_test.py: logits, labels and the losses it expects.
YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
EXPECTED = np.array([9.00013, 3.0696733], np.float32)
INTEGER_TS = np.array([1, 0], np.int32)
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]], bool)
ROW_MASK = np.array([True, False])
SAFE_YS = np.array(
    [[10.0, 1.0, -2.0], [1.0, 4.0, 0.2], [-INF, 0.0, 0.0], [-INF, 0.0, 0.0], [-INF, 0.0, -INF]], np.float32
)
SAFE_TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.4, 0.3, 0.3], [0.0, 1.0, 0.0]], np.float32)
SAFE_EXPECTED = np.array([9.00013, 3.0696733, 0.693147, INF, 0.0], np.float32)


def test_optax_cases_scalar_and_batched():
    np.testing.assert_allclose(jax.jit(fj.softmax_cross_entropy)(YS[0], TS[0]), EXPECTED[0], atol=1e-4)
    np.testing.assert_allclose(jax.jit(fj.softmax_cross_entropy)(YS, TS), EXPECTED, atol=1e-4)
    np.testing.assert_allclose(jax.jit(fj.safe_softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0]), EXPECTED[0], atol=1e-4)
    np.testing.assert_allclose(jax.jit(fj.safe_softmax_cross_entropy)(SAFE_YS, SAFE_TS), SAFE_EXPECTED, atol=1e-4)
    integer = jax.jit(fj.softmax_cross_entropy_with_integer_labels)
    one_hot = jax.nn.one_hot(INTEGER_TS, 3)
    np.testing.assert_allclose(integer(YS[0], INTEGER_TS[0]), fj.softmax_cross_entropy(YS[0], one_hot[0]), rtol=1e-6)
    np.testing.assert_allclose(integer(YS, INTEGER_TS), fj.softmax_cross_entropy(YS, one_hot), rtol=1e-6)
    assert_matches(integer(YS, INTEGER_TS), reference_integer(YS, INTEGER_TS)[0])


def test_optax_cases_per_logit_mask_gives_zero_for_rows_masked_out():
    for f, labels in [(fj.softmax_cross_entropy, TS), (fj.softmax_cross_entropy_with_integer_labels, INTEGER_TS)]:
        out = f(YS, labels, where=PER_LOGIT_MASK)
        np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)


def test_optax_cases_gradients():
    """jax.test_util.check_grads (order 1 and 2, both modes) and finite gradients under a row mask."""
    from jax import test_util

    ys, ts = YS.astype(np.float64), TS.astype(np.float64)
    rev = dict(order=2, modes=["rev"])  # the fused losses are custom_vjp: reverse mode, any order
    test_util.check_grads(fj.softmax_cross_entropy, (ys, ts), **rev)
    test_util.check_grads(fj.safe_softmax_cross_entropy, (ys, ts), **rev)
    test_util.check_grads(
        functools.partial(fj.softmax_cross_entropy_with_integer_labels, labels=INTEGER_TS), (ys,), **rev
    )
    for f, labels in [(fj.softmax_cross_entropy, TS), (fj.softmax_cross_entropy_with_integer_labels, INTEGER_TS)]:
        grads = jax.grad(lambda z: jnp.sum(f(z, labels, where=ROW_MASK)))(YS)
        assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("size", [5, 10])
def test_optax_cases_mask_is_the_loss_of_the_kept_elements(size):
    rng = np.random.default_rng(size)
    preds, targets = rng.normal(size=size), rng.dirichlet(np.ones(size))
    mask = rng.integers(2, size=size).astype(bool)
    mask[0] = True
    np.testing.assert_allclose(
        fj.softmax_cross_entropy(preds[mask], targets[mask]), fj.softmax_cross_entropy(preds, targets, where=mask)
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_optax_cases_axis_is_moving_the_axis_last(axis):
    rng = np.random.default_rng(axis)
    shape = (4, 5, 6)
    preds = rng.normal(size=shape)
    targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    np.testing.assert_allclose(
        fj.softmax_cross_entropy(preds, targets, axis=axis),
        fj.softmax_cross_entropy(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1)),
    )
    labels = rng.integers(shape[axis], size=shape[:axis] + shape[axis + 1 :])
    np.testing.assert_allclose(
        fj.softmax_cross_entropy_with_integer_labels(preds, labels, axis=axis),
        fj.softmax_cross_entropy_with_integer_labels(np.moveaxis(preds, axis, -1), labels),
    )


@pytest.mark.parametrize("axis", [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1)])
def test_optax_cases_tuple_axis_is_a_flat_class_index(axis):
    """optax's test_axes: logits of the batch shape + (classes,), laid out over `axis` of (2, 3, 4, 5)."""
    shape = (2, 3, 4, 5)
    class_axes = tuple(a % 4 for a in axis)
    batch_axes = tuple(a for a in range(4) if a not in class_axes)
    class_shape, batch_shape = tuple(shape[a] for a in class_axes), tuple(shape[a] for a in batch_axes)
    rng = np.random.default_rng(42)
    flat = rng.uniform(size=batch_shape + (int(np.prod(class_shape)),))
    labels = rng.integers(0, flat.shape[-1], size=batch_shape)
    laid_out = flat.reshape(batch_shape + class_shape).transpose(np.argsort(batch_axes + class_axes))
    assert laid_out.shape == shape
    expected = fj.softmax_cross_entropy_with_integer_labels(flat, labels)
    np.testing.assert_allclose(fj.softmax_cross_entropy_with_integer_labels(laid_out, labels, axis), expected)
    assert_matches(expected, reference_integer(flat, labels)[0], "float64")
    # the dense loss on one-hot labels laid out the same way
    one_hot = (
        np.eye(flat.shape[-1])[labels].reshape(batch_shape + class_shape).transpose(np.argsort(batch_axes + class_axes))
    )
    np.testing.assert_allclose(fj.softmax_cross_entropy(laid_out, one_hot, axis), expected)


def test_optax_cases_safe_against_plain_implementation():
    plain = jax.value_and_grad(fj.softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0])
    safe = jax.value_and_grad(fj.safe_softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0])
    for a, b in zip(plain, safe):
        np.testing.assert_allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- against the reference (no optax needed)


def _integer_case(shape=(6, 5), seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    z = _array(rng.normal(size=shape) * 3, dtype)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return z, labels, rng


# (axis, logits shape): one class axis anywhere, and tuples merged in place or moved.
INTEGER_AXES = [(-1, (6, 5)), (0, (5, 6)), (1, (3, 5, 4)), ((1, 2), (3, 4, 5)), ((2, 0), (4, 3, 5))]
AXES = INTEGER_AXES + [(None, (4, 5))]  # None (all axes): the dense loss only, as in optax


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis, shape", INTEGER_AXES, ids=[str(a) for a, _ in INTEGER_AXES])
def test_integer_labels_match_reference(dtype, axis, shape):
    rng = np.random.default_rng(1)
    z = _array(rng.normal(size=shape) * 3, dtype)
    axes = _class_axes(axis, len(shape))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    labels = rng.integers(0, int(np.prod([shape[a] for a in axes])), size=batch)
    g = rng.normal(size=batch)
    loss, grad = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, axis, cotangent=g)
    assert loss.dtype == grad.dtype == z.dtype
    ref_loss, ref_grad = reference_integer(z, labels, axis, cotangent=g)
    assert_matches(loss, ref_loss, dtype, "loss")
    assert_matches(grad, ref_grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis, shape", AXES, ids=[str(a) for a, _ in AXES])
def test_dense_labels_match_reference(dtype, axis, shape):
    rng = np.random.default_rng(2)
    z = _array(rng.normal(size=shape) * 3, dtype)
    t = _array(rng.random(shape), dtype)
    axes = _class_axes(axis, len(shape))
    g = rng.normal(size=tuple(d for i, d in enumerate(shape) if i not in axes))
    loss, grad_z, grad_t = dense_run(fj.softmax_cross_entropy, z, t, g, axis=axis)
    assert loss.dtype == grad_z.dtype == grad_t.dtype == z.dtype
    ref = reference_dense(z, t, axis, cotangent=g)
    for ours, theirs, what in zip((loss, grad_z, grad_t), ref, ("loss", "gradient", "label gradient")):
        assert_matches(ours, theirs, dtype, what)


# where: whole rows (shaped like the loss, or with a size-1 class axis), and single classes.
ROWS = np.array([True, False, True, True, False, True])
ELEMENTS = np.array(
    [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 1, 1]], bool
)  # row 1 keeps nothing; row 4 one class
WHERE_LABELS = np.array([2, 1, 4, 0, 0, 3], np.int32)  # rows 0 and 3: the label's class masked out
WHERES = {"rows": ROWS, "rows, keepdims": ROWS[:, None], "elements": ELEMENTS}


def _special_where_masked(z, where, labels, rng):
    """z with NaN and -inf at the elements `where` masks out (but a masked label's own logit)."""
    masked = ~np.broadcast_to(where if where.ndim == 2 else where[:, None], z.shape).copy()
    masked[np.arange(len(labels)), labels] &= where.ndim == 1 or where.shape[1] == 1
    return np.where(masked, np.where(rng.random(z.shape) < 0.5, np.nan, -INF), z).astype(z.dtype)


@pytest.mark.parametrize("where", list(WHERES), ids=list(WHERES))
def test_where_integer_labels_match_reference(where):
    z, _, rng = _integer_case()
    mask, labels = WHERES[where], WHERE_LABELS
    z = _special_where_masked(z, mask, labels, rng)
    g = rng.normal(size=6)
    loss, grad = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, where=mask, cotangent=g)
    ref_loss, ref_grad = reference_integer(z, labels, where=mask, cotangent=g)
    assert_matches(loss, ref_loss, what="loss")
    assert_matches(grad, ref_grad, what="gradient")


@pytest.mark.parametrize("where", list(WHERES), ids=list(WHERES))
def test_where_dense_labels_match_reference(where):
    z, _, rng = _integer_case(seed=4)
    t = rng.random(z.shape).astype(np.float32)
    mask = WHERES[where]
    z = _special_where_masked(z, mask, np.zeros(6, int), rng) if where != "elements" else z
    z = np.where(ELEMENTS | (where != "elements"), z, -INF).astype(np.float32)
    g = rng.normal(size=6)
    ours = dense_run(fj.softmax_cross_entropy, z, t, g, where=mask)
    ref = reference_dense(z, t, where=mask, cotangent=g)
    for a, b, what in zip(ours, ref, ("loss", "gradient", "label gradient")):
        assert_matches(a, b, what=what)


def test_where_with_tuple_axis_matches_reference():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)
    labels = rng.integers(0, 20, size=(3, 2))
    for where in [rng.random(z.shape) < 0.7, np.array([[True, False]] * 3)]:
        loss, grad = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, (1, 3), where)
        ref_loss, ref_grad = reference_integer(z, labels, (1, 3), where)
        assert_matches(loss, ref_loss)
        assert_matches(grad, ref_grad)
        t = rng.random(z.shape).astype(np.float32)
        ours = dense_run(fj.softmax_cross_entropy, z, t, axis=(1, 3), where=where)
        for a, b in zip(ours, reference_dense(z, t, (1, 3), where)):
            assert_matches(a, b)


def test_labels_outside_the_classes_are_nan_and_negative_ones_count_from_the_end():
    z, _, rng = _integer_case()
    labels = np.array([5, -1, -5, -6, 7, 2], np.int32)  # C = 5
    g = rng.normal(size=6)
    loss, grad = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, cotangent=g)
    ref_loss, ref_grad = reference_integer(z, labels, cotangent=g)
    assert np.isnan(loss[[0, 3, 4]]).all() and np.isfinite(loss[[1, 2, 5]]).all()
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)  # rows of NaN loss: softmax(z), as optax's gather drops the label
    for dtype in (np.uint8, np.int8, np.int16, np.uint32):
        unsigned = np.array([0, 4, 200 if dtype != np.int8 else 100, 3, 1, 2]).astype(dtype)
        loss = fj.softmax_cross_entropy_with_integer_labels(z, unsigned)
        assert_matches(loss, reference_integer(z, unsigned.astype(np.int64))[0])


def test_safe_gives_zero_for_rows_of_zero_labels():
    z = np.array([[-INF, -INF, -INF], [np.nan, 1.0, 2.0], [INF, 0.0, 1.0], [1.0, 2.0, 3.0], [-INF, 0.0, 1.0]])
    t = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss = jax.jit(fj.safe_softmax_cross_entropy)(z, t)
    np.testing.assert_array_equal(loss[:3], 0.0)
    assert_matches(loss[3:], reference_dense(z[3:], t[3:])[0], "float64")
    assert np.isposinf(loss[4])
    # the plain loss has the kernel's NaN for those rows, as optax's has
    assert np.isnan(fj.softmax_cross_entropy(z[:3], t[:3])).all()
    # under vmap the test for NaN becomes a select: the same values
    np.testing.assert_array_equal(jax.vmap(fj.safe_softmax_cross_entropy)(z, t), loss)


def test_labels_broadcast_against_logits():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(4, 5)).astype(np.float32)
    t = rng.random((3, 4, 5)).astype(np.float32)  # labels add a leading axis: the logits repeat
    ours = dense_run(fj.softmax_cross_entropy, z, t)
    for a, b in zip(ours, reference_dense(z, t)):
        assert_matches(a, b)
    assert_matches(fj.softmax_cross_entropy(z, t[0, 0]), reference_dense(z, t[0, 0])[0])
    assert_matches(fj.safe_softmax_cross_entropy(z, t), reference_dense(z, t)[0])
    for where in (rng.random((4, 5)) < 0.7, rng.random(4) < 0.7):  # the mask is the logits'
        ours = dense_run(lambda z, t: fj.softmax_cross_entropy(z, t, where=where), z, t)
        for a, b in zip(ours, reference_dense(z, t, where=where)):
            assert_matches(a, b)
    labels = np.array([3])  # integer labels broadcast to the rows
    assert_matches(fj.softmax_cross_entropy_with_integer_labels(z, labels), reference_integer(z, [3, 3, 3, 3])[0])


def test_result_dtypes_follow_jax_promotion():
    z = jnp.ones((2, 3), jnp.bfloat16)
    assert fj.softmax_cross_entropy(z, jnp.ones((2, 3), jnp.float32)).dtype == jnp.float32
    assert fj.softmax_cross_entropy(z, jnp.ones((2, 3), jnp.int32)).dtype == jnp.bfloat16
    assert fj.safe_softmax_cross_entropy(z.astype(jnp.float16), jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.float32
    assert fj.softmax_cross_entropy_with_integer_labels(z, jnp.zeros(2, jnp.int8)).dtype == jnp.bfloat16
    with jax.enable_x64(False):
        z32 = jnp.ones((2, 3), jnp.float32)
        assert fj.softmax_cross_entropy_with_integer_labels(z32, jnp.zeros(2, jnp.int32)).dtype == jnp.float32


def test_hessian_and_vmap():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(3, 4))
    labels = np.array([0, 3, 1])
    hessian = jax.hessian(lambda z: fj.softmax_cross_entropy_with_integer_labels(z, labels).sum())(z)
    p = np.exp(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    expected = np.zeros((3, 4, 3, 4))
    for i in range(3):
        expected[i, :, i, :] = np.diag(p[i]) - np.outer(p[i], p[i])
    assert_matches(hessian, expected, "float64")
    batched = jax.vmap(fj.softmax_cross_entropy_with_integer_labels)(z[:, None], labels[:, None])
    assert_matches(batched[:, 0], reference_integer(z, labels)[0], "float64")


# ---------------------------------------------------------------- against optax


OPTAX_DTYPES = ["bfloat16", "float32"]  # the reference tests above cover all four


def _optax_in(dtype, *arrays):
    """optax runs on float32 copies of float16/bfloat16 inputs (the same values: its own rounding of
    log_softmax in those dtypes is not what is compared) and on wider inputs as they are."""
    if dtype in ("float16", "bfloat16"):
        return [np.asarray(a, np.float32) for a in arrays]
    return list(arrays)


@needs_optax
@pytest.mark.parametrize("dtype", OPTAX_DTYPES)
@pytest.mark.parametrize("where", [None, *WHERES], ids=["no where", *WHERES])
@pytest.mark.parametrize("axis, shape", INTEGER_AXES, ids=[str(a) for a, _ in INTEGER_AXES])
def test_integer_labels_match_optax(dtype, where, axis, shape):
    rng = np.random.default_rng(8)
    z = _array(rng.normal(size=shape) * 3, dtype)
    axes = _class_axes(axis, len(shape))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    labels = rng.integers(0, int(np.prod([shape[a] for a in axes])), size=batch)
    mask = None
    if where is not None:  # the masks above, sized for this layout
        mask = rng.random(shape) < 0.6 if where == "elements" else rng.random(batch) < 0.6
        if where == "rows, keepdims":
            mask = np.expand_dims(mask, axes)
    g = rng.normal(size=batch)
    ours = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, axis, mask, g)
    theirs = integer_run(optax.softmax_cross_entropy_with_integer_labels, *_optax_in(dtype, z), labels, axis, mask, g)
    assert ours[0].dtype == optax.softmax_cross_entropy_with_integer_labels(z, labels, axis).dtype
    for a, b, what in zip(ours, theirs, ("loss", "gradient")):
        assert_matches(a, b, dtype, what)


@needs_optax
@pytest.mark.parametrize("dtype", OPTAX_DTYPES)
@pytest.mark.parametrize("where", [None, *WHERES], ids=["no where", *WHERES])
@pytest.mark.parametrize("axis, shape", AXES, ids=[str(a) for a, _ in AXES])
def test_dense_labels_match_optax(dtype, where, axis, shape):
    rng = np.random.default_rng(9)
    z = _array(rng.normal(size=shape) * 3, dtype)
    t = _array(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]), dtype)
    axes = _class_axes(axis, len(shape))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    mask = None
    if where is not None:
        mask = rng.random(shape) < 0.6 if where == "elements" else rng.random(batch) < 0.6
        if where == "rows, keepdims":
            mask = np.expand_dims(mask, axes)
    g = rng.normal(size=batch)
    loss, grad_z, grad_t = dense_run(fj.softmax_cross_entropy, z, t, g, axis=axis, where=mask)
    if axis is None and where == "rows":  # optax cannot expand a 0-d mask by axis=None; ours as the reference
        with pytest.raises(TypeError):
            optax.softmax_cross_entropy(z, t, axis=None, where=mask)
        assert_matches(loss, reference_dense(z, t, axis, mask, g)[0], dtype)
        return
    theirs = dense_run(optax.softmax_cross_entropy, *_optax_in(dtype, z, t), g, axis=axis, where=mask)
    assert loss.dtype == optax.softmax_cross_entropy(z, t, axis=axis).dtype
    assert_matches(loss, theirs[0], dtype, "loss")
    assert_matches(grad_z, theirs[1], dtype, "gradient")
    if mask is None:  # optax's labels' gradient is NaN at masked-out elements (0 * -inf); ours 0
        assert_matches(grad_t, theirs[2], dtype, "label gradient")
    else:
        full = np.broadcast_to(mask if mask.ndim == z.ndim else np.expand_dims(mask, axes), z.shape)
        assert_matches(np.where(full, grad_t, np.nan), theirs[2], dtype, "label gradient")


@needs_optax
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_safe_matches_optax(dtype):
    z = _array(SAFE_YS, dtype)
    t = _array(SAFE_TS, dtype)
    g = np.arange(1.0, 6.0)
    ours = dense_run(fj.safe_softmax_cross_entropy, z, t, g)
    theirs = dense_run(optax.safe_softmax_cross_entropy, *_optax_in(dtype, z, t), g)
    for a, b, what in zip(ours, theirs, ("loss", "gradient", "label gradient")):
        assert_matches(a, b, dtype, what)


@needs_optax
def test_optax_special_values_where_masked():
    """NaN and -inf logits at masked positions, a masked label, a row with nothing kept: optax's
    values and logits gradients exactly as they are (NaN where optax has NaN)."""
    z = np.array([[1.0, 2.0, np.nan], [0.0, -INF, 1.0], [np.nan, np.nan, np.nan], [1.0, 5.0, -INF]], np.float32)
    where = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1]], bool)
    for labels in ([2, 0, 1, 0], [1, 1, 0, 2]):
        labels = np.array(labels, np.int32)
        ours = integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels, where=where)
        theirs = integer_run(optax.softmax_cross_entropy_with_integer_labels, z, labels, where=where)
        for a, b in zip(ours, theirs):
            assert_matches(a, b)
        t = np.eye(3, dtype=np.float32)[labels][:3]  # row 3 keeps a -inf logit: optax's NaN (0 * -inf) for label 0
        ours = dense_run(fj.softmax_cross_entropy, z[:3], t, where=where[:3])
        theirs = dense_run(optax.softmax_cross_entropy, z[:3], t, where=where[:3])
        assert_matches(ours[0], theirs[0])
        assert_matches(ours[1], theirs[1])


@needs_optax
def test_optax_out_of_range_labels_and_broadcasting():
    z, _, rng = _integer_case()
    labels = np.array([5, -1, -5, -6, 7, 2], np.int32)
    for a, b in zip(
        integer_run(fj.softmax_cross_entropy_with_integer_labels, z, labels),
        integer_run(optax.softmax_cross_entropy_with_integer_labels, z, labels),
    ):
        assert_matches(a, b)
    t = rng.random((3, 6, 5)).astype(np.float32)
    for f, g in [
        (fj.softmax_cross_entropy, optax.softmax_cross_entropy),
        (fj.safe_softmax_cross_entropy, optax.safe_softmax_cross_entropy),
    ]:
        for a, b in zip(dense_run(f, z, t), dense_run(g, z, t)):
            assert_matches(a, b)


@needs_optax
def test_documented_differences_from_optax():
    """A -inf logit with label 0: optax's softmax_cross_entropy is NaN, ours is the safe loss's
    finite value (the same gradients). With where, optax's labels' gradient is NaN where masked."""
    z = SAFE_YS[2:4]
    t = SAFE_TS[2:4]
    assert np.isnan(optax.softmax_cross_entropy(z, t)[0])
    assert_matches(fj.softmax_cross_entropy(z, t), optax.safe_softmax_cross_entropy(z, t))
    assert_matches(
        jax.grad(lambda z: fj.softmax_cross_entropy(z, t)[0])(z),
        jax.grad(lambda z: optax.softmax_cross_entropy(z, t)[0])(z),
    )
    where = np.array([[True, True, False], [True, True, True]])
    theirs = jax.grad(lambda t: optax.softmax_cross_entropy(YS, t, where=where[:2]).sum())(TS)
    ours = jax.grad(lambda t: fj.softmax_cross_entropy(YS, t, where=where[:2]).sum())(TS)
    assert np.isnan(theirs[0, 2]) and ours[0, 2] == 0
    assert_matches(ours[where[:2]], theirs[where[:2]])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fj.softmax_cross_entropy_with_integer_labels(YS, TS),
            TypeError,
            "labels must be integer class indices",
        ),
        (
            lambda: fj.softmax_cross_entropy_with_integer_labels(INTEGER_TS, INTEGER_TS),
            TypeError,
            "logits must be float16",
        ),
        (lambda: fj.softmax_cross_entropy(INTEGER_TS[:, None], TS), TypeError, "logits must be float16"),
        (lambda: fj.safe_softmax_cross_entropy(INTEGER_TS[:, None], TS), TypeError, "logits must be float16"),
        (
            lambda: fj.softmax_cross_entropy_with_integer_labels(YS, INTEGER_TS, axis=None),
            ValueError,
            "axis must be an int or a tuple",
        ),
        (
            lambda: fj.softmax_cross_entropy_with_integer_labels(YS, INTEGER_TS, axis=[0]),
            ValueError,
            "axis must be an int or a tuple",
        ),
        (
            lambda: fj.softmax_cross_entropy_with_integer_labels(YS, INTEGER_TS, axis=2),
            ValueError,
            "axis 2 is out of range",
        ),
        (lambda: fj.softmax_cross_entropy(YS, TS, axis=(0, 0)), ValueError, "repeats an axis"),
        (lambda: fj.softmax_cross_entropy(YS, TS[None], axis=1), ValueError, "counted from the end"),
        (lambda: fj.softmax_cross_entropy(YS, np.ones((2, 4))), ValueError, "[Ii]ncompatible shapes"),
    ],
)
def test_bad_arguments_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()
