"""The CPU kernels' row groups (up to 32 classes: one row per vector lane),
against the float64 reference and against the same rows computed one at a
time (the per-row path), with edge values, every option and 16-bit logits."""

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

DTYPES = [np.float32, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])
CLASSES = [1, 2, 3, 7, 8, 9, 10, 16, 17, 31, 32]
ROWS = 75  # not a multiple of 4, 8 or 16: the last rows take the per-row path


def _name(dtype):
    return np.dtype(dtype).name


def _logits(rng, classes, dtype):
    logits = rng.normal(size=(ROWS, classes)) * 3
    logits[3] = np.nan
    logits[5, 0] = -np.inf
    logits[8] = 1e4
    logits[9] = -1e4
    logits[11, -1] = 60.0  # one class far above the rest
    return logits.astype(dtype)


def _expected(options):
    """Options as the kernels see them (float32)."""
    out = dict(options)
    for key in ("label_smoothing", "z_loss"):
        if key in out:
            out[key] = float(np.float32(out[key]))
    if "class_weights" in out:
        out["class_weights"] = np.asarray(out["class_weights"], np.float32).astype(np.float64)
    return out


SPARSE_OPTIONS = [
    {},
    {"label_smoothing": 0.1, "class_weights": "ramp"},  # every label valid, weights gathered per lane
    {"z_loss": 0.01, "ignore_index": 0},
    {"ignore_index": -100, "label_smoothing": 0.3},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64], ids=_name)
def test_sparse_groups_match_reference(dtype, classes, options, label_dtype):
    rng = np.random.default_rng(classes)
    logits = _logits(rng, classes, dtype)
    labels = rng.integers(0, classes, size=ROWS).astype(label_dtype)
    options = dict(options)
    if options.get("class_weights") == "ramp":
        options["class_weights"] = np.linspace(0.5, 2.0, classes)
    if options.get("ignore_index") == -100:
        labels[rng.random(ROWS) < 0.3] = -100
    grad_loss = rng.normal(size=ROWS).astype(dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss, **options)
    ref_loss, ref_grad = reference.sparse(
        labels, logits.astype(np.float64), grad_loss=grad_loss.astype(np.float64), **_expected(options)
    )
    assert_close(loss, ref_loss, _name(dtype), scale=2)
    assert_close(grad, ref_grad, _name(dtype), scale=2)
    ignored = labels == options.get("ignore_index", -1)
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2, "z_loss": 0.01}], ids=lambda o: ",".join(o) or "defaults"
)
def test_dense_groups_match_reference(dtype, classes, options):
    rng = np.random.default_rng(100 + classes)
    logits = _logits(rng, classes, dtype)
    labels = rng.random(size=(ROWS, classes))
    labels[rng.random(size=labels.shape) < 0.3] = 0.0
    labels /= np.maximum(labels.sum(-1, keepdims=True), 1e-6)
    if classes > 1:
        labels[5, 0] = 0.0  # a 0 label against -inf adds nothing
    labels = labels.astype(dtype)
    grad_loss = rng.normal(size=ROWS).astype(dtype)
    loss, grad = fxnp.softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss, **options)
    ref_loss, ref_grad, _ = reference.dense(
        labels.astype(np.float64),
        logits.astype(np.float64),
        grad_loss=grad_loss.astype(np.float64),
        **_expected(options),
    )
    assert_close(loss, ref_loss, _name(dtype), scale=2)
    assert_close(grad, ref_grad, _name(dtype), scale=2)


def _hard_logits(rng, classes):
    """Rows the reference cannot judge: +inf, all -inf, NaN beside -inf, float32's extremes."""
    logits = rng.normal(size=(40, classes)).astype(np.float32) * 3
    logits[1, 0] = np.inf
    logits[2] = -np.inf
    logits[3] = -np.inf
    logits[3, -1] = np.nan
    logits[4, -1] = 3e38
    logits[5, 0] = -3e38
    logits[6] = np.inf
    logits[7] = np.nan
    logits[17, :] = -np.inf
    logits[17, classes // 2] = 0.0
    return logits


def _same_values(batch, single):
    """The same bits (NaN where NaN): a row's result does not depend on its neighbours."""
    np.testing.assert_array_equal(np.asarray(batch), np.asarray(single))


def _check_rows_one_at_a_time(loss_fn, labels, logits, grad_loss, options):
    """A batch (row groups, and a padded group for the rows after the last full
    one) gives each row the bits that row alone gives."""
    loss, grad = loss_fn(labels, logits, grad_loss=grad_loss, **options)
    for row in range(len(logits)):
        one = slice(row, row + 1)
        one_loss, one_grad = loss_fn(labels[one], logits[one], grad_loss=grad_loss[one], **options)
        _same_values(loss[one], one_loss)
        _same_values(grad[row], one_grad[0])


@pytest.mark.parametrize("classes", [1, 2, 3, 8, 10, 31, 32])
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.2, "z_loss": 0.01, "ignore_index": 1}],
    ids=lambda o: ",".join(o) or "defaults",
)
def test_sparse_groups_match_rows_one_at_a_time(classes, options):
    rng = np.random.default_rng(7)
    logits = _hard_logits(rng, classes)
    labels = rng.integers(0, classes, size=len(logits))
    grad_loss = rng.normal(size=len(logits)).astype(np.float32)
    _check_rows_one_at_a_time(fxnp.sparse_softmax_cross_entropy_with_logits, labels, logits, grad_loss, options)


@pytest.mark.parametrize("classes", [1, 2, 3, 8, 10, 31, 32])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2, "z_loss": 0.01}], ids=lambda o: ",".join(o) or "defaults"
)
def test_dense_groups_match_rows_one_at_a_time(classes, options):
    rng = np.random.default_rng(8)
    logits = _hard_logits(rng, classes)
    labels = rng.random(size=logits.shape).astype(np.float32)
    labels[:, 0] = 0.0  # keeps rows with -inf in class 0 finite where they can be
    grad_loss = rng.normal(size=len(logits)).astype(np.float32)
    _check_rows_one_at_a_time(fxnp.softmax_cross_entropy_with_logits, labels, logits, grad_loss, options)


@pytest.mark.parametrize("classes", [3, 10, 32])
def test_grad_ops_through_groups(classes):
    """The Grad ops with every option: float32 (row groups) against float64
    (per-row path), with ignored rows exactly 0."""
    tf = tf_or_skip()
    from fused_xent._tf.loader import load_op_library

    ops = load_op_library()
    rng = np.random.default_rng(9)
    rows = 37
    logits = rng.normal(size=(rows, classes)) * 3
    labels = rng.integers(0, classes, size=rows).astype(np.int32)
    labels[::5] = -1
    grad_loss = rng.normal(size=rows)
    weights = np.linspace(0.5, 2.0, classes).astype(np.float32)
    lse = np.log(np.exp(logits).sum(-1))
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
    assert (results[np.float32][labels == -1] == 0).all()

    dense_labels = rng.random(size=(rows, classes))
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
