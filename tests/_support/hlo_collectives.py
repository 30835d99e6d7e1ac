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


# ---------------------------------------------------------------- per executed step

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%([^,\s]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BRANCHES = re.compile(r"\bconditional\(.*branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"\bconditional\(.*true_computation=%([^,\s]+), false_computation=%([^,\s]+)")
_CALL = re.compile(r"\bcall\(.*to_apply=%([^,\s]+)")


def _computations(hlo_text):
    """{name: lines} and the entry computation's name."""
    found, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = found.setdefault(match.group(1), [])
            entry = match.group(1) if line.startswith("ENTRY ") else entry
        elif current is not None and line.strip() != "}":
            current.append(line)
    return found, entry


def moved_per_step(hlo_text, branch=min):
    """Elements the collectives produce per device in one run of the program: a while loop's
    body counts its known trip count times, and a conditional counts the branch that
    `branch` picks of its branches' counts (min: the cheapest path, max: the dearest)."""
    computations, entry = _computations(hlo_text)
    memo = {}

    def cost(name):
        if name not in memo:
            memo[name] = sum(_line_cost(line) for line in computations[name])
        return memo[name]

    def _line_cost(line):
        match = _LINE.match(line)
        if match:
            return sum(elements for _, elements in collectives(line))
        loop = _WHILE.search(line)
        if loop:
            trips = _TRIPS.search(line)
            if trips is None:
                raise ValueError(f"a while loop without a known trip count: {line.strip()[:200]}")
            return int(trips.group(1)) * cost(loop.group(1))
        branches = _BRANCHES.search(line)
        if branches:
            return branch(cost(b.strip().lstrip("%")) for b in branches.group(1).split(","))
        true_false = _TRUE_FALSE.search(line)
        if true_false:
            return branch(cost(b) for b in true_false.groups())
        called = _CALL.search(line)
        return cost(called.group(1)) if called else 0

    return cost(entry)
