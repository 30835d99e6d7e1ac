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
import re

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fused_xent.jax as fj  # noqa: E402
from tests._support.hlo_collectives import moved_per_step  # noqa: E402

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


def _reference(transpose, bias=True, weight_sharding=None):
    """The jax.numpy head XLA partitions itself: the logits whole per device's shard."""

    def logits(h, w, b):
        if weight_sharding is not None:
            w = jax.lax.with_sharding_constraint(w, weight_sharding)
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


_ALL_GATHER = re.compile(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(")


def _gathered_shapes(hlo):
    """The result shapes of the compiled program's all-gathers."""
    return [
        tuple(int(d) for d in filter(None, m.group(1).split(",")))
        for m in map(_ALL_GATHER.search, hlo.splitlines())
        if m
    ]


_BACKWARD = re.compile(r"= \(\w+\[(\d+),(\d+)\].*custom_call_target=\"(fused_xent_\w*backward\w*)\"")


def _backward_calls(hlo):
    return sorted(
        {(m.group(3), int(m.group(1)), int(m.group(2))) for m in map(_BACKWARD.search, hlo.splitlines()) if m}
    )


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
    one_device = jax.jit(jax.value_and_grad(_loss(transpose, options, 16, g), argnums=(0, 1, 2)))
    expected_value, expected_grads = one_device(hidden, weight, bias, labels)
    if uneven:
        weight_spec, class_entry = P(), None
    shardings = [NamedSharding(mesh, s) for s in (hidden_spec, weight_spec, P(class_entry), P(row_entry))]
    args = [jax.device_put(x, s) for x, s in zip((hidden, weight, bias, labels), shardings)]
    value, grads = step(*args)
    hlo, temp = _step_facts(step, args)
    row_shards, class_shards = (
        _shards(mesh, row_entry),
        _shards(mesh, _entry(inner.spec, class_dim) if uneven else class_entry),
    )
    padded = -(-v // class_shards) * class_shards
    logits_per_device = (N // row_shards) * (padded // class_shards) * jnp.dtype(dtype).itemsize
    # A weight placed whole gets its gradient whole: where the step shards its classes inside,
    # the gradients of the weight and bias (padded) are gathered at the end, as for the
    # jax.numpy head. Any other gather of that size would be of logits.
    own = {(padded, H) if transpose else (H, padded), (padded,)} if uneven else set()
    gathered = [shape for shape in _gathered_shapes(hlo) if shape not in own]
    result = {
        "value_error": _max_relative(value, expected_value),
        "grad_error": max(_max_relative(a, e) for a, e in zip(grads, expected_grads)),
        "moved": moved_per_step(hlo),
        "moved_recomputing": moved_per_step(hlo, max),
        "gathers_logits": any(int(np.prod(shape)) >= N * v // 8 for shape in gathered),
        "gathered_shapes": _gathered_shapes(hlo),
        # the backward kernels' logits gradients: (target, rows, classes) of each call
        "backward_calls": _backward_calls(hlo),
        "shard_classes": padded // class_shards,
        "same_shardings": [bool(gr.sharding.is_equivalent_to(a.sharding, a.ndim)) for gr, a in zip(grads, args[:3])],
        "temp_bytes": temp,
        "logits_bytes_per_device": logits_per_device,
        "rows_per_device": N // row_shards,
        "dtype": jnp.dtype(dtype).name,
    }
    if not every and not upstream and dtype == jnp.float32:
        ref_step = jax.jit(jax.value_and_grad(_reference(transpose, weight_sharding=inner), argnums=(0, 1, 2)))
        ref_hlo, ref_temp = _step_facts(ref_step, args)
        result["reference_moved"] = moved_per_step(ref_hlo)
        result["reference_temp_bytes"] = ref_temp
    return result


def _entry(spec, dim):
    return spec[dim] if len(spec) > dim else None


def _shards(mesh, entry):
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def memory_case(mesh, v=4096):
    """A larger Megatron step with the default chunking: its per-device temporaries against
    the per-device logits (8192 x 4096 float32 over 4 x 2 devices: 16 MiB each). With classes
    the shards do not divide (v=4095), the weight comes whole and its classes are split inside
    the step; its gradient is then gathered whole, for the jax.numpy head too."""
    n, h = 8192, 64
    uneven = v % mesh.shape["model"] != 0
    inner = NamedSharding(mesh, P(None, "model")) if uneven else None
    shapes = [
        jax.ShapeDtypeStruct((n, h), jnp.float32, sharding=NamedSharding(mesh, P("data", None))),
        jax.ShapeDtypeStruct((h, v), jnp.float32, sharding=NamedSharding(mesh, P() if uneven else P(None, "model"))),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data"))),
    ]

    def ours(hd, w, y):
        if inner is not None:
            w = jax.lax.with_sharding_constraint(w, inner)
        return fj.linear_cross_entropy(hd, w, y).mean()

    def temp(f):
        return jax.jit(jax.grad(f, (0, 1))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    shard = -(-v // mesh.shape["model"])
    return {
        "temp_bytes": temp(ours),
        "reference_temp_bytes": temp(_reference(False, bias=False, weight_sharding=inner)),
        "logits_bytes_per_device": n * shard * 4 // mesh.shape["data"],
        "weight_bytes_per_device": h * shard * 4,
        # the whole weight's gradient (a gathered W-sized buffer) where the weight comes whole
        "whole_weight_bytes": h * v * 4 if uneven else 0,
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


def bad_label_error(mesh, v=V):
    """An invalid label on one device; v=5 over 8 class shards: split inside the step, 3 shards
    without any class."""
    hidden, weight, bias, labels = _data(v=v)
    labels[N - 3] = v + 5
    uneven = v % mesh.shape["model"] != 0
    inner = NamedSharding(mesh, P(None, "model")) if uneven else None
    rows = "data" if "data" in mesh.axis_names else None
    args = [
        jax.device_put(hidden, NamedSharding(mesh, P(rows, None))),
        jax.device_put(weight, NamedSharding(mesh, P() if uneven else P(None, "model"))),
        jax.device_put(labels, NamedSharding(mesh, P(rows))),
    ]

    def total(h, w, y):
        if inner is not None:
            w = jax.lax.with_sharding_constraint(w, inner)
        return fj.linear_cross_entropy(h, w, y).sum()

    try:
        jax.block_until_ready(jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(*args))
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
        "uneven classes over 8": case(classes, P(), P(None, "model"), v=V - 3),
        "5 classes over 8 (3 shards without any)": case(classes, P(), P(None, "model"), v=5),
        "uneven classes over two mesh axes": case(grid, P(), P(None, ("data", "model")), v=V - 3),
        "rows x uneven classes, V x H weight, every option": case(
            grid, P("data", None), P("model", None), transpose=True, every=True, v=V - 1
        ),
        "rows x uneven classes, per-row upstream": case(grid, *megatron, upstream=True, v=V - 3),
        "rows x uneven classes, bfloat16": case(grid, *megatron, dtype=jnp.bfloat16, v=V - 3),
    }
    result = {
        "cases": cases,
        "memory": memory_case(grid),
        "memory_uneven": memory_case(grid, v=4095),
        "counter": counter_check(rows),
        "bad_label_error": bad_label_error(grid),
        "bad_label_error_uneven": bad_label_error(classes, v=5),
        "devices": len(jax.devices()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
