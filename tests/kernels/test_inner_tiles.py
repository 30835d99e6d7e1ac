"""A class axis that is not the last (the core's inner > 1): the CPU kernels
read kLanes consecutive positions as one vector per class (inner tiles, one row
per lane). Checked against the float64 reference for every dtype and option,
against the same data with the class axis last (NaN and inf rows too), and
bitwise: a row's result does not depend on the rows that share its tile, its
call or its thread."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support import reference
from tests._support.assertions import assert_close
from tests._support.runners import tf_or_skip

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf rows on purpose

DTYPES = [np.float32, np.float64, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])

# (outer, classes, inner): inner around the vector widths (4, 8, 16 floats)
# and their multiples, short and long rows.
SHAPES = [(outer, classes, inner) for classes in (1, 2, 21, 33) for inner, outer in ((3, 5), (15, 2), (16, 3), (17, 2))]
SHAPES += [(2, 1000, 3), (1, 1000, 17), (1, 2, 65537), (1, 21, 16389)]

SPARSE_OPTIONS = [
    {},
    {"label_smoothing": 0.1, "class_weights": "ramp"},
    {"z_loss": 0.01, "ignore_index": 0},
    {"ignore_index": -100, "label_smoothing": 0.3},
]


def _name(dtype):
    return np.dtype(dtype).name


def _shape_id(shape):
    return "x".join(map(str, shape))


def _expected(options):
    """Options as the kernels see them (float32)."""
    out = dict(options)
    for key in ("label_smoothing", "z_loss"):
        if key in out:
            out[key] = float(np.float32(out[key]))
    if "class_weights" in out:
        out["class_weights"] = np.asarray(out["class_weights"], np.float32).astype(np.float64)
    return out


def _with_edges(z):
    """Logits [outer, classes, inner] with edge rows: NaN, -inf, +-1e4, one class far above."""
    outer, classes, inner = z.shape
    z[0, :, 1] = np.nan
    z[0, 0, 2 % inner] = -np.inf
    z[-1, :, inner - 1] = 1e4
    z[-1, :, inner // 2] = -1e4
    z[0, classes - 1, inner // 3] = 60.0
    return z


def _as_axis(z, layout):
    """The same [outer, classes, inner] data as a tensor whose class axis is
    axis 0 (outer == 1), 1, or a middle axis of rank 4; returns (tensor, axis)."""
    outer, classes, inner = z.shape
    if layout == "axis0" and outer == 1:
        return z.reshape(classes, inner), 0
    if layout == "middle" and inner % 3 == 0:
        return z.reshape(outer, classes, 3, inner // 3), 1
    if layout == "middle" and inner % 2 == 1 and inner > 3:
        return z.reshape(1, outer, classes, inner), 2
    return z, 1


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("layout", ["axis1", "axis0", "middle"])
def test_sparse_tiles_match_reference(dtype, shape, options, layout):
    outer, classes, inner = shape
    rng = np.random.default_rng(classes * 100 + inner)
    z = _with_edges(rng.normal(size=shape) * 3)
    logits, axis = _as_axis(z.astype(dtype), layout)
    reduced = logits.shape[:axis] + logits.shape[axis + 1 :]
    labels = rng.integers(0, classes, size=reduced)
    options = dict(options)
    if options.get("class_weights") == "ramp":
        options["class_weights"] = np.linspace(0.5, 2.0, classes)
    if options.get("ignore_index") == -100:
        labels[rng.random(reduced) < 0.3] = -100
    grad_loss = rng.normal(size=reduced).astype(dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(
        labels, logits, axis=axis, grad_loss=grad_loss, **options
    )
    ref_loss, ref_grad = reference.sparse(
        labels, logits.astype(np.float64), axis=axis, grad_loss=grad_loss.astype(np.float64), **_expected(options)
    )
    assert_close(loss, ref_loss, _name(dtype), scale=2)
    assert_close(grad, ref_grad, _name(dtype), scale=2)
    ignored = labels == options.get("ignore_index", -1)
    assert (loss[ignored] == 0).all() and (np.moveaxis(grad, axis, -1)[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2, "z_loss": 0.01}], ids=lambda o: ",".join(o) or "defaults"
)
@pytest.mark.parametrize("layout", ["axis1", "axis0", "middle"])
def test_dense_tiles_match_reference(dtype, shape, options, layout):
    outer, classes, inner = shape
    rng = np.random.default_rng(1 + classes * 100 + inner)
    z = _with_edges(rng.normal(size=shape) * 3)
    t = rng.random(size=shape)
    t[rng.random(size=shape) < 0.3] = 0.0
    t /= np.maximum(t.sum(1, keepdims=True), 1e-6)
    t[0, 0, 2 % inner] = 0.0  # a 0 label against -inf adds nothing
    logits, axis = _as_axis(z.astype(dtype), layout)
    labels, _ = _as_axis(t.astype(dtype), layout)
    reduced = logits.shape[:axis] + logits.shape[axis + 1 :]
    grad_loss = rng.normal(size=reduced).astype(dtype)
    loss, grad = fxnp.softmax_cross_entropy_with_logits(labels, logits, axis=axis, grad_loss=grad_loss, **options)
    ref_loss, ref_grad, _ = reference.dense(
        labels.astype(np.float64),
        logits.astype(np.float64),
        axis=axis,
        grad_loss=grad_loss.astype(np.float64),
        **_expected(options),
    )
    assert_close(loss, ref_loss, _name(dtype), scale=2)
    assert_close(grad, ref_grad, _name(dtype), scale=2)


def _hard_logits(rng, classes, inner):
    """[2, classes, inner] with rows the reference cannot judge: +inf, all -inf,
    NaN beside -inf, float32's extremes, all +inf, all NaN."""
    z = rng.normal(size=(2, classes, inner)).astype(np.float32) * 3
    z[0, 0, 1] = np.inf
    z[0, :, 2] = -np.inf
    z[0, :, 3] = -np.inf
    z[0, -1, 3] = np.nan
    z[0, -1, 4] = 3e38
    z[0, 0, 5] = -3e38
    z[1, :, 0] = np.inf
    z[1, :, 1] = np.nan
    z[1, :, inner - 1] = -np.inf
    z[1, classes // 2, inner - 1] = 0.0
    return z


@pytest.mark.parametrize("classes", [1, 2, 21, 33, 1000])
@pytest.mark.parametrize("inner", [7, 16, 17])
def test_edge_rows_as_with_the_axis_last(classes, inner):
    """NaN and inf semantics of the tiles equal the per-row path's (and the row
    groups'): the same data with its class axis last gives the same values."""
    rng = np.random.default_rng(classes + inner)
    z = _hard_logits(rng, classes, inner)
    last = np.ascontiguousarray(np.moveaxis(z, 1, -1))
    labels = rng.integers(0, classes, size=(2, inner))
    grad_loss = rng.normal(size=(2, inner)).astype(np.float32)
    t = rng.random(size=z.shape).astype(np.float32)
    t[:, 0] = 0.0
    t_last = np.ascontiguousarray(np.moveaxis(t, 1, -1))
    options = {"label_smoothing": 0.2, "z_loss": 0.01}
    for fn, y, y_last in [
        (fxnp.sparse_softmax_cross_entropy_with_logits, labels, labels),
        (fxnp.softmax_cross_entropy_with_logits, t, t_last),
    ]:
        loss, grad = fn(y, z, axis=1, grad_loss=grad_loss, **options)
        loss_last, grad_last = fn(y_last, last, grad_loss=grad_loss, **options)
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(loss_last))
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(np.moveaxis(grad_last, -1, 1)))
        assert_close(loss, loss_last, "float32", scale=4)
        assert_close(grad, np.moveaxis(grad_last, -1, 1), "float32", scale=4)


def _same_bits(a, b):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


# Windows of positions: short ones (any lane, partial tiles), and for inner = 600
# long ones starting and ending mid-span (the backward's spans are 512 bytes of
# each class: 128 float32, 256 16-bit positions).
WINDOWS = {
    37: [(0, 2), (1, 2), (3, 5), (5, 9), (7, 17), (15, 20), (20, 17), (35, 2)],
    600: [(0, 600), (1, 599), (100, 300), (255, 345), (0, 512), (130, 17)],
}


@pytest.mark.parametrize("inner", sorted(WINDOWS))
@pytest.mark.parametrize("classes", [1, 2, 21, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else []), ids=_name)
def test_rows_keep_their_bits_in_any_window(classes, dtype, inner):
    """Every window of positions (any start, any width, so any lane and any
    partial tile or span) gives each of its rows the bits the whole batch gives it."""
    rng = np.random.default_rng(classes)
    z = _hard_logits(rng, classes, inner).astype(dtype)
    labels = rng.integers(0, classes, size=(2, inner))
    labels[0, ::7] = 1  # ignore_index
    grad_loss = rng.normal(size=(2, inner)).astype(dtype)
    t = rng.random(size=z.shape).astype(dtype)
    options = {"label_smoothing": 0.1, "z_loss": 0.01}
    sparse = dict(options, ignore_index=1)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, grad_loss=grad_loss, **sparse)
    dloss, dgrad = fxnp.softmax_cross_entropy_with_logits(t, z, axis=1, grad_loss=grad_loss, **options)
    for start, width in WINDOWS[inner]:
        w = slice(start, start + width)
        zw = np.ascontiguousarray(z[:, :, w])
        one_loss, one_grad = fxnp.sparse_softmax_cross_entropy_with_logits(
            np.ascontiguousarray(labels[:, w]), zw, axis=1, grad_loss=np.ascontiguousarray(grad_loss[:, w]), **sparse
        )
        _same_bits(loss[:, w], one_loss)
        _same_bits(grad[:, :, w], one_grad)
        one_loss, one_grad = fxnp.softmax_cross_entropy_with_logits(
            np.ascontiguousarray(t[:, :, w]), zw, axis=1, grad_loss=np.ascontiguousarray(grad_loss[:, w]), **options
        )
        _same_bits(dloss[:, w], one_loss)
        _same_bits(dgrad[:, :, w], one_grad)
    for o in range(2):  # one outer index alone
        one_loss, one_grad = fxnp.sparse_softmax_cross_entropy_with_logits(
            labels[o : o + 1], z[o : o + 1], axis=1, grad_loss=grad_loss[o : o + 1], **sparse
        )
        _same_bits(loss[o : o + 1], one_loss)
        _same_bits(grad[o : o + 1], one_grad)


def test_grad_ops_through_tiles():
    """The Grad ops with every option, class axis 1: float32 (inner tiles)
    against float64 (per-row path), with ignored rows exactly 0."""
    tf = tf_or_skip()
    from fused_xent._tf.loader import load_op_library

    ops = load_op_library()
    rng = np.random.default_rng(9)
    outer, classes, inner = 3, 21, 19
    logits = rng.normal(size=(outer, classes, inner)) * 3
    labels = rng.integers(0, classes, size=(outer, inner)).astype(np.int32)
    labels[:, ::5] = -1
    grad_loss = rng.normal(size=(outer, inner))
    weights = np.linspace(0.5, 2.0, classes).astype(np.float32)
    lse = np.log(np.exp(logits).sum(1))
    attrs = dict(axis=1, label_smoothing=0.1, z_loss=0.02, ignore_index=-1, has_ignore_index=True)
    results = {}
    for dtype in (np.float32, np.float64):
        results[dtype] = ops.fused_xent_sparse_softmax_cross_entropy_grad(
            tf.constant(logits.astype(dtype)),
            tf.constant(labels),
            tf.constant(weights),
            tf.constant(lse),
            tf.constant(grad_loss.astype(dtype)),
            tf.zeros([0], tf.float64),
            **attrs,
        ).numpy()
    assert_close(results[np.float32], results[np.float64], "float32", scale=2)
    assert (np.moveaxis(results[np.float32], 1, -1)[labels == -1] == 0).all()

    dense_labels = rng.random(size=(outer, classes, inner))
    dense = {}
    for dtype in (np.float32, np.float64):
        dense[dtype] = ops.fused_xent_softmax_cross_entropy_grad(
            tf.constant(logits.astype(dtype)),
            tf.constant(dense_labels.astype(dtype)),
            tf.constant(lse),
            tf.constant(grad_loss.astype(dtype)),
            tf.zeros([0], tf.float64),
            axis=1,
            label_smoothing=0.1,
            z_loss=0.02,
        ).numpy()
    assert_close(dense[np.float32], dense[np.float64], "float32", scale=2)


_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    import fused_xent

    def run(y, x, t):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            a = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=0.1, z_loss=1e-4, axis=1)
            b = fused_xent.softmax_cross_entropy_with_logits(t, x, axis=1)
        return [a, b, tape.gradient(a, x), tape.gradient(b, x)]

    out = {}
    for outer, classes, inner in [(16, 21, 4096), (64, 21, 1023), (300, 2, 17), (3, 1000, 129)]:
        rng = np.random.default_rng(classes + inner)
        for dtype in (np.float32, tf.bfloat16.as_numpy_dtype):
            x = tf.constant((rng.normal(size=(outer, classes, inner)) * 4).astype(dtype))
            y = tf.constant(rng.integers(0, classes, size=(outer, inner)))
            t = tf.cast(tf.nn.softmax(tf.constant(rng.normal(size=(outer, classes, inner)).astype(np.float32)), axis=1),
                        x.dtype)
            for i, v in enumerate(run(y, x, t)):
                out[f"{outer}-{classes}-{inner}-{np.dtype(dtype).name}-{i}"] = tf.cast(v, tf.float32).numpy()
    np.savez(sys.argv[2], **out)
    """
)


def test_results_do_not_depend_on_thread_count(tmp_path):
    """Bitwise, with TensorFlow's pool split over 1, 2 and 3 threads: shards
    start and end mid-tile where inner is not a multiple of the vector width."""
    tf_or_skip()
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    results = []
    for threads in (1, 2, 3):
        out = tmp_path / f"out{threads}.npz"
        subprocess.run([sys.executable, str(script), str(threads), str(out)], check=True, env=env, timeout=300)
        results.append(np.load(out))
    assert len(results[0].files) == 4 * 2 * 4
    for other in results[1:]:
        for key in results[0].files:
            np.testing.assert_array_equal(results[0][key], other[key], err_msg=key)
