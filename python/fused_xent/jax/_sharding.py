"""The FFI calls under sharding and vmap.

Every call of a handler goes through ``call(runner, name, opts, *operands)``, which wraps
it twice:

- ``jax.experimental.custom_partitioning``, so that XLA's partitioner (Shardy by default)
  runs the handler on each device's shard instead of gathering the logits. Rows are
  independent, so any sharding of the row dimensions is kept as it is: each device runs
  the kernel on its rows and the results keep the logits' row sharding (a gradient keeps
  the logits' sharding). With the class axis sharded the calls run vocabulary-parallel
  (jax/_vocab_parallel.py): row-sized all-reduces, no gather, also where the class shards
  do not divide the class count (each kernel reads only its shard's valid columns).
- ``jax.custom_batching.custom_vmap``, because custom_partitioning has no batching rule:
  a batch axis added by vmap is one more row dimension for the kernels, so a vmapped
  call is one call over all rows. Class weights that differ per batch element are the
  exception: those run one call per element.

Operands and results have one of four roles (ROLES): "z" (shaped like the logits), "r" (one
value per row: the logits' shape without the class axis), "l" (the backward's lse: per row,
maybe as a pair of uint32) and "w" (class weights: whole on every device).
"""

import functools
import string

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fused_xent.jax import _vocab_parallel

# (operand roles, result roles) of each FFI target. "l": the backward's lse, one value per row,
# or one pair of uint32 (the float64's halves, jax/_ffi.py: _kept_lse).
ROLES = {
    "fused_xent_sparse_forward": (("z", "r", "w"), ("r", "r")),
    "fused_xent_sparse_backward": (("z", "r", "w", "l", "r"), ("z",)),
    "fused_xent_dense_forward": (("z", "z"), ("r", "r")),
    "fused_xent_dense_backward": (("z", "z", "l", "r"), ("z",)),
}

_CLASS_FACTOR = "c"
_WEIGHT_FACTOR = "w"
_PAIR_FACTOR = "p"
_ROW_FACTORS = [f"r{i}" for i in range(len(string.ascii_lowercase))]


def call(runner, name, opts, *operands):
    """``runner(name, opts, *operands)`` on whole or per-device arrays; returns what it returns."""
    return _batched(runner, name, opts)(*operands)


# ---------------------------------------------------------------- vmap


@functools.lru_cache(maxsize=None)
def _batched(runner, name, opts):
    single = len(ROLES[name][1]) == 1

    @jax.custom_batching.custom_vmap
    def batched(*operands):
        return _partitioned(runner, name, opts, *operands)

    @batched.def_vmap
    def _rule(axis_size, in_batched, *operands):
        roles = ROLES[name][0]
        if any(b for b, role in zip(in_batched, roles) if role == "w"):
            out = _one_call_per_element(batched, axis_size, in_batched, operands)
        else:
            # opts' axis counts from the end, so the new leading axis is one more row axis.
            operands = [
                x if b or role == "w" else jnp.broadcast_to(x, (axis_size, *x.shape))
                for x, b, role in zip(operands, in_batched, roles)
            ]
            out = batched(*operands)
        return out, (True if single else (True,) * len(out))

    return batched


def _one_call_per_element(fn, axis_size, in_batched, operands):
    stacked = [x if b else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, b in zip(operands, in_batched)]
    return jax.lax.map(lambda ops: fn(*ops), stacked)


# ---------------------------------------------------------------- partitioning


@functools.partial(custom_partitioning, static_argnums=(0, 1, 2))
def _partitioned(runner, name, opts, *operands):
    return runner(name, opts, *operands)


def _dims(rank, axis):
    """The logits' factors: one per row dimension, "c" for the class axis."""
    rows = iter(_ROW_FACTORS)
    return [_CLASS_FACTOR if d == axis else next(rows) for d in range(rank)]


def _lse_text(rows, operand_type, logits_rank):
    """An lse operand's factors: the rows', and one more for a pair of uint32."""
    return rows + (" " + _PAIR_FACTOR if len(operand_type.shape) == logits_rank else "")


def _sharding_rule(runner, name, opts, mesh, operand_types, result_types):
    rank = len(operand_types[0].shape)
    dims = _dims(rank, opts[0] % rank)
    rows = " ".join(d for d in dims if d != _CLASS_FACTOR)
    text = {"z": " ".join(dims), "r": rows, "w": _WEIGHT_FACTOR}
    operand_roles, result_roles = ROLES[name]
    operands = [_lse_text(rows, t, rank) if r == "l" else text[r] for r, t in zip(operand_roles, operand_types)]
    rule = ", ".join(operands) + " -> " + ", ".join(text[r] for r in result_roles)
    whole = (
        (_WEIGHT_FACTOR, _PAIR_FACTOR) if _VOCAB_PARALLEL.get(name) else (_CLASS_FACTOR, _WEIGHT_FACTOR, _PAIR_FACTOR)
    )
    whole = tuple(f for f in whole if f in rule.replace(",", " ").split())
    return rule, {"need_replication_factors": whole}


# The targets that run vocabulary-parallel, and their shard functions.
_VOCAB_PARALLEL = {
    "fused_xent_sparse_forward": _vocab_parallel.forward,
    "fused_xent_sparse_backward": _vocab_parallel.backward,
    "fused_xent_dense_forward": _vocab_parallel.dense_forward,
    "fused_xent_dense_backward": _vocab_parallel.dense_backward,
}


def _class_axes(name, spec, axis):
    """The mesh axes the class axis stays sharded over: () unless the call runs vocabulary-parallel."""
    axes = spec[axis]
    if axes is None or name not in _VOCAB_PARALLEL:
        return ()
    return axes if isinstance(axes, tuple) else (axes,)


def _partition(runner, name, opts, mesh, arg_shapes, result_shape):
    logits = arg_shapes[0]
    rank = len(logits.shape)
    axis = opts[0] % rank
    spec = tuple(logits.sharding.spec) + (None,) * (rank - len(logits.sharding.spec))
    classes = logits.shape[axis]
    class_axes = _class_axes(name, spec, axis)
    specs = {
        "z": P(*((class_axes or None) if d == axis else s for d, s in enumerate(spec))),
        "r": P(*(s for d, s in enumerate(spec) if d != axis)),
        "w": P(),
    }
    operand_roles, result_roles = ROLES[name]
    specs["l"] = specs["r"]
    arg_shardings = tuple(
        NamedSharding(mesh, P(*specs[r], None) if r == "l" and len(a.shape) == rank else specs[r])
        for r, a in zip(operand_roles, arg_shapes)
    )
    result_shardings = tuple(NamedSharding(mesh, specs[r]) for r in result_roles)
    if len(result_roles) == 1:
        result_shardings = result_shardings[0]

    def lower(*operands):
        if name == "fused_xent_sparse_forward" and mesh.size > 1:
            operands = (
                operands[0],
                _share_invalid_label(operands[1], classes, opts, mesh),
                *operands[2:],
            )
        if class_axes:
            return _VOCAB_PARALLEL[name](runner, opts, classes, class_axes, *operands)
        return runner(name, opts, *operands)

    return mesh, lower, result_shardings, arg_shardings


def _share_invalid_label(labels, classes, opts, mesh):
    """Labels that make every device's kernel fail if any device has an invalid one.

    A kernel's error stops only its own device; the others would wait for it at the next
    collective forever. So the devices agree first (one scalar all-reduce): where another
    device found an invalid label, this one's first label becomes it, and the kernel of
    every device raises the error that an unsharded call raises."""
    if labels.size == 0:
        return labels
    invalid = (labels < 0) | (labels >= classes)
    if opts[3] is not None:
        invalid &= labels != opts[3]
    flat, invalid = labels.reshape(-1), invalid.reshape(-1)
    lowest = jnp.iinfo(labels.dtype).min
    local = jnp.stack([jnp.any(invalid).astype(labels.dtype), jnp.max(jnp.where(invalid, flat, lowest))])
    found, value = jax.lax.pmax(local, mesh.axis_names)
    return flat.at[0].set(jnp.where(found > 0, value, flat[0])).reshape(labels.shape)


def _infer_result_shardings(runner, name, opts, mesh, arg_shapes, result_shape):
    """For XLA's older partitioner (GSPMD): the results' shardings the partition above gives."""
    return _partition(runner, name, opts, mesh, arg_shapes, result_shape)[2]


_partitioned.def_partition(
    partition=_partition, infer_sharding_from_operands=_infer_result_shardings, sharding_rule=_sharding_rule
)
