"""Platforms without our FFI handlers (TPU, ROCm, any other) get the jax.numpy composite
(jax/_composite.py) through lax.platform_dependent: a program lowered for them holds no
custom call of ours and no float64, and the composite gives the kernels' values and
gradients (compared here on the CPU, where both run)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)
fj = pytest.importorskip("fused_xent.jax")
from fused_xent.jax import _composite  # noqa: E402

N, C = 6, 7
WEIGHTS = np.linspace(0.5, 2.0, C).astype(np.float32)
SPARSE_OPTIONS = [
    {},
    dict(label_smoothing=0.1, z_loss=1e-3),
    dict(ignore_index=2, class_weights=WEIGHTS, label_smoothing=0.2),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0),
]


def _data():
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((N, C))).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int32)
    y[1] = 2
    t = rng.dirichlet(np.ones(C), N).astype(np.float32)
    return z, y, t


def _programs():
    z, y, t = _data()
    sparse = [lambda z, o=o: fj.sparse_softmax_cross_entropy_with_logits(y, z, **o).sum() for o in SPARSE_OPTIONS]
    dense = lambda z: fj.softmax_cross_entropy_with_logits(t, z, label_smoothing=0.1).sum()  # noqa: E731
    label_grad = jax.grad(lambda t: fj.softmax_cross_entropy_with_logits(t, jnp.asarray(z)).sum())
    return {
        **{f"grad sparse {i}": jax.grad(f) for i, f in enumerate(sparse)},
        "grad dense": jax.grad(dense),
        "hessian sparse": jax.hessian(sparse[1]),
        "vmap grad sparse": jax.vmap(jax.grad(sparse[0])),
        "dense label gradient": lambda z: label_grad(jnp.asarray(t)) * z,
    }, z


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
def test_lowering_for_a_platform_without_handlers_calls_none_of_ours(platform):
    programs, z = _programs()
    for name, program in programs.items():
        arg = jnp.stack([z, z]) if name.startswith("vmap") else z
        text = jax.jit(program).trace(arg).lower(lowering_platforms=(platform,)).as_text()
        assert "fused_xent" not in text, name
        assert "f64" not in text, name


def test_lowering_for_the_cpu_calls_the_kernels():
    programs, z = _programs()
    text = jax.jit(programs["grad sparse 0"]).trace(z).lower(lowering_platforms=("cpu",)).as_text()
    assert "fused_xent_sparse_forward" in text and "fused_xent_sparse_backward" in text


def _relative(a, b):
    """Largest difference over the largest finite |b|; equal infinities count as equal."""
    a, b = np.atleast_1d(np.asarray(a, np.float64)), np.atleast_1d(b)
    difference = np.where(a == b, 0.0, np.abs(a - b))
    return float(np.max(difference) / max(np.max(np.abs(b[np.isfinite(b)]), initial=0.0), 1e-30))


@pytest.mark.parametrize("options", SPARSE_OPTIONS)
def test_sparse_composite_equals_the_kernels(options):
    z, y, _ = _data()
    z[3, 4] = -np.inf
    fused = jax.value_and_grad(lambda z: fj.sparse_softmax_cross_entropy_with_logits(y, z, **options).sum())
    weights = jnp.asarray(options.get("class_weights", np.zeros([0], np.float32)))
    opts = (
        -1,
        np.float32(options.get("label_smoothing", 0.0)),
        np.float32(options.get("z_loss", 0.0)),
        options.get("ignore_index"),
        np.float32(options.get("softcap") or 0.0),
    )
    composite = jax.value_and_grad(lambda z: _composite.sparse(opts, z, jnp.asarray(y), weights).sum())
    (v0, g0), (v1, g1) = fused(z), composite(z)
    assert _relative(v1, np.asarray(v0, np.float64)) < 1e-5
    assert _relative(g1, np.asarray(g0, np.float64)) < 1e-5


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_dense_composite_equals_the_kernels(softcap):
    z, _, t = _data()
    fused = jax.value_and_grad(
        lambda z: fj.softmax_cross_entropy_with_logits(t, z, label_smoothing=0.1, z_loss=1e-3, softcap=softcap).sum()
    )
    opts = (-1, np.float32(0.1), np.float32(1e-3), np.float32(softcap or 0.0))
    composite = jax.value_and_grad(lambda z: _composite.dense(opts, z, jnp.asarray(t)).sum())
    (v0, g0), (v1, g1) = fused(z), composite(z)
    assert _relative(v1, np.asarray(v0, np.float64)) < 1e-5
    assert _relative(g1, np.asarray(g0, np.float64)) < 1e-5


def test_composite_gives_nan_for_an_out_of_range_label():
    z, y, _ = _data()
    y[0] = C + 3
    loss = _composite.sparse((-1, 0.0, 0.0, None, 0.0), jnp.asarray(z), jnp.asarray(y), jnp.zeros([0], jnp.float32))
    assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))


def test_the_comparison_rejects_a_planted_error():
    z, y, _ = _data()
    composite = _composite.sparse(
        (-1, 0.0, 0.0, None, 0.0), jnp.asarray(z), jnp.asarray(y), jnp.zeros([0], jnp.float32)
    )
    fused = fj.sparse_softmax_cross_entropy_with_logits(y, z)
    assert _relative(composite, np.asarray(fused, np.float64)) < 1e-5
    assert _relative(composite * 1.001, np.asarray(fused, np.float64)) > 1e-5
