"""fused_xent.numpy: the same kernels through the pybind11 module (no TensorFlow needed)."""

import subprocess
import sys

import numpy as np
import pytest

from fused_xent import numpy as fxnp
from tests._support import reference
from tests._support.assertions import assert_rows_close, dense_target_terms, target_terms

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

DTYPES = [np.float32, np.float64, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])


def _name(dtype):
    return np.dtype(dtype).name


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", [(1, 2), (7, 13), (3, 70000), (2, 3, 11)])
def test_sparse_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    grad_loss = rng.normal(size=shape[:-1]).astype(dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss)
    assert loss.dtype == logits.dtype and grad.dtype == logits.dtype and grad.shape == shape
    g64 = grad_loss.astype(np.float64)
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64), grad_loss=g64)
    assert_rows_close(loss, ref_loss, _name(dtype), axis=None, what="loss")
    assert_rows_close(grad, ref_grad, _name(dtype), terms=target_terms(labels, shape, grad_loss=g64), what="gradient")


@pytest.mark.parametrize("shape", [(64, 3000), (4096, 10), (2, 40000)])
def test_float32_is_within_a_few_roundings_of_float64(shape):
    # Far tighter than the tolerance the other tests use (2e-6): the vector exp
    # and the sums must stay within a few float32 roundings of the exact result.
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=shape) * 4).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=np.ones(shape[0], np.float32))
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64), grad_loss=np.ones(shape[0]))
    loss_error = np.abs(loss - ref_loss) / np.maximum(1.0, np.abs(ref_loss))
    assert loss_error.max() < 6e-7, loss_error.max()
    assert np.abs(grad - ref_grad).max() < 6e-7  # |grad| <= 1: a few roundings of 1


@pytest.mark.parametrize(
    "options",
    [{"label_smoothing": 0.2}, {"z_loss": 0.01}, {"ignore_index": 3}, {"class_weights": np.arange(1, 8) / 3.0}],
    ids=lambda o: ",".join(o),
)
def test_sparse_options(options):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 7))
    labels = rng.integers(0, 7, size=30)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, **options)
    expected = {k: float(np.float32(v)) if k in ("label_smoothing", "z_loss") else v for k, v in options.items()}
    if "class_weights" in expected:
        expected["class_weights"] = expected["class_weights"].astype(np.float32)
    ref_loss, ref_grad = reference.sparse(labels, logits, **expected)
    assert_rows_close(loss, ref_loss, "float64", axis=None, what="loss")
    assert_rows_close(grad, ref_grad, "float64", terms=target_terms(labels, logits.shape, **expected), what="gradient")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_dense_with_axis_and_broadcast_labels(axis):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 5, 6))
    labels = rng.random(size=(4, 5, 6))
    loss, grad = fxnp.softmax_cross_entropy_with_logits(labels, logits, axis=axis, label_smoothing=0.1, z_loss=0.01)
    ref_loss, ref_grad, _ = reference.dense(
        labels, logits, axis=axis, label_smoothing=float(np.float32(0.1)), z_loss=float(np.float32(0.01))
    )
    assert_rows_close(loss, ref_loss, "float64", axis=None, what="loss")
    terms = dense_target_terms(labels, logits.shape, axis=axis, label_smoothing=float(np.float32(0.1)))
    assert_rows_close(grad, ref_grad, "float64", axis=axis, terms=terms, what="gradient")
    row = np.full((6,), 1 / 6)
    loss, _ = fxnp.softmax_cross_entropy_with_logits(row, logits)
    assert_rows_close(loss, reference.dense(row, logits)[0], "float64", axis=None, what="loss")


def test_loss_only_and_sparse_axis():
    logits = np.random.default_rng(3).normal(size=(3, 8, 2)).astype(np.float32)
    labels = np.array([[0, 7], [3, 3], [1, 2]])
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, axis=1, compute_gradient=False)
    assert grad is None
    assert_rows_close(loss, reference.sparse(labels, logits.astype(np.float64), axis=1)[0], "float32", axis=None)


def test_non_contiguous_input_is_accepted():
    logits = np.random.default_rng(4).normal(size=(6, 10))[:, ::2]
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits([0, 1, 2, 3, 4, 0], logits)
    ref_loss, ref_grad = reference.sparse([0, 1, 2, 3, 4, 0], logits)
    assert_rows_close(loss, ref_loss, "float64", axis=None, what="loss")
    assert_rows_close(grad, ref_grad, "float64", terms=target_terms([0, 1, 2, 3, 4, 0], logits.shape), what="gradient")


def test_bad_input():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"label value of 4 which is outside the valid range of \[0, 4\)"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 4, 1], logits)
    with pytest.raises(ValueError, match=r"`labels.shape` must equal `logits.shape` except for the class axis"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 1], logits)
    with pytest.raises(TypeError, match=r"labels must be integer"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0.0, 1.0, 2.0], logits)
    with pytest.raises(TypeError, match=r"logits must be"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 1, 2], logits.astype(np.int32))
    with pytest.raises(ValueError, match=r"scalar"):
        fxnp.sparse_softmax_cross_entropy_with_logits(0, np.float32(1.0))
    with pytest.raises(ValueError, match=r"at least one class"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 0], np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"class_weights has 2 entries but logits have 4 classes"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 1, 2], logits, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"label_smoothing"):
        fxnp.softmax_cross_entropy_with_logits(np.ones((3, 4)), logits, label_smoothing=-0.5)
    with pytest.raises(ValueError):
        fxnp.softmax_cross_entropy_with_logits(np.ones((3, 5)), logits)


def test_private_module_checks_buffer_sizes():
    from fused_xent import _core

    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"logits has 6 elements, expected 12"):
        _core.sparse(
            "float32",
            logits,
            np.zeros(4, np.int64),
            4,
            3,
            1,
            0.0,
            0.0,
            None,
            None,
            np.zeros(4, np.float32),
            np.zeros(4),
            None,
            None,
        )


def test_empty_batch():
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(np.zeros(0, int), np.zeros((0, 5)))
    assert loss.shape == (0,) and grad.shape == (0, 5)


def test_works_without_tensorflow(tmp_path):
    # A meta-path hook makes `import tensorflow` fail, as on a machine without it.
    script = tmp_path / "no_tf.py"
    script.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, fused_xent\n"
        "loss, grad = fused_xent.numpy.sparse_softmax_cross_entropy_with_logits([1], np.array([[0.0, 1.0]]))\n"
        "print('loss', float(loss[0]))\n"
        "assert 'tensorflow' not in sys.modules\n"
        "try:\n"
        "    fused_xent.sparse_softmax_cross_entropy_with_logits([1], [[0.0, 1.0]])\n"
        "except ImportError as e:\n"
        "    print('error', e)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "loss 0.313261" in out
    assert "needs TensorFlow, which is not installed" in out


@pytest.mark.parametrize("classes", [1, 2, 5, 32, 33])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3, "z_loss": 0.01}, {"ignore_index": 0}])
def test_many_rows_few_classes_with_edge_values(classes, options):
    # Few classes take the row-group path (one row per vector lane): edge values must stay per row.
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(67, classes)).astype(np.float32) * 4
    logits[3] = np.nan
    logits[5, 0] = -np.inf
    logits[8] = 1e4
    logits[9] = -1e4
    logits[10, -1] = 3e38
    labels = rng.integers(0, classes, size=67)
    grad_loss = rng.normal(size=67).astype(np.float32)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss, **options)
    expected = {k: float(np.float32(v)) if k != "ignore_index" else v for k, v in options.items()}
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64), grad_loss=grad_loss, **expected)
    # Confidently right rows failed while the max's 1 was summed with the other terms: C=2 row 48
    # gave loss 1.5497e-06 for 1.4996e-06, C=5 row 12 0.00076336 for 0.00076337.
    assert_rows_close(loss, ref_loss, "float32", axis=None, what="loss")
    terms = target_terms(labels, logits.shape, grad_loss=grad_loss, **expected)
    assert_rows_close(grad, ref_grad, "float32", terms=terms, what="gradient")
    ignored = labels == options.get("ignore_index", -1)
    assert np.isnan(loss[3]) != ignored[3]
    assert np.isfinite(loss[[0, 1, 2, 4, 6, 7]]).all()


@pytest.mark.parametrize("classes", [1, 3, 32, 40])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "z_loss": 0.01}])
def test_dense_many_rows_few_classes_with_edge_values(classes, options):
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(35, classes)).astype(np.float32) * 4
    labels = rng.random(size=(35, classes)).astype(np.float32)
    labels /= labels.sum(-1, keepdims=True)
    logits[2] = np.nan
    if classes > 1:
        logits[4, 0], labels[4, 0] = -np.inf, 0.0  # a 0 label against -inf adds nothing
    logits[6] = 1e4
    grad_loss = rng.normal(size=35).astype(np.float32)
    loss, grad = fxnp.softmax_cross_entropy_with_logits(labels, logits, grad_loss=grad_loss, **options)
    expected = {k: float(np.float32(v)) for k, v in options.items()}
    ref_loss, ref_grad, _ = reference.dense(
        labels.astype(np.float64), logits.astype(np.float64), grad_loss=grad_loss, **expected
    )
    assert_rows_close(loss, ref_loss, "float32", axis=None, what="loss")
    terms = dense_target_terms(
        labels, logits.shape, grad_loss=grad_loss, **{k: v for k, v in expected.items() if k != "z_loss"}
    )
    assert_rows_close(grad, ref_grad, "float32", terms=terms, what="gradient")
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    if classes > 1 and not options:
        assert np.isfinite(loss[4]) and np.isfinite(grad[4]).all()


# --- Issue 14: shapes, label dtypes and values the documentation promises ----------------


def test_rank1_logits_take_a_scalar_label():
    logits = np.array([0.5, -1.0, 2.0])
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(1, logits, grad_loss=2.0)
    ref_loss, ref_grad = reference.sparse([1], logits[None], grad_loss=[2.0])
    assert loss.shape == () and grad.shape == (3,)
    assert_rows_close(loss, ref_loss[0], "float64", axis=None)
    assert_rows_close(grad, ref_grad[0], "float64", terms=target_terms([1], (1, 3), grad_loss=[2.0])[0])
    loss, grad = fxnp.softmax_cross_entropy_with_logits([0.2, 0.3, 0.5], logits)
    ref_loss, ref_grad, _ = reference.dense([[0.2, 0.3, 0.5]], logits[None])
    assert loss.shape == () and grad.shape == (3,)
    assert_rows_close(loss, ref_loss[0], "float64", axis=None)
    assert_rows_close(grad, ref_grad[0], "float64", terms=[0.2, 0.3, 0.5])


@pytest.mark.parametrize("shape, axis", [((2, 5, 0), 1), ((0, 5, 0), 1), ((2, 5, 3, 0), 1), ((5, 0), 0)])
def test_empty_dimension_after_the_class_axis(shape, axis):
    reduced = shape[:axis] + shape[axis + 1 :]
    logits = np.zeros(shape, np.float32)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(np.zeros(reduced, np.int64), logits, axis=axis)
    assert loss.shape == reduced and grad.shape == shape
    loss, grad = fxnp.softmax_cross_entropy_with_logits(logits, logits, axis=axis)
    assert loss.shape == reduced and grad.shape == shape


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_unsigned_labels_match_signed_ones(dtype):
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(12, 6))
    labels = rng.integers(0, 6, size=12)
    labels[::5] = 5
    expected = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, ignore_index=5)
    actual = fxnp.sparse_softmax_cross_entropy_with_logits(labels.astype(dtype), logits, ignore_index=5)
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])


@pytest.mark.parametrize(
    "dtype, value, ignore_index",
    [
        (np.uint32, 2**32 - 100, -100),  # would wrap onto ignore_index as int32
        (np.uint32, 2**31 + 1, None),  # wraps to a negative int32
        (np.uint64, 2**64 - 1, -1),  # would wrap onto ignore_index as int64
        (np.uint64, 2**63 + 2, None),
        (np.uint8, 200, None),
    ],
)
def test_unsigned_labels_out_of_range_name_their_value(dtype, value, ignore_index):
    labels = np.array([0, value, 1], dtype)
    with pytest.raises(ValueError, match=rf"label value of {value} which is outside the valid range of \[0, 4\)"):
        fxnp.sparse_softmax_cross_entropy_with_logits(labels, np.zeros((3, 4)), ignore_index=ignore_index)


@pytest.mark.parametrize("dtype, ignore_index", [(np.uint8, 255), (np.uint64, 2**64 - 1), (np.uint32, 2**32 - 1)])
def test_unsigned_ignore_index_at_the_top_of_the_range(dtype, ignore_index):
    logits = np.random.default_rng(12).normal(size=(3, 4))
    labels = np.array([2, ignore_index, 0], dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, ignore_index=ignore_index)
    ref_loss, ref_grad = reference.sparse([2, 0, 0], logits)
    assert loss[1] == 0 and not grad[1].any()
    assert_rows_close(loss[[0, 2]], ref_loss[[0, 2]], "float64", axis=None)
    assert_rows_close(grad[[0, 2]], ref_grad[[0, 2]], "float64", terms=target_terms([2, 0], (2, 4)))


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("ignore_index", [2**32, -(2**40), 2**70, -(2**70)])
def test_ignore_index_no_label_can_hold_ignores_nothing(label_dtype, ignore_index):
    logits = np.random.default_rng(13).normal(size=(4, 3))
    labels = np.array([0, 1, 2, 0], label_dtype)
    loss, grad = fxnp.sparse_softmax_cross_entropy_with_logits(labels, logits, ignore_index=ignore_index)
    ref_loss, ref_grad = reference.sparse(labels, logits)
    assert_rows_close(loss, ref_loss, "float64", axis=None)
    assert_rows_close(grad, ref_grad, "float64", terms=target_terms(labels, logits.shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5])
def test_bad_class_weight_values_raise(bad):
    weights = np.array([1.0, bad, 2.0])
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        fxnp.sparse_softmax_cross_entropy_with_logits([0, 2], np.zeros((2, 3)), class_weights=weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_private_module_checks_class_weight_values(bad):
    from fused_xent import _core

    weights = np.array([1.0, bad, 2.0], np.float32)
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0, got .* for class 1"):
        _core.sparse(
            "float32",
            np.zeros((2, 3), np.float32),
            np.zeros(2, np.int64),
            2,
            3,
            1,
            0.0,
            0.0,
            None,
            weights,
            np.zeros(2, np.float32),
            np.zeros(2),
            None,
            None,
        )


def test_private_module_rejects_overflowing_layouts():
    # 4 rows of 2**62 + 1 classes: rows * classes wraps to 4, the size of every
    # buffer passed, so only an overflow check stops a read far outside them.
    code = (
        "import numpy as np; from fused_xent import _core\n"
        "try:\n"
        "    _core.sparse('float32', np.zeros(4, np.float32), np.zeros(4, np.int64), 4, 2**62 + 1, 1, 0.0, 0.0,\n"
        "                 None, None, np.zeros(4, np.float32), np.zeros(4), None, None)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "invalid layout" in out.stdout, (out.returncode, out.stderr[-2000:])
