"""fused_xent.jax: losses and gradients (jax.grad, under jax.jit) against the float64
reference and against JAX's own cross-entropy; gradients and second derivatives
by finite differences in float64; validation and bad labels.

float64 needs jax_enable_x64: those tests turn it on around themselves only, and
one test checks the default (x64 off), where the kernels' float64 logsumexp
still passes between forward and backward.
"""

import os

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import (
    ToleranceError,
    assert_rows_close,
    dense_target_terms,
    label_gradient_terms,
    target_terms,
)
from tests._support.framework_cases import DTYPES, SPARSE_OPTIONS, WEIGHTS, C, dense_case, f64, logits, sparse_case

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)
fj = pytest.importorskip("fused_xent.jax")

PLATFORM = os.environ.get("FUSED_XENT_JAX_PLATFORM", "cpu")
try:
    DEVICE = jax.devices("gpu" if PLATFORM == "cuda" else "cpu")[0]
except RuntimeError:
    pytest.skip(f"JAX has no {PLATFORM} device here", allow_module_level=True)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _put(a):
    return jax.device_put(a, DEVICE)


def sparse_loss_and_grad(labels, z, g, **options):
    """(loss, d sum(loss * g)/dz) through jax.jit and jax.vjp."""

    @jax.jit
    def run(z, y, g):
        loss, vjp = jax.vjp(lambda z: fj.sparse_softmax_cross_entropy_with_logits(y, z, **options), z)
        return loss, vjp(g)[0]

    return [np.array(r) for r in run(_put(z), _put(labels), _put(g))]


def dense_loss_and_grads(t, z, g, **options):
    @jax.jit
    def run(z, t, g):
        loss, vjp = jax.vjp(lambda z, t: fj.softmax_cross_entropy_with_logits(t, z, **options), z, t)
        return (loss, *vjp(g))

    return [np.array(r) for r in run(_put(z), _put(t), _put(g))]


@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [-1, 1])
def test_sparse_matches_reference(dtype, options, axis):
    shape, z, labels, g = sparse_case(dtype, options, axis)
    loss, grad = sparse_loss_and_grad(labels, z, g, axis=axis, **options)
    assert loss.dtype == z.dtype and grad.dtype == z.dtype
    ref_loss, ref_grad = reference.sparse(labels, f64(z), axis=axis, grad_loss=f64(g), **options)
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = target_terms(labels, shape, axis, grad_loss=f64(g), **options)
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_dense_matches_reference(dtype, axis):
    shape, z, t, g = dense_case(dtype, axis)
    options = dict(label_smoothing=0.125, z_loss=0.0625)
    loss, grad, grad_t = dense_loss_and_grads(t, z, g, axis=axis, **options)
    ref_loss, ref_grad, ref_grad_t = reference.dense(f64(t), f64(z), axis=axis, grad_loss=f64(g), **options)
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = dense_target_terms(f64(t), shape, axis, label_smoothing=0.125, grad_loss=f64(g))
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")
    terms_t = label_gradient_terms(f64(z), f64(g), 0.125, axis=axis)
    assert_rows_close(grad_t, ref_grad_t, dtype, axis=axis, terms=terms_t, what="label gradient")


def test_default_x64_off_float32():
    """The default configuration: float32 logits, int32 labels, lse still float64 inside."""
    z = logits((6, C), "float32")
    labels = np.array([0, 1, 2, 3, 4, 6], np.int32)
    with jax.enable_x64(False):
        loss, grad = jax.jit(
            jax.value_and_grad(lambda z: fj.sparse_softmax_cross_entropy_with_logits(labels, z).sum())
        )(z)
    ref_loss, ref_grad = reference.sparse(labels, f64(z))
    assert_rows_close(loss, ref_loss.sum(), "float32", axis=None, scale=C)
    assert_rows_close(grad, ref_grad, "float32", terms=target_terms(labels, z.shape))


# ---------------------------------------------------------------- against JAX's own cross-entropy


def jax_sparse(labels, z, axis=-1):
    log_p = jax.nn.log_softmax(z, axis=axis)
    return -jnp.squeeze(jnp.take_along_axis(log_p, jnp.expand_dims(labels, axis), axis=axis), axis)


def assert_matches_jax(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_matches_jax_cross_entropy():
    z = logits((16, 3, 11), "float32", seed=5)
    labels = np.random.default_rng(6).integers(0, 11, size=(16, 3))
    ours = jax.jit(jax.value_and_grad(lambda z: fj.sparse_softmax_cross_entropy_with_logits(labels, z).mean()))(z)
    theirs = jax.jit(jax.value_and_grad(lambda z: jax_sparse(labels, z).mean()))(z)
    for a, b in zip(ours, theirs):
        assert_matches_jax(a, b)
    # dense labels along axis 1
    zt = np.moveaxis(z, 2, 1)
    t = jax.nn.one_hot(labels, 11, axis=1)
    ours = jax.grad(lambda z: fj.softmax_cross_entropy_with_logits(t, z, axis=1).sum())(zt)
    theirs = jax.grad(lambda z: jax_sparse(labels, z, axis=1).sum())(zt)
    assert_matches_jax(ours, theirs)


def test_jax_comparison_rejects_planted_error():
    z = logits((8, C), "float32")
    labels = np.arange(8) % C
    theirs = np.asarray(jax.grad(lambda z: jax_sparse(labels, z).sum())(z))
    ours = np.array(jax.grad(lambda z: fj.sparse_softmax_cross_entropy_with_logits(labels, z).sum())(z))
    assert_matches_jax(ours, theirs)
    ours[3, 2] += 1e-4
    with pytest.raises(AssertionError):
        assert_matches_jax(ours, theirs)


def test_reference_comparison_rejects_planted_error():
    z = logits((4, C), "float32")
    labels = np.array([0, 1, 2, 3])
    loss, grad = sparse_loss_and_grad(labels, z, np.ones(4, np.float32))
    _, ref_grad = reference.sparse(labels, f64(z))
    terms = target_terms(labels, z.shape)
    assert_rows_close(grad, ref_grad, "float32", terms=terms)
    smallest = np.unravel_index(np.argmin(np.abs(ref_grad)), ref_grad.shape)
    grad[smallest] *= np.float32(1.01)
    with pytest.raises(ToleranceError):
        assert_rows_close(grad, ref_grad, "float32", terms=terms)


# ---------------------------------------------------------------- finite differences (float64)


def assert_directional_derivatives(f, df, x, rng, step=1e-5, rtol=1e-6, probes=4):
    """df(x) . d against the central difference of f along random directions d."""
    for _ in range(probes):
        d = rng.normal(size=x.shape)
        numeric = (f(x + step * d) - f(x - step * d)) / (2 * step)
        analytic = float(np.sum(np.asarray(df(x)) * d))
        assert abs(numeric - analytic) <= rtol * max(1.0, abs(numeric)), (numeric, analytic)


@pytest.mark.parametrize("options", SPARSE_OPTIONS[1:], ids=["smoothing,z_loss", "ignore,weights"])
def test_sparse_gradient_and_hessian_by_finite_differences(options):
    rng = np.random.default_rng(7)
    z0 = rng.normal(size=(4, 5, 3)) * 2
    labels = rng.integers(0, 5, size=(4, 3))
    if "ignore_index" in options:
        labels[0, 1] = -100
        options = dict(options, class_weights=WEIGHTS[:5])
    g = rng.normal(size=(4, 3))
    f = jax.jit(lambda z: jnp.sum(fj.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, **options) * g))
    df = jax.jit(jax.grad(f))
    assert_directional_derivatives(lambda z: float(f(z)), df, z0, rng)
    # second order: each component of the gradient along directions, and grad(|grad|^2)
    v = rng.normal(size=z0.shape)
    gv = jax.jit(lambda z: jnp.sum(df(z) * v))
    assert_directional_derivatives(lambda z: float(gv(z)), jax.grad(gv), z0, rng)
    hessian = jax.hessian(f)(z0)
    h_v = np.einsum("ijkabc,abc->ijk", np.asarray(hessian), v)
    np.testing.assert_allclose(h_v, np.asarray(jax.grad(gv)(z0)), rtol=1e-10, atol=1e-12)


def test_dense_gradients_by_finite_differences():
    rng = np.random.default_rng(8)
    z0 = rng.normal(size=(5, 6)) * 2
    t0 = rng.random((5, 6))
    g = rng.normal(size=5)
    options = dict(label_smoothing=0.2, z_loss=0.1)
    f = jax.jit(lambda z, t: jnp.sum(fj.softmax_cross_entropy_with_logits(t, z, **options) * g))
    grads = jax.jit(jax.grad(f, (0, 1)))
    assert_directional_derivatives(lambda z: float(f(z, t0)), lambda z: grads(z, t0)[0], z0, rng)
    assert_directional_derivatives(lambda t: float(f(z0, t)), lambda t: grads(z0, t)[1], t0, rng)
    # second order, mixed: d/dt of grad_z . v and d/dz of grad_t . v
    v = rng.normal(size=z0.shape)
    gz_v = lambda z, t: jnp.sum(grads(z, t)[0] * v)  # noqa: E731
    gt_v = lambda z, t: jnp.sum(grads(z, t)[1] * v)  # noqa: E731
    assert_directional_derivatives(lambda t: float(gz_v(z0, t)), lambda t: jax.grad(gz_v, 1)(z0, t), t0, rng)
    assert_directional_derivatives(lambda z: float(gt_v(z, t0)), lambda z: jax.grad(gt_v, 0)(z, t0), z0, rng)
    assert_directional_derivatives(lambda z: float(gz_v(z, t0)), lambda z: jax.grad(gz_v, 0)(z, t0), z0, rng)


def test_finite_difference_check_rejects_planted_error():
    rng = np.random.default_rng(9)
    z0 = rng.normal(size=(3, 5))
    labels = np.array([0, 4, 2])
    f = lambda z: float(jnp.sum(fj.sparse_softmax_cross_entropy_with_logits(labels, z)))  # noqa: E731
    df = jax.grad(lambda z: jnp.sum(fj.sparse_softmax_cross_entropy_with_logits(labels, z)))
    assert_directional_derivatives(f, df, z0, rng)
    with pytest.raises(AssertionError):
        assert_directional_derivatives(f, lambda z: np.asarray(df(z)) * (1 + 1e-4), z0, rng)


def test_value_and_grad_under_an_outer_grad():
    """The loss value of value_and_grad stays differentiable (its tangent is not dropped)."""
    rng = np.random.default_rng(10)
    z0 = rng.normal(size=(3, 5))
    labels = np.array([0, 4, 2])
    f = lambda z: jnp.sum(fj.sparse_softmax_cross_entropy_with_logits(labels, z))  # noqa: E731
    outer = jax.grad(lambda z: jax.value_and_grad(f)(z)[0])(z0)
    np.testing.assert_allclose(outer, jax.grad(lambda z: jnp.sum(jax_sparse(labels, z)))(z0), rtol=1e-12)


def test_vmap():
    z = logits((3, 4, C), "float64")
    labels = np.random.default_rng(11).integers(0, C, size=(3, 4))
    batched = jax.vmap(fj.sparse_softmax_cross_entropy_with_logits)(labels, z)
    assert_rows_close(batched, reference.sparse(labels, z)[0], "float64", axis=None)
    grads = jax.vmap(jax.grad(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).sum()))(z, labels)
    assert_rows_close(grads, reference.sparse(labels, z)[1], "float64", terms=target_terms(labels, z.shape))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gradient_of_intermediate_logits(kind):
    """Logits computed in the program (x @ w): the backward call writes a buffer of its own (no
    aliasing, docs/xla.md#the-gradients-buffer), nothing is copied, and the values stay right."""
    rng = np.random.default_rng(12)
    x, w = rng.normal(size=(6, 4)), rng.normal(size=(4, C))
    labels = rng.integers(0, C, size=6)
    targets = rng.dirichlet(np.ones(C), size=6)
    if kind == "sparse":
        ours = lambda z: fj.sparse_softmax_cross_entropy_with_logits(labels, z)  # noqa: E731
        theirs = lambda z: jax_sparse(labels, z)  # noqa: E731
    else:
        ours = lambda z: fj.softmax_cross_entropy_with_logits(targets, z)  # noqa: E731
        theirs = lambda z: -jnp.sum(targets * jax.nn.log_softmax(z), -1)  # noqa: E731
    step = jax.jit(jax.grad(lambda w: jnp.sum(ours(x @ w) * jnp.arange(1.0, 7.0))))
    hlo = step.lower(w).compile().as_text()
    backward = [line for line in hlo.splitlines() if f"fused_xent_{kind}_backward" in line and "custom-call(" in line]
    assert len(backward) == 1 and "output_to_operand_aliasing" not in backward[0], backward
    assert " copy(" not in hlo
    expected = jax.grad(lambda w: jnp.sum(theirs(x @ w) * jnp.arange(1.0, 7.0)))(w)
    np.testing.assert_allclose(step(w), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- errors


def test_out_of_range_label_raises_the_handlers_error():
    if PLATFORM != "cpu":
        pytest.skip("CUDA handlers give NaN rows for bad labels")
    z = logits((4, C), "float32")
    message = r"label value of 9 which is outside the valid range of \[0, 7\)"
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax.jit(fj.sparse_softmax_cross_entropy_with_logits)(np.array([0, 9, 2, 3]), z))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(fj.sparse_softmax_cross_entropy_with_logits(np.array([0, 9, 2, 3]), z))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(labels=np.zeros(4, np.float32)), TypeError, "labels must be int32 or int64 class indices"),
        (dict(logits=np.zeros((4, C), np.int32)), TypeError, "logits must be float16, bfloat16, float32 or float64"),
        (dict(labels=np.zeros(5, np.int32)), ValueError, "`labels.shape` must equal `logits.shape` except"),
        (dict(labels=np.zeros((4, 1), np.int32)), ValueError, "`labels.shape.rank` must equal"),
        (dict(axis=2), ValueError, "axis 2 is out of range for logits of rank 2"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be a finite number >= 0"),
        (dict(class_weights=np.ones(3)), ValueError, "class_weights has 3 entries but logits have 7 classes"),
        (
            dict(class_weights=np.where(np.arange(C) == 3, np.nan, 1.0)),
            ValueError,
            "class_weights must be finite and >= 0, got nan for class 3",
        ),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer or None"),
    ],
)
def test_bad_arguments_raise_like_tensorflow(kwargs, error, message):
    arguments = dict(labels=np.array([0, 1, 2, 3], np.int32), logits=logits((4, C), "float32"))
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        fj.sparse_softmax_cross_entropy_with_logits(arguments.pop("labels"), arguments.pop("logits"), **arguments)


def test_dense_labels_broadcast_or_raise():
    z = logits((4, C), "float32")
    t = np.full((C,), 1.0 / C, np.float32)
    loss = fj.softmax_cross_entropy_with_logits(t, z)
    assert_rows_close(loss, reference.dense(np.broadcast_to(t, z.shape), f64(z))[0], "float32", axis=None)
    with pytest.raises(ValueError, match="logits and labels must be broadcastable"):
        fj.softmax_cross_entropy_with_logits(np.ones((3, C)), z)
