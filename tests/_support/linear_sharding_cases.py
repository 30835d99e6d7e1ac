"""Runs fused_xent.jax.linear_cross_entropy on 8 virtual CPU devices under several layouts
(rows over the batch, classes over the vocabulary, both: the Megatron layout) and prints
"RESULT {json}": per case, the loss and gradients' largest relative difference from the same
function on one device, the elements one training step moves between devices (read from the
compiled HLO, loops counted by their trip counts) beside the jax.numpy reference's, the
per-device temporaries beside the per-device logits, whether any collective gathers logits-
sized data, and whether each gradient keeps its input's sharding. Run in a fresh process
(tests/jax/test_linear_sharding.py): the device count is fixed when JAX starts."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from tests._support.hlo_collectives import collectives, moved_per_step  # noqa: E402

N, H, V = 256, 32, 512
IGNORE = -100


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _data(n=N, h=H, v=V, transpose=False, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, h)), dtype)
    weight = jnp.asarray(rng.normal(size=(v, h) if transpose else (h, v)) * 0.3, dtype)
    bias = jnp.asarray(rng.normal(size=(v,)), dtype)
    labels = rng.integers(0, v, n).astype(np.int32)
    return hidden, weight, bias, labels


def _options(every, classes):
    if not every:
        return {}
    return {
        "ignore_index": IGNORE,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "class_weights": np.linspace(0.5, 1.5, classes).astype(np.float32),
    }


def _loss(transpose, options, chunk_size, upstream, weight_sharding=None):
    def total(h, w, b, y):
        if weight_sharding is not None:  # classes the shards do not divide: placed inside the step
            w = jax.lax.with_sharding_constraint(w, weight_sharding)
        loss = fj.linear_cross_entropy(h, w, y, bias=b, transpose_weight=transpose, chunk_size=chunk_size, **options)
        return jnp.mean(loss) if upstream is None else jnp.sum(loss * upstream)

    return total


def _reference(transpose, bias=True):
    """The jax.numpy head XLA partitions itself: the logits whole per device's shard."""

    def logits(h, w, b):
        z = h @ (w.T if transpose else w)
        return (z + b if bias else z).astype(jnp.float32)

    def total(h, w, *rest):
        y = rest[-1]
        z = logits(h, w, rest[0] if bias else None)
        return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])

    return total


def _max_relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _step_facts(step, args):
    compiled = step.lower(*args).compile()
    hlo = compiled.as_text()
    return hlo, compiled.memory_analysis().temp_size_in_bytes


def case(mesh, hidden_spec, weight_spec, *, transpose=False, every=False, dtype=jnp.float32, upstream=False, v=V):
    hidden, weight, bias, labels = _data(v=v, transpose=transpose, dtype=dtype)
    options = _options(every, v)
    if every:
        labels[::7] = IGNORE
    g = jnp.asarray(np.random.default_rng(1).uniform(0.2, 2.0, N), jnp.float32) if upstream else None
    class_dim = 0 if transpose else 1
    row_entry, class_entry = _entry(hidden_spec, 0), _entry(weight_spec, class_dim)
    uneven = v % _shards(mesh, class_entry) != 0
    inner = NamedSharding(mesh, weight_spec) if uneven else None
    step = jax.jit(jax.value_and_grad(_loss(transpose, options, 16, g, inner), argnums=(0, 1, 2)))
    expected_value, expected_grads = step(hidden, weight, bias, labels)
    if uneven:
        weight_spec, class_entry = P(), None
    shardings = [NamedSharding(mesh, s) for s in (hidden_spec, weight_spec, P(class_entry), P(row_entry))]
    args = [jax.device_put(x, s) for x, s in zip((hidden, weight, bias, labels), shardings)]
    value, grads = step(*args)
    hlo, temp = _step_facts(step, args)
    row_shards, class_shards = _shards(mesh, row_entry), _shards(mesh, class_entry)
    logits_per_device = (N // row_shards) * (v // class_shards) * jnp.dtype(dtype).itemsize
    result = {
        "value_error": _max_relative(value, expected_value),
        "grad_error": max(_max_relative(a, e) for a, e in zip(grads, expected_grads)),
        "moved": moved_per_step(hlo),
        "moved_recomputing": moved_per_step(hlo, max),
        "gathers_logits": any(op == "all-gather" and e >= N * v // 8 for op, e in collectives(hlo)),
        "same_shardings": [bool(gr.sharding.is_equivalent_to(a.sharding, a.ndim)) for gr, a in zip(grads, args[:3])],
        "temp_bytes": temp,
        "logits_bytes_per_device": logits_per_device,
        "rows_per_device": N // row_shards,
        "dtype": jnp.dtype(dtype).name,
    }
    if not every and not upstream and dtype == jnp.float32:
        ref_step = jax.jit(jax.value_and_grad(_reference(transpose), argnums=(0, 1, 2)))
        ref_hlo, ref_temp = _step_facts(ref_step, args)
        result["reference_moved"] = moved_per_step(ref_hlo)
        result["reference_temp_bytes"] = ref_temp
    return result


def _entry(spec, dim):
    return spec[dim] if len(spec) > dim else None


def _shards(mesh, entry):
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def memory_case(mesh):
    """A larger Megatron step with the default chunking: its per-device temporaries against
    the per-device logits (8192 x 4096 float32 over 4 x 2 devices: 16 MiB each)."""
    n, h, v = 8192, 64, 4096
    shapes = [
        jax.ShapeDtypeStruct((n, h), jnp.float32, sharding=NamedSharding(mesh, P("data", None))),
        jax.ShapeDtypeStruct((h, v), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data"))),
    ]

    def ours(hd, w, y):
        return fj.linear_cross_entropy(hd, w, y).mean()

    def temp(f):
        return jax.jit(jax.grad(f, (0, 1))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    return {
        "temp_bytes": temp(ours),
        "reference_temp_bytes": temp(_reference(False, bias=False)),
        "logits_bytes_per_device": n * v * 4 // 8,
        "weight_bytes_per_device": h * v * 4 // 2,
    }


def counter_check(mesh):
    """moved_per_step on a known program: a 5-trip loop of 16-element all-reduces and a
    conditional whose dear branch moves 1000 more elements."""

    def body(x, flag):
        x = jax.lax.fori_loop(0, 5, lambda i, x: jax.lax.psum(x, "data") * 0.5, x)
        return jax.lax.cond(flag[0] > 0, lambda: x, lambda: x + jax.lax.psum(jnp.full(1000, x[0]), "data")[:16])

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False))
    hlo = f.lower(jnp.ones(16), jnp.ones(1, jnp.int32)).compile().as_text()
    return {"min": moved_per_step(hlo), "max": moved_per_step(hlo, max)}


def bad_label_error(mesh):
    hidden, weight, bias, labels = _data()
    labels[N - 3] = V + 5
    args = [
        jax.device_put(hidden, NamedSharding(mesh, P("data", None))),
        jax.device_put(weight, NamedSharding(mesh, P(None, "model"))),
        jax.device_put(labels, NamedSharding(mesh, P("data"))),
    ]
    try:
        jax.block_until_ready(jax.jit(lambda h, w, y: fj.linear_cross_entropy(h, w, y).sum())(*args))
    except Exception as error:  # noqa: BLE001  (the runtime's error type varies by version)
        return str(error)
    return None


def main():
    rows, classes = _mesh((8,), ("data",)), _mesh((8,), ("model",))
    grid = _mesh((4, 2), ("data", "model"))
    megatron = (P("data", None), P(None, "model"))
    cases = {
        "rows": case(rows, P("data", None), P()),
        "classes": case(classes, P(), P(None, "model")),
        "rows x classes": case(grid, *megatron),
        "rows x classes, V x H weight": case(grid, P("data", None), P("model", None), transpose=True),
        "rows over two mesh axes": case(grid, P(("data", "model"), None), P()),
        "classes over two mesh axes": case(grid, P(), P(None, ("data", "model"))),
        "rows x classes, every option": case(grid, *megatron, every=True),
        "rows x classes, per-row upstream": case(grid, *megatron, upstream=True),
        "rows x classes, bfloat16": case(grid, *megatron, dtype=jnp.bfloat16),
        "rows x uneven classes": case(grid, *megatron, v=V - 3),
    }
    result = {
        "cases": cases,
        "memory": memory_case(grid),
        "counter": counter_check(rows),
        "bad_label_error": bad_label_error(grid),
        "devices": len(jax.devices()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
