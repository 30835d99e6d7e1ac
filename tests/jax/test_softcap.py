"""softcap in fused_xent.jax: the loss of cap * tanh(x / cap) and its derivatives in every mode
(grad, jvp, jacfwd, forward-over-reverse), against the float64 composite; under vmap; the linear
head; vocabulary-parallel on 8 virtual CPU devices (a fresh process), where the cap stays a
per-element transform inside each shard's kernel."""

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import assert_close
from tests._support.runners import run_fresh

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fused_xent.jax as fj  # noqa: E402

CAP = 3.0


def _data(shape=(6, 37), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * 5).astype(dtype)
    y = rng.integers(0, shape[-1], shape[:-1])
    t = rng.dirichlet(np.ones(shape[-1]), shape[:-1]).astype(dtype)
    return z, y, t


def _composite_sparse(y, z, eps=0.0, lam=0.0):
    capped = CAP * jnp.tanh(z / CAP)
    q = (1 - eps) * jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) + eps / z.shape[-1]
    lse = jax.nn.logsumexp(capped, -1)
    return -jnp.sum(q * jax.nn.log_softmax(capped), -1) + lam * lse * lse


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_values_and_gradient(dtype):
    z, y, t = _data()
    if dtype == "bfloat16":
        z = z.astype(jnp.bfloat16)
    options = dict(label_smoothing=0.125, z_loss=0.0009765625)
    with jax.enable_x64(dtype == "float64"):
        zz = jnp.asarray(z, dtype)
        loss, grad = jax.value_and_grad(
            lambda x: fj.sparse_softmax_cross_entropy_with_logits(y, x, softcap=CAP, **options).sum()
        )(zz)
        per_row = fj.sparse_softmax_cross_entropy_with_logits(y, zz, softcap=CAP, **options)
    expected_loss, expected_grad = reference.sparse_softcap(y, np.asarray(zz, np.float64), CAP, **options)
    scale = {"float64": 64.0, "float32": 8.0}.get(dtype, 1.0)
    assert_close(np.asarray(per_row, np.float64), expected_loss, dtype, scale=scale)
    assert_close(np.asarray(grad, np.float64), expected_grad, dtype, scale=scale)


def test_dense_gradients_to_logits_and_labels():
    z, _, t = _data(seed=1)
    fn = lambda x, u: fj.softmax_cross_entropy_with_logits(u, x, softcap=CAP, label_smoothing=0.25).sum()  # noqa: E731
    grads = jax.grad(fn, (0, 1))(jnp.asarray(z), jnp.asarray(t))
    _, expected_grad, expected_labels = reference.dense_softcap(t, z, CAP, label_smoothing=0.25)
    assert_close(np.asarray(grads[0], np.float64), expected_grad, "float32", scale=8)
    assert_close(np.asarray(grads[1], np.float64), expected_labels, "float32", scale=8)


def test_every_derivative_mode_in_float64():
    z, y, _ = _data(seed=2, dtype=np.float64)
    v = np.random.default_rng(3).standard_normal(z.shape)
    options = dict(label_smoothing=0.25, z_loss=0.125)
    with jax.enable_x64(True):
        ours = lambda x: fj.sparse_softmax_cross_entropy_with_logits(y, x, softcap=CAP, **options)  # noqa: E731
        theirs = lambda x: _composite_sparse(y, x, 0.25, 0.125)  # noqa: E731
        x, dv = jnp.asarray(z), jnp.asarray(v)
        for transform in (
            lambda f: jax.jvp(f, (x,), (dv,))[1],
            lambda f: jax.jacfwd(f)(x),
            lambda f: jax.jacrev(f)(x),
            lambda f: jax.jvp(jax.grad(lambda a: f(a).sum()), (x,), (dv,))[1],  # forward over reverse
            lambda f: jax.grad(lambda a: jnp.vdot(jax.grad(lambda b: f(b).sum())(a), dv))(x),  # reverse over reverse
        ):
            np.testing.assert_allclose(transform(ours), transform(theirs), rtol=1e-9, atol=1e-12)


def test_vmap_equals_the_stacked_calls():
    z, y, _ = _data((4, 5, 11), seed=4)
    fn = lambda x, labels: fj.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP)  # noqa: E731
    batched = jax.vmap(fn)(jnp.asarray(z), jnp.asarray(y))
    for i in range(4):
        np.testing.assert_array_equal(batched[i], fn(jnp.asarray(z[i]), jnp.asarray(y[i])))


def test_linear_head_with_softcap():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        h = jnp.asarray(rng.standard_normal((20, 6)))
        w = jnp.asarray(rng.standard_normal((6, 40)))
        b = jnp.asarray(rng.standard_normal(40))
        y = jnp.asarray(rng.integers(0, 40, 20))
        ours = lambda h, w, b: fj.linear_cross_entropy(h, w, y, bias=b, softcap=CAP, chunk_size=8).sum()  # noqa: E731
        theirs = lambda h, w, b: _composite_sparse(y, h @ w + b).sum()  # noqa: E731
        for a, e in zip(jax.value_and_grad(ours, (0, 1, 2))(h, w, b), jax.value_and_grad(theirs, (0, 1, 2))(h, w, b)):
            for got, want in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(e)):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fj.linear_logits(h, w, bias=b, softcap=CAP), CAP * jnp.tanh((h @ w + b) / CAP))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "x", True])
def test_bad_softcap_is_refused(value):
    z, y, t = _data()
    with pytest.raises(ValueError, match="softcap must be None"):
        fj.sparse_softmax_cross_entropy_with_logits(y, z, softcap=value)
    with pytest.raises(ValueError, match="softcap must be None"):
        fj.softmax_cross_entropy_with_logits(t, z, softcap=value)


_SHARDED = """
import json, os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import fused_xent.jax as fj
mesh = jax.make_mesh((2, 4), ("data", "model"))
rng = np.random.default_rng(0)
z = (rng.standard_normal((16, 64)) * 5).astype(np.float32)
y = rng.integers(0, 64, 16).astype(np.int32)
t = rng.dirichlet(np.ones(64), 16).astype(np.float32)
sparse = lambda x, l: fj.sparse_softmax_cross_entropy_with_logits(l, x, softcap=3.0, label_smoothing=0.125).sum()
dense = lambda x, u: fj.softmax_cross_entropy_with_logits(u, x, softcap=3.0, z_loss=0.125).sum()
out = {}
for name, fn, labels, labels_spec in (("sparse", sparse, y, P("data")), ("dense", dense, t, P("data", "model"))):
    one = jax.jit(jax.value_and_grad(fn))(z, labels)
    zs = jax.device_put(z, NamedSharding(mesh, P("data", "model")))
    ls = jax.device_put(labels, NamedSharding(mesh, labels_spec))
    step = jax.jit(jax.value_and_grad(fn))
    many = step(zs, ls)
    text = step.lower(zs, ls).compile().as_text()
    out[name] = dict(
        value=float(abs(many[0] - one[0]) / abs(one[0])),
        grad=float(np.abs(np.asarray(many[1]) - np.asarray(one[1])).max() / np.abs(np.asarray(one[1])).max()),
        gathers="all-gather" in text,
        grad_spec=[str(a) for a in many[1].sharding.spec],
    )
print("RESULT " + json.dumps(out))
"""


def test_vocabulary_parallel_with_softcap(tmp_path):
    from fused_xent import _core

    if not _core.ffi_targets().get("cpu"):
        pytest.skip("this build has no XLA FFI handlers")
    result = run_fresh(_SHARDED, cwd=str(tmp_path), timeout=300, JAX_PLATFORMS="cpu")
    for name, case in result.items():
        assert case["value"] < 2e-6 and case["grad"] < 2e-5, (name, case)
        assert not case["gathers"], name
        assert case["grad_spec"] == ["data", "model"], (name, case)
