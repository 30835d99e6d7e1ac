"""Data moved between devices by a compiled XLA program: its collectives, read from the
optimized HLO text (`jax.jit(f).lower(...).compile().as_text()`). Used by
tests/jax/test_sharding.py and benchmarks/bench_sharding.py."""

import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OPS = "|".join(re.escape(op) for op in COLLECTIVES)
# "%name = <result shapes> op(" or "op-start(" (an async pair is counted at its start).
_LINE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + _OPS + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collectives(hlo_text):
    """[(op, elements)] for every collective of `hlo_text`; elements counts its result
    (of an async pair, the result its start returns next to its operand)."""
    found = []
    for line in hlo_text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        shapes, op = match.groups()
        arrays = _ARRAY.findall(shapes)
        if f"{op}-start(" in line and op in ("all-gather", "collective-permute"):
            arrays = arrays[len(arrays) // 2 :] if op == "all-gather" else arrays[1:2]  # their results only
        found.append((op, sum(_elements(dims) for dims in arrays)))
    return found


def moved_elements(hlo_text):
    """Elements all the collectives of `hlo_text` produce, per device."""
    return sum(elements for _, elements in collectives(hlo_text))


def _elements(dims):
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count
