"""Runs the fused JAX losses on 8 virtual CPU devices under several shardings and prints
"RESULT {json}": per case, the loss and gradients' largest relative difference from the
same function on one device, the elements its compiled step moves between devices and its
temporary bytes per device (and the jax.numpy reference's), whether any collective gathers
the logits, and the gradient's sharding. Run in a fresh process (tests/jax/test_sharding.py):
the device count is fixed when JAX starts."""

import json
import os
import re

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from fused_xent.jax import _composite  # noqa: E402
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


def _losses(classes):
    """name: (loss of (z, labels), labels kind, jnp reference or None)."""
    weights = np.linspace(0.5, 2.0, classes).astype(np.float32)
    return {
        "sparse": (lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z).mean(), "y", _reference_sparse),
        "sparse, every option": (
            lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(
                y, z, label_smoothing=0.1, z_loss=1e-3, ignore_index=0, class_weights=weights
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


def _composite_references(classes):
    """The jax.numpy formulas of the option losses (jax/_composite.py), for what a step moves."""
    weights = jnp.asarray(np.linspace(0.5, 2.0, classes).astype(np.float32))
    return {
        "sparse, every option": lambda y, z: _composite.sparse((-1, 0.1, 1e-3, 0, 0.0), z, y, weights).sum(),
        "dense, smoothing": lambda t, z: _composite.dense((-1, 0.05, 1e-3, 0.0), z, t).sum(),
    }


LOSSES = _losses(C)


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


# ---------------------------------------------------------------- uneven class shards
#
# A jax.Array cannot be split unevenly, but XLA splits values inside a program so: ceil(C / n)
# columns a shard, the last ones padded. So the steps below shard inside jit: the logits of a
# head h @ W whose classes W's sharding constraint splits (a training step: gradients of h and
# W come out), and for the logits' own gradient, the logits under a sharding constraint.

HIDDEN = 4


def _uneven_case(mesh, row_axes, class_axes, loss_name, classes, dtype=np.float32, rows=N):
    loss, kind, reference = _losses(classes)[loss_name]
    reference = reference or _composite_references(classes)[loss_name]
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((rows, HIDDEN)), dtype)
    w = jnp.asarray(1.5 * rng.standard_normal((HIDDEN, classes)), dtype)
    _, y, t = _data((rows, classes))
    labels = y if kind == "y" else t
    z_sharding = NamedSharding(mesh, P(row_axes, class_axes))
    label_sharding = z_sharding if kind == "t" else NamedSharding(mesh, P(row_axes))

    def constrained(x, sharding, sharded):
        return jax.lax.with_sharding_constraint(x, sharding) if sharded else x

    def head_step(fn, sharded):
        def head(h, w, labels):
            h = constrained(h, NamedSharding(mesh, P(row_axes, None)), sharded)
            w = constrained(w, NamedSharding(mesh, P(None, class_axes)), sharded)
            z = constrained(h @ w, z_sharding, sharded)
            return fn(z, constrained(labels, label_sharding, sharded))

        return jax.jit(jax.value_and_grad(head, argnums=(0, 1)))

    def logits_step(sharded):
        def on_logits(z, labels):
            z = constrained(z * 1, z_sharding, sharded)
            return loss(z, constrained(labels, label_sharding, sharded))

        return jax.jit(jax.value_and_grad(on_logits, argnums=(0,) if kind == "y" else (0, 1)))

    expected_value, expected_grads = head_step(loss, False)(h, w, labels)
    value, grads = head_step(loss, True)(h, w, labels)
    z = h @ w
    expected_z_value, expected_z_grads = logits_step(False)(z, labels)
    z_value, z_grads = logits_step(True)(z, labels)
    compiled = head_step(loss, True).lower(h, w, labels).compile()
    hlo = compiled.as_text()
    ref_compiled = head_step(lambda z, labels: reference(labels, z).mean(), True).lower(h, w, labels).compile()
    shards = int(np.prod([mesh.shape[a] for a in _axes(class_axes)]))
    row_shards = int(np.prod([mesh.shape[a] for a in _axes(row_axes)]))
    moved, ops = _moved(hlo)
    return {
        "value_error": max(_max_relative(value, expected_value), _max_relative(z_value, expected_z_value)),
        "grad_error": max(
            max(_max_relative(g, e) for g, e in zip(grads, expected_grads)),
            max(_max_relative(g, e) for g, e in zip(z_grads, expected_z_grads)),
        ),
        "moved": moved,
        "collectives": ops,
        "gathers_logits": any(op == "all-gather" and e >= z.size // 8 for op, e in collectives(hlo)),
        # The backward kernels' gradients: each device's rows and at most its ceil(C / n) classes.
        "grad_shapes": backward_shapes(hlo),
        "local_shape": [rows // row_shards, -(-classes // shards)],
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "reference_moved": _moved(ref_compiled.as_text())[0],
        "reference_temp_bytes": ref_compiled.memory_analysis().temp_size_in_bytes,
        "rows": rows,
        "dtype": np.dtype(dtype).name,
    }


def _axes(entry):
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


_BACKWARD = re.compile(r"= \(?\w+\[([\d,]*)\].*custom-call\(.*custom_call_target=\"fused_xent_\w*backward\w*\"")


def backward_shapes(hlo):
    """The logits-shaped results of the compiled program's fused backward calls."""
    return sorted({tuple(int(d) for d in m.group(1).split(",")) for m in map(_BACKWARD.search, hlo.splitlines()) if m})


def _uneven_values(mesh, spec, loss_name, shape, axis):
    """Values and gradients only, for a class axis that is not the last: the logits under a
    sharding constraint."""
    loss, kind, _ = _losses(shape[axis])[loss_name]
    z, y, t = _data(shape, axis)
    labels = y if kind == "y" else t
    loss = _on_axis(loss_name, axis)
    rows_spec = P(*(s for d, s in enumerate(spec) if d != axis % len(shape)))

    def step(sharded):
        def on_logits(z, labels):
            if sharded:
                z = jax.lax.with_sharding_constraint(z * 1, NamedSharding(mesh, spec))
                labels = jax.lax.with_sharding_constraint(
                    labels, NamedSharding(mesh, spec if kind == "t" else rows_spec)
                )
            return loss(z, labels)

        return jax.jit(jax.value_and_grad(on_logits, argnums=(0,) if kind == "y" else (0, 1)))

    expected_value, expected_grads = step(False)(z, labels)
    value, grads = step(True)(z, labels)
    return {
        "value_error": _max_relative(value, expected_value),
        "grad_error": max(_max_relative(g, e) for g, e in zip(grads, expected_grads)),
        "dtype": "float32",
    }


def uneven_cases():
    grid = _mesh((4, 2), ("data", "model"))
    model = rows_named("model")
    cases = {}
    for loss_name in LOSSES:
        cases[f"2001 classes over 8/{loss_name}"] = _uneven_case(model, None, "model", loss_name, 2001)
        cases[f"rows x 1999 classes over 2/{loss_name}"] = _uneven_case(grid, "data", "model", loss_name, 1999)
        cases[f"5 classes over 8/{loss_name}"] = _uneven_case(model, None, "model", loss_name, 5)
    for loss_name in ("sparse, every option", "dense, smoothing"):
        cases[f"2001 classes over two mesh axes/{loss_name}"] = _uneven_case(
            grid, None, ("data", "model"), loss_name, 2001
        )
        cases[f"9 classes over 8/{loss_name}"] = _uneven_case(model, None, "model", loss_name, 9)
    cases["rows x 1999 classes over 2, bfloat16/sparse, every option"] = _uneven_case(
        grid, "data", "model", "sparse, every option", 1999, jnp.bfloat16
    )
    cases["rows x 1999 classes over 2, bfloat16/dense, smoothing"] = _uneven_case(
        grid, "data", "model", "dense, smoothing", 1999, jnp.bfloat16
    )
    # Larger, so that the temporaries are more than the 1 MiB allowance: 2 MiB of logits a device.
    for loss_name in ("sparse", "dense"):
        cases[f"512 x 8001 classes over 8/{loss_name}"] = _uneven_case(model, None, "model", loss_name, 8001, rows=512)
    values = {
        "1999 classes over 8, class axis 1/sparse": (model, P(None, "model", None), "sparse", (4, 1999, 16), 1),
        "rows x 1999 classes over 2, class axis 1/dense": (grid, P(None, "model", "data"), "dense", (4, 1999, 16), 1),
    }
    value_cases = {name: _uneven_values(*args) for name, args in values.items()}
    value_cases["320 classes over 8, a shard's logits all -inf"] = _masked_shard(320)
    value_cases["2001 classes over 8, a shard's logits all -inf"] = _masked_shard(2001)
    return cases, value_cases


def _masked_shard(classes):
    """Rows whose logits are -inf on all of one shard's classes (a masked vocabulary block), the
    labels elsewhere: the loss stays finite and equal to the one-device call's (a shard with no
    target share adds nothing, though its lse is -inf)."""
    mesh = rows_named("model")
    width = -(-classes // 8)
    z, y, _ = _data((16, classes))
    z[:4, width : 2 * width] = -np.inf  # shard 1, the labels below are on shard 0
    z[4:8, 7 * width :] = -np.inf  # the last shard (uneven: fewer columns)
    y[:8] = np.arange(8)

    def loss(sharded):
        def total(z, y):
            if sharded:
                z = jax.lax.with_sharding_constraint(z * 1, NamedSharding(mesh, P(None, "model")))
            return fj.sparse_softmax_cross_entropy_with_logits(y, z, z_loss=1e-3).sum()

        return jax.jit(jax.value_and_grad(total))

    (value, grad), (expected_value, expected_grad) = loss(True)(z, y), loss(False)(z, y)
    return {
        "value_error": _max_relative(value, expected_value),
        "grad_error": _max_relative(grad, expected_grad),
        "finite": bool(np.isfinite(value)),
        "dtype": "float32",
    }


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


def _bad_label_error_uneven(mesh, spec, classes, bad_row):
    """An out-of-range label in `bad_row` with classes the class shards do not divide: every
    device raises, those without any classes too (else the others would wait for them)."""
    z, y, _ = _data((N, classes))
    y[bad_row] = classes + 5

    def loss(z, y):
        z = jax.lax.with_sharding_constraint(z * 1, NamedSharding(mesh, spec))
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(spec[0])))
        return fj.sparse_softmax_cross_entropy_with_logits(y, z).sum()

    try:
        jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(z, y))
    except Exception as error:  # noqa: BLE001
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
    uneven, uneven_values = uneven_cases()
    result = {
        "cases": cases,
        "uneven_cases": uneven,
        "uneven_values": uneven_values,
        "bad_label_error": _bad_label_error(rows),
        "bad_label_error_classes": _bad_label_error(grid, P("data", "model")),
        "bad_label_error_uneven": _bad_label_error_uneven(rows_named("model"), P(None, "model"), 2001, 61),
        "bad_label_error_uneven_empty_shards": _bad_label_error_uneven(grid, P(None, ("data", "model")), 5, 3),
        "devices": len(jax.devices()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
