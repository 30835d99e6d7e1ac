"""Checks the TensorFlow ops' gradients against finite differences.

    python -m fused_xent.gradcheck [--seed N] [--quick] [--graph] [--only TEXT]

For every option of the ops (label smoothing, ignore_index, class weights,
z-loss, a class axis other than the last, sparse and dense labels) it draws
float64 inputs of random shape and compares every entry of (small inputs) or a
few random projections of (large inputs) these Jacobians:

  order 1  d f / d logits and, for dense labels, d f / d labels,
           where f = sum(upstream * loss) with a random upstream gradient;
  order 2  the derivatives of those gradients (nested GradientTape, i.e. the
           Hessian-vector products of the logits, and the mixed derivatives
           with respect to the labels and to the upstream gradient),

each against central differences (f(x + h v) - f(x - h v)) / 2h. It prints a
table and exits with status 1 if any check exceeds its tolerance.
docs/derivation.md has the formulas being checked.
"""

import argparse
import dataclasses
import sys
import time

import numpy as np
import tensorflow as tf

import fused_xent
from fused_xent import _registration

STEP = 1e-5  # central differences in float64: truncation ~h^2, rounding ~1e-16/h
TOLERANCE = 1e-6  # on max |analytic - numeric|, times max(1, max |numeric|)
FULL_JACOBIAN_UP_TO = 64  # larger inputs are probed along a few random directions
RANDOM_PROBES = 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of an op; shapes are drawn at random from the seed."""

    name: str
    dense: bool = False
    rank: int = 2
    axis: int = -1
    classes: int = 0  # 0: random
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    class_weights: bool = False
    z_loss: float = 0.0
    logits_shift: float = 0.0
    logits_ramp: float = 0.0  # added linearly along the class axis: later blocks hold larger maxima
    labels_sum: float = 1.0  # dense labels are distributions scaled to this sum
    label_dtype: str = "int64"
    full_only: bool = False  # skipped by --quick


CASES = (
    Case("sparse"),
    Case("sparse int32 labels", label_dtype="int32"),
    Case("sparse label_smoothing=0.1", label_smoothing=0.1),
    Case("sparse ignore_index=-100", ignore_index=-100),
    Case("sparse ignore_index=1 (a class)", ignore_index=1),
    Case("sparse class_weights", class_weights=True),
    Case("sparse z_loss=0.05", z_loss=0.05),
    Case("sparse axis=0", axis=0),
    Case("sparse rank 3, axis=1", rank=3, axis=1),
    Case(
        "sparse all options, rank 3, axis=-2",
        rank=3,
        axis=-2,
        label_smoothing=0.2,
        ignore_index=-1,
        class_weights=True,
        z_loss=0.02,
    ),
    Case("sparse logits + 1000", logits_shift=1000.0),
    Case("sparse 1100 classes (3 blocks)", classes=1100, logits_ramp=4.0, full_only=True),
    Case("dense", dense=True),
    Case("dense label_smoothing=0.2", dense=True, label_smoothing=0.2),
    Case("dense z_loss=0.05", dense=True, z_loss=0.05),
    Case("dense labels summing to 1.5", dense=True, labels_sum=1.5),
    Case("dense axis=0", dense=True, axis=0),
    Case("dense all options, rank 3, axis=1", dense=True, rank=3, axis=1, label_smoothing=0.1, z_loss=0.02),
    Case("dense 1100 classes (3 blocks)", dense=True, classes=1100, logits_ramp=4.0, full_only=True),
)


@dataclasses.dataclass
class Inputs:
    logits: np.ndarray
    labels: np.ndarray
    class_weights: np.ndarray | None
    upstream: np.ndarray  # the gradient flowing into the per-example loss


@dataclasses.dataclass
class Result:
    case: str
    check: str
    order: int
    error: float
    tolerance: float

    @property
    def passed(self):
        return bool(self.error <= self.tolerance)  # NaN fails


# ------------------------------------------------------------------ inputs


def draw_shape(case, rng, quick):
    classes = case.classes or int(rng.integers(3, 5 if quick else 7))
    largest = 2 if quick or case.classes > 100 else (4 if case.rank == 2 else 3)
    outer = [int(rng.integers(2, largest + 1)) for _ in range(case.rank - 1)]
    axis = case.axis % case.rank
    return tuple(outer[:axis]) + (classes,) + tuple(outer[axis:])


def draw_inputs(case, rng, quick):
    shape = draw_shape(case, rng, quick)
    axis = case.axis % case.rank
    classes = shape[axis]
    reduced = shape[:axis] + shape[axis + 1 :]
    ramp_shape = [1] * case.rank
    ramp_shape[axis] = classes
    ramp = np.linspace(0.0, case.logits_ramp, classes).reshape(ramp_shape)
    logits = rng.normal(0.0, 1.5, shape) + case.logits_shift + ramp
    if case.dense:
        scores = np.exp(rng.normal(0.0, 1.0, shape))
        labels = case.labels_sum * scores / scores.sum(axis=axis, keepdims=True)
    else:
        labels = rng.integers(0, classes, reduced).astype(case.label_dtype)
        if case.ignore_index is not None:
            labels.flat[0] = case.ignore_index  # at least one ignored row
    weights = None
    if case.class_weights:
        weights = rng.uniform(0.5, 2.0, classes).astype(np.float32).astype(np.float64)  # the op keeps float32
    upstream = rng.normal(0.0, 1.0, reduced)
    return Inputs(logits, labels, weights, upstream)


# --------------------------------------------------------------- the op


def case_loss(case, labels, logits, class_weights):
    """The per-example loss of the fused op, configured as `case` says."""
    if case.dense:
        return fused_xent.softmax_cross_entropy_with_logits(
            labels, logits, axis=case.axis, label_smoothing=case.label_smoothing, z_loss=case.z_loss
        )
    return fused_xent.sparse_softmax_cross_entropy_with_logits(
        labels,
        logits,
        axis=case.axis,
        ignore_index=case.ignore_index,
        label_smoothing=case.label_smoothing,
        class_weights=class_weights,
        z_loss=case.z_loss,
    )


class Objective:
    """f = sum(upstream * loss(labels, logits)) and its gradients as functions of
    one input at a time, the others held at their drawn values."""

    def __init__(self, case, inputs, loss):
        self.case = case
        self.inputs = inputs
        self.loss = loss
        self.weights = None if inputs.class_weights is None else tf.constant(inputs.class_weights, tf.float32)

    def value(self, logits=None, labels=None, upstream=None):
        logits = self._or_drawn(logits, self.inputs.logits)
        labels = self._or_drawn(labels, self.inputs.labels)
        upstream = self._or_drawn(upstream, self.inputs.upstream)
        return tf.reduce_sum(upstream * self.loss(self.case, labels, logits, self.weights))

    def gradient(self, wrt, **inputs):
        """d f / d `wrt` ("logits" or "labels"), differentiable once more."""
        target = tf.convert_to_tensor(inputs.get(wrt, getattr(self.inputs, wrt)))
        inputs[wrt] = target
        with tf.GradientTape() as tape:
            tape.watch(target)
            f = self.value(**inputs)
        return tape.gradient(f, target, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    @staticmethod
    def _or_drawn(value, drawn):
        return tf.convert_to_tensor(drawn if value is None else value)


# ------------------------------------------------------------ comparisons


def probe_directions(size, rng):
    """Unit vectors (the full Jacobian) for small inputs, a few random ones otherwise."""
    if size <= FULL_JACOBIAN_UP_TO:
        return np.eye(size)
    return rng.normal(0.0, 1.0, (RANDOM_PROBES, size))


def analytic_projection(fn, x, out_directions, in_directions):
    """out_directions @ J @ in_directions.T, with J = d fn / d x by reverse mode."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = fn(x)
    rows = []
    for v in out_directions:
        row = tape.gradient(
            y, x, output_gradients=tf.constant(v.reshape(y.shape)), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        rows.append(row.numpy().ravel())
    del tape
    return np.stack(rows) @ in_directions.T


def numeric_projection(fn, x, out_directions, in_directions, step):
    """out_directions @ J @ in_directions.T, J by central differences along each input direction."""
    columns = []
    for w in in_directions:
        w = w.reshape(x.shape)
        upper = fn(tf.constant(x + step * w)).numpy().ravel()
        lower = fn(tf.constant(x - step * w)).numpy().ravel()
        columns.append((upper - lower) / (2.0 * step))
    return out_directions @ np.stack(columns, axis=1)


def compare(fn, x, out_size, rng, step):
    """Max |analytic - numeric| over the probed Jacobian entries, and its tolerance."""
    out_directions = probe_directions(out_size, rng)
    in_directions = probe_directions(x.size, rng)
    analytic = analytic_projection(fn, x, out_directions, in_directions)
    numeric = numeric_projection(fn, x, out_directions, in_directions, step)
    scale = max(1.0, float(np.max(np.abs(numeric))))
    return float(np.max(np.abs(analytic - numeric))), TOLERANCE * scale


def checks_of(case, objective, inputs):
    """(name, order, function of one input, that input, size of the function's output)."""
    logits, labels, upstream = inputs.logits, inputs.labels, inputs.upstream
    checks = [
        ("d f/d logits", 1, lambda z: objective.value(logits=z), logits, 1),
        ("d2 f/d logits2 (Hessian-vector)", 2, lambda z: objective.gradient("logits", logits=z), logits, logits.size),
        ("d(d f/d logits)/d upstream", 2, lambda u: objective.gradient("logits", upstream=u), upstream, logits.size),
    ]
    if case.dense:
        checks += [
            ("d f/d labels", 1, lambda t: objective.value(labels=t), labels, 1),
            ("d(d f/d logits)/d labels", 2, lambda t: objective.gradient("logits", labels=t), labels, logits.size),
            ("d(d f/d labels)/d logits", 2, lambda z: objective.gradient("labels", logits=z), logits, labels.size),
        ]
    return checks


def check_case(case, seed, index, *, quick=False, step=STEP, graph=False, loss=case_loss):
    """All gradient checks of one case; the draws depend only on (seed, index).
    graph=True runs each function in a tf.function, where gradients take the graph path."""
    rng = np.random.default_rng([seed, index])
    inputs = draw_inputs(case, rng, quick)
    objective = Objective(case, inputs, loss)
    results = []
    for name, order, fn, x, out_size in checks_of(case, objective, inputs):
        if graph:
            fn = tf.function(fn)
        error, tolerance = compare(fn, x, out_size, rng, step)
        results.append(Result(f"{case.name} {list(inputs.logits.shape)}", name, order, error, tolerance))
    return results


# ------------------------------------------------------------------ report


def selected_cases(quick, only):
    return [
        (index, case)
        for index, case in enumerate(CASES)
        if not (quick and case.full_only) and (only is None or only in case.name)
    ]


def print_table(results):
    case_width = max(len("case"), *(len(r.case) for r in results))
    check_width = max(len("check"), *(len(r.check) for r in results))
    print(f"{'case':<{case_width}}  {'check':<{check_width}}  order  max abs error  tolerance  result")
    for r in results:
        print(
            f"{r.case:<{case_width}}  {r.check:<{check_width}}  {r.order:5d}  {r.error:13.2e}  "
            f"{r.tolerance:9.1e}  {'pass' if r.passed else 'FAIL'}"
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fused_xent.gradcheck", description="Check the fused ops' gradients against finite differences."
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random shapes and values (default 0)")
    parser.add_argument("--quick", action="store_true", help="small shapes, and skip the 1100-class cases")
    parser.add_argument("--only", metavar="TEXT", help="run only the cases whose name contains TEXT")
    parser.add_argument("--graph", action="store_true", help="differentiate inside tf.function instead of eagerly")
    parser.add_argument("--step", type=float, default=STEP, help=f"finite-difference step (default {STEP:g})")
    return parser.parse_args(argv)


def main(argv=None, *, loss=case_loss):
    """Runs the checks and returns the exit status. `loss` replaces the op under
    test (same signature as case_loss); the tests use it to show failures are caught."""
    args = parse_args(argv)
    started = time.perf_counter()
    cases = selected_cases(args.quick, args.only)
    if not cases:
        print(f"no case name contains {args.only!r}", file=sys.stderr)
        return 2
    results = []
    for index, case in cases:
        results += check_case(case, args.seed, index, quick=args.quick, step=args.step, graph=args.graph, loss=loss)
    print_table(results)
    failed = sum(not r.passed for r in results)
    mode = "graph" if args.graph else "eager"
    print(
        f"{len(results)} checks on {len(cases)} cases, {failed} failed (seed {args.seed}, float64, "
        f"step {args.step:g}, {mode}, {time.perf_counter() - started:.1f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

_registration.register(finishing=__name__)  # this module may have been the first import of a framework
