"""Forward-mode autodiff of fused_xent.jax: jax.jvp, jacfwd, linearize and forward-over-reverse
Hessian-vector products against the same losses written in jax.numpy (float64), for sparse and
dense labels (the labels' tangent too) and every option; and reverse mode still runs exactly
the fused forward and backward kernels."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)

N, C = 6, 9
EPS, LAM, IGNORE = 0.125, 2.0**-7, 4
WEIGHTS = np.linspace(0.5, 1.5, C)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal((N, C))
    y = rng.integers(0, C, N)
    y[2] = IGNORE
    t = rng.dirichlet(np.ones(C), N)
    return z, y, t, rng.standard_normal((N, C)), rng.standard_normal((N, C))


def _sparse_ref(z, y):
    """The sparse loss in jax.numpy: the reference (smoothing, z-loss, ignore_index, weights)."""
    lse = jax.nn.logsumexp(z, -1)
    q = (1 - EPS) * jax.nn.one_hot(jnp.where(y == IGNORE, 0, y), C, dtype=z.dtype) + EPS / C
    loss = jnp.asarray(WEIGHTS)[jnp.where(y == IGNORE, 0, y)] * (jnp.sum(q * (lse[:, None] - z), -1) + LAM * lse**2)
    return jnp.where(y == IGNORE, 0.0, loss)


def _sparse(z, y):
    options = dict(label_smoothing=EPS, z_loss=LAM, ignore_index=IGNORE, class_weights=WEIGHTS)
    return fj.sparse_softmax_cross_entropy_with_logits(y, z, **options)


def _dense_ref(z, t):
    lse = jax.nn.logsumexp(z, -1)
    q = (1 - EPS) * t + EPS / C
    return jnp.sum(q * (lse[:, None] - z), -1) + LAM * lse**2


def _dense(z, t):
    return fj.softmax_cross_entropy_with_logits(t, z, label_smoothing=EPS, z_loss=LAM)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_jvp_sparse(x64):
    z, y, _, dz, _ = _data()
    value, tangent = jax.jvp(lambda z: _sparse(z, y), (z,), (dz,))
    want_value, want_tangent = jax.jvp(lambda z: _sparse_ref(z, y), (z,), (dz,))
    np.testing.assert_allclose(value, want_value, rtol=1e-6)  # the kernels' float32 options
    np.testing.assert_allclose(tangent, want_tangent, rtol=1e-6, atol=1e-12)


def test_jvp_dense_with_the_labels_tangent(x64):
    z, _, t, dz, dt = _data(1)
    got = jax.jvp(_dense, (z, t), (dz, dt))
    want = jax.jvp(_dense_ref, (z, t), (dz, dt))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_the_comparison_rejects_a_wrong_tangent(x64):
    z, y, _, dz, _ = _data()
    _, tangent = jax.jvp(lambda z: _sparse(z, y), (z,), (dz,))
    _, want = jax.jvp(lambda z: _sparse_ref(z, y), (z,), (dz,))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(tangent * (1 + 1e-5), want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_jacfwd_equals_jacrev(kind, x64):
    z, y, t, _, _ = _data(2)
    f = (lambda z: _sparse(z, y)) if kind == "sparse" else (lambda z: _dense(z, t))
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(z), jax.jacrev(f)(z), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_forward_over_reverse_hessian_vector_product(kind, x64):
    z, y, t, v, _ = _data(3)
    f = (lambda z: _sparse(z, y).sum()) if kind == "sparse" else (lambda z: _dense(z, t).sum())
    ref = (lambda z: _sparse_ref(z, y).sum()) if kind == "sparse" else (lambda z: _dense_ref(z, t).sum())
    hvp = jax.jvp(jax.grad(f), (z,), (v,))[1]
    np.testing.assert_allclose(hvp, jax.jvp(jax.grad(ref), (z,), (v,))[1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(hvp, jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(z), rtol=1e-12, atol=1e-14)


def test_forward_over_forward(x64):
    z, y, _, _, _ = _data(4)
    f = lambda z: _sparse(z, y).sum()  # noqa: E731
    np.testing.assert_allclose(jax.jacfwd(jax.jacfwd(f))(z), jax.hessian(f)(z), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_check_grads_both_modes_to_second_order(kind, x64):
    z, y, t, _, _ = _data(5)
    if kind == "sparse":
        check_grads(lambda z: _sparse(z, y), (z,), order=2, modes=["fwd", "rev"])
    else:
        check_grads(_dense, (z, t), order=2, modes=["fwd", "rev"])


def test_linearize_and_vmap_of_jvp(x64):
    z, y, _, dz, _ = _data(6)
    _, linear = jax.linearize(lambda z: _sparse(z, y), z)
    want = jax.jvp(lambda z: _sparse_ref(z, y), (z,), (dz,))[1]
    np.testing.assert_allclose(linear(dz), want, rtol=1e-6, atol=1e-12)
    batched = jax.vmap(lambda z, dz: jax.jvp(lambda z: _sparse(z, y), (z,), (dz,))[1])(
        jnp.stack([z, -z]), jnp.stack([dz, dz])
    )
    np.testing.assert_allclose(batched[0], want, rtol=1e-6, atol=1e-12)


def test_the_optax_style_functions():
    z, y, t, dz, _ = (jnp.asarray(a, jnp.float32) for a in _data(7))
    y = y.astype(jnp.int32)
    got = jax.jvp(lambda z: fj.softmax_cross_entropy_with_integer_labels(z, y), (z,), (dz,))[1]
    want = jax.jvp(lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], -1)[:, 0], (z,), (dz,))[1]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    got = jax.jvp(lambda z: fj.softmax_cross_entropy(z, t), (z,), (dz,))[1]
    want = jax.jvp(lambda z: -jnp.sum(t * jax.nn.log_softmax(z), -1), (z,), (dz,))[1]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_reverse_mode_runs_the_two_fused_kernels_only():
    """jit(grad): one forward and one backward custom call, and no elementwise pass of the logits'
    size beyond them (the tangent primitive transposes into the backward kernel)."""
    z = jax.ShapeDtypeStruct((256, 1000), jnp.float32)
    y = jax.ShapeDtypeStruct((256,), jnp.int32)
    step = jax.jit(jax.grad(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean()))
    hlo = step.lower(z, y).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom-call" in line and "fused_xent" in line]
    assert len([c for c in calls if "fused_xent_sparse_forward" in c]) == 1, calls
    assert len([c for c in calls if "fused_xent_sparse_backward" in c]) == 1, calls
    fusions = [line for line in hlo.splitlines() if " fusion(" in line and "f32[256,1000]" in line.split("=")[1][:40]]
    assert fusions == [], fusions


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
def test_forward_mode_lowers_to_the_composite_elsewhere(platform):
    z, y, _, dz, _ = (jnp.asarray(a, jnp.float32) for a in _data(8))
    y = y.astype(jnp.int32)

    def program(z, dz):
        return jax.jvp(lambda z: _sparse(z, y), (z,), (dz,))

    with jax.enable_x64(False):
        text = jax.jit(program).trace(z, dz).lower(lowering_platforms=(platform,)).as_text()
    assert "fused_xent" not in text
