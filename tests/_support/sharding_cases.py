"""Runs the fused JAX losses on 8 virtual CPU devices under several shardings and prints
"RESULT {json}": per case, the loss and gradients' largest relative difference from the
same function on one device, the elements its compiled step moves between devices and its
temporary bytes per device (and the jax.numpy reference's), whether any collective gathers
the logits, and the gradient's sharding. Run in a fresh process (tests/jax/test_sharding.py):
the device count is fixed when JAX starts."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from tests._support.hlo_collectives import collectives  # noqa: E402

N, C = 64, 320


def _data(shape, axis=-1, seed=0):
    rng = np.random.default_rng(seed)
    z = (3 * rng.standard_normal(shape)).astype(np.float32)
    rows = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    y = rng.integers(0, shape[axis], rows).astype(np.int32)
    t = rng.dirichlet(np.ones(shape[axis]), rows).astype(np.float32)
    return z, y, np.moveaxis(t, -1, axis)


def _reference_sparse(y, z):
    return -jnp.take_along_axis(jax.nn.log_softmax(z, -1), y[:, None], -1)[:, 0]


def _reference_dense(t, z):
    return -jnp.sum(t * jax.nn.log_softmax(z, -1), -1)


WEIGHTS = np.linspace(0.5, 2.0, C).astype(np.float32)
LOSSES = {
    # name: (loss of (z, labels), labels kind, jnp reference or None, differentiate labels too)
    "sparse": (lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean(), "y", _reference_sparse),
    "sparse, every option": (
        lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(
            y, z, label_smoothing=0.1, z_loss=1e-3, ignore_index=0, class_weights=WEIGHTS
        ).sum(),
        "y",
        None,
    ),
    "dense": (lambda z, t: fj.softmax_cross_entropy_with_logits(t, z).mean(), "t", _reference_dense),
    "dense, smoothing": (
        lambda z, t: fj.softmax_cross_entropy_with_logits(t, z, label_smoothing=0.05, z_loss=1e-3).sum(),
        "t",
        None,
    ),
}


def _max_relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _moved(hlo):
    found = collectives(hlo)
    return sum(e for _, e in found), [op for op, _ in found]


def _case(mesh, spec, loss_name, shape=(N, C), axis=-1, dtype=np.float32):
    loss, kind, reference = LOSSES[loss_name]
    z, y, t = _data(shape, axis)
    z = jnp.asarray(z, dtype)
    labels = y if kind == "y" else t
    if axis != -1:
        loss = _on_axis(loss_name, axis)
    argnums = (0,) if kind == "y" else (0, 1)
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    expected_value, expected_grads = step(z, labels)
    z_sharding = NamedSharding(mesh, spec)
    row_spec = P(*(s for d, s in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))) if d != axis % len(shape)))
    label_sharding = z_sharding if kind == "t" else NamedSharding(mesh, row_spec)
    zs, ls = jax.device_put(z, z_sharding), jax.device_put(labels, label_sharding)
    value, grads = step(zs, ls)
    compiled = step.lower(zs, ls).compile()
    hlo = compiled.as_text()
    moved, ops = _moved(hlo)
    result = {
        "value_error": _max_relative(value, expected_value),
        "grad_error": max(_max_relative(g, e) for g, e in zip(grads, expected_grads)),
        "moved": moved,
        "collectives": ops,
        "gathers_logits": any(op == "all-gather" and e >= z.size // 8 for op, e in collectives(hlo)),
        "grad_spec": str(grads[0].sharding.spec),
        "logits_spec": str(zs.sharding.spec),
        "grad_same_sharding": grads[0].sharding.is_equivalent_to(zs.sharding, z.ndim),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "rows": int(np.prod(shape)) // shape[axis],
        "dtype": np.dtype(dtype).name,
    }
    if reference is not None and axis == -1:
        ref_step = jax.jit(jax.value_and_grad(lambda z, labels: reference(labels, z).mean()))
        ref_compiled = ref_step.lower(zs, ls).compile()
        result["reference_moved"] = _moved(ref_compiled.as_text())[0]
        result["reference_temp_bytes"] = ref_compiled.memory_analysis().temp_size_in_bytes
    return result


def _on_axis(loss_name, axis):
    if loss_name.startswith("sparse"):
        return lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z, axis=axis).mean()
    return lambda z, t: fj.softmax_cross_entropy_with_logits(t, z, axis=axis).mean()


def _uneven_classes():
    """Classes the class shards do not divide (C = 322 over 8): kept whole, so exact, and gathered."""
    mesh = rows_named("model")
    z, y, _ = _data((16, 322))

    def loss(z, y):
        z = jax.lax.with_sharding_constraint(z * 1.0, NamedSharding(mesh, P(None, "model")))
        return fj.sparse_softmax_cross_entropy_with_logits(y, z, label_smoothing=0.1).sum()

    value, grad = jax.jit(jax.value_and_grad(loss))(z, y)
    plain = jax.jit(
        jax.value_and_grad(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z, label_smoothing=0.1).sum())
    )
    expected_value, expected_grad = plain(z, y)
    return {"value_error": _max_relative(value, expected_value), "grad_error": _max_relative(grad, expected_grad)}


def _bad_label_error(mesh, spec=P("data", None)):
    z, y, _ = _data((N, C))
    y[N - 3] = C + 5
    zs = jax.device_put(z, NamedSharding(mesh, spec))
    ys = jax.device_put(y, NamedSharding(mesh, P(spec[0])))
    try:
        jax.block_until_ready(jax.jit(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).sum())(zs, ys))
    except Exception as error:  # noqa: BLE001  (the runtime's error type varies by version)
        return str(error)
    return None


def _mesh(shape, names):
    """A mesh whose axes XLA's partitioner may use as it sees fit (what jit users and Keras have)."""
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def rows_named(name):
    return _mesh((8,), (name,))


def main():
    rows = rows_named("data")
    grid = _mesh((4, 2), ("data", "model"))
    cases = {}
    for loss_name in LOSSES:
        cases[f"rows/{loss_name}"] = _case(rows, P("data", None), loss_name)
        cases[f"rows over two mesh axes/{loss_name}"] = _case(grid, P(("data", "model"), None), loss_name)
    for loss_name in ("sparse", "sparse, every option"):
        cases[f"classes/{loss_name}"] = _case(rows_named("model"), P(None, "model"), loss_name)
        cases[f"rows x classes/{loss_name}"] = _case(grid, P("data", "model"), loss_name)
        cases[f"classes over two mesh axes/{loss_name}"] = _case(grid, P(None, ("data", "model")), loss_name)
    cases["rows x classes, bfloat16/sparse, every option"] = _case(
        grid, P("data", "model"), "sparse, every option", dtype=jnp.bfloat16
    )
    cases["classes/dense"] = _case(rows_named("model"), P(None, "model"), "dense")
    cases["rows x classes/dense, smoothing"] = _case(grid, P("data", "model"), "dense, smoothing")
    cases["rows x classes, class axis 1/dense"] = _case(grid, P(None, "model", "data"), "dense", (4, C, 16), axis=1)
    cases["rows, class axis 1/sparse"] = _case(rows, P(None, None, "data"), "sparse", (4, C, 16), axis=1)
    cases["rows, class axis 1/dense"] = _case(grid, P("model", None, "data"), "dense", (4, C, 16), axis=1)
    cases["rows x classes, class axis 1/sparse"] = _case(grid, P(None, "model", "data"), "sparse", (4, C, 16), axis=1)
    result = {
        "cases": cases,
        "uneven_classes": _uneven_classes(),
        "bad_label_error": _bad_label_error(rows),
        "bad_label_error_classes": _bad_label_error(grid, P("data", "model")),
        "devices": len(jax.devices()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
