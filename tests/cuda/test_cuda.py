"""The CUDA kernels through the pybind11 module (fused_xent.cuda), against the
float64 NumPy reference and, where PyTorch exists, torch.nn.functional.cross_entropy.

Needs a build with CUDA, a visible GPU and PyTorch or CuPy; skips otherwise.
Never imports TensorFlow.
"""

import numpy as np
import pytest

from fused_xent import _core
from tests._support import reference
from tests._support.assertions import assert_rows_close, dense_target_terms, target_terms

if not _core.build_info()["cuda"]:
    pytest.skip("this build of fused_xent has no CUDA kernels", allow_module_level=True)
if _core.cuda_device_count() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from fused_xent import cuda as fxcuda  # noqa: E402

try:
    import torch

    if not torch.cuda.is_available():
        torch = None
except ImportError:
    torch = None
try:
    import cupy
except ImportError:
    cupy = None
if torch is None and cupy is None:
    pytest.skip("neither PyTorch (with CUDA) nor CuPy is installed", allow_module_level=True)
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch with CUDA")

DTYPES = ["float32", "float64", "float16"] + (["bfloat16"] if torch is not None else [])


# --- moving arrays between NumPy and the device -------------------------------------------
def to_device(array, dtype=None):
    """A NumPy array on the GPU (PyTorch when available, else CuPy), cast to `dtype`."""
    array = np.asarray(array)
    if torch is not None:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if dtype is not None:
            t = t.to(getattr(torch, dtype))
        return t.cuda()
    return cupy.asarray(array if dtype is None else array.astype(dtype))


def to_numpy(x):
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.double() if x.dtype == torch.bfloat16 else x).cpu().numpy()
    return cupy.asnumpy(x)


def rounded(array, dtype):
    """The values `array` takes in `dtype`, as float64 (what the kernel sees)."""
    return to_numpy(to_device(array, dtype)).astype(np.float64)


def random_logits(rng, shape, dtype, scale=3.0):
    return rounded(rng.normal(size=shape) * scale, dtype)


# --- sparse labels ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 2), (7, 13), (3, 70000), (2, 3, 11), (37, 1001), (129, 4097), (5, 32000), (2, 262144), (65536, 3), (4096, 67)],
)
def test_sparse_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    logits = random_logits(rng, shape, dtype)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    grad_loss = rounded(rng.normal(size=shape[:-1]), dtype)
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits, dtype), grad_loss=to_device(grad_loss, dtype)
    )
    assert tuple(loss.shape) == shape[:-1] and tuple(grad.shape) == shape
    ref_loss, ref_grad = reference.sparse(labels, logits, grad_loss=grad_loss)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(
        to_numpy(grad), ref_grad, dtype, terms=target_terms(labels, shape, grad_loss=grad_loss), what="gradient"
    )


OPTIONS = [
    {"label_smoothing": 0.2},
    {"z_loss": 0.01},
    {"ignore_index": 3},
    {"class_weights": "weights"},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": 0, "class_weights": "weights"},
]


def _expected_options(options, weights):
    expected = {k: float(np.float32(v)) if k in ("label_smoothing", "z_loss") else v for k, v in options.items()}
    if "class_weights" in expected:
        expected["class_weights"] = weights.astype(np.float32)
    return expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("shape", [(30, 7), (33, 2053), (3, 40000)])
def test_sparse_options(dtype, label_dtype, options, shape):
    rng = np.random.default_rng(1)
    classes = shape[-1]
    logits = random_logits(rng, shape, dtype, scale=2.0)
    labels = rng.integers(0, classes, size=shape[:-1])
    labels[::4] = 3  # some rows hit ignore_index
    weights = rng.random(classes) + 0.5
    kwargs = dict(options)
    if "class_weights" in kwargs:
        kwargs["class_weights"] = to_device(weights, "float32")
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels, label_dtype), to_device(logits, dtype), **kwargs
    )
    expected = _expected_options(options, weights)
    ref_loss, ref_grad = reference.sparse(labels, logits, **expected)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(to_numpy(grad), ref_grad, dtype, terms=target_terms(labels, shape, **expected), what="gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis,shape", [(0, (300, 5)), (1, (4, 300, 7)), (1, (2, 5000, 3)), (0, (70000, 2))])
def test_sparse_class_axis_not_last(dtype, axis, shape):
    rng = np.random.default_rng(2)
    logits = random_logits(rng, shape, dtype)
    reduced = shape[:axis] + shape[axis + 1 :]
    labels = rng.integers(0, shape[axis], size=reduced)
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits, dtype), axis=axis, label_smoothing=0.1, z_loss=1e-3
    )
    expected = dict(label_smoothing=float(np.float32(0.1)), z_loss=float(np.float32(1e-3)))
    ref_loss, ref_grad = reference.sparse(labels, logits, axis=axis, **expected)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(
        to_numpy(grad), ref_grad, dtype, axis=axis, terms=target_terms(labels, shape, axis, **expected), what="gradient"
    )


@pytest.mark.parametrize("classes", [1, 2, 5, 32, 33, 1000])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3, "z_loss": 0.01}, {"ignore_index": 0}])
def test_sparse_edge_values(classes, options):
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(67, classes)).astype(np.float32) * 4
    logits[3] = np.nan
    logits[5, 0] = -np.inf
    logits[8] = 1e4
    logits[9] = -1e4
    logits[10, -1] = 3e38
    labels = rng.integers(0, classes, size=67)
    grad_loss = rng.normal(size=67).astype(np.float32)
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits), grad_loss=to_device(grad_loss), **options
    )
    loss, grad = to_numpy(loss), to_numpy(grad)
    expected = {k: float(np.float32(v)) if k != "ignore_index" else v for k, v in options.items()}
    ref_loss, ref_grad = reference.sparse(labels, logits.astype(np.float64), grad_loss=grad_loss, **expected)
    assert_rows_close(loss, ref_loss, "float32", axis=None, what="loss")
    terms = target_terms(labels, logits.shape, grad_loss=grad_loss, **expected)
    assert_rows_close(grad, ref_grad, "float32", terms=terms, what="gradient")
    ignored = labels == options.get("ignore_index", -1)
    assert np.isnan(loss[3]) != ignored[3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_labels_give_nan_rows(dtype):
    rng = np.random.default_rng(3)
    logits = random_logits(rng, (6, 9), dtype)
    labels = np.array([0, 9, -1, 4, 8, 100])
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits, dtype), ignore_index=4
    )
    loss, grad = to_numpy(loss), to_numpy(grad)
    bad = np.array([False, True, True, False, False, True])
    assert np.isnan(loss[bad]).all() and np.isnan(grad[bad]).all()
    good = ~bad
    good_labels = labels[good]
    ref_loss, ref_grad = reference.sparse(good_labels, logits[good], ignore_index=4)
    assert_rows_close(loss[good], ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(
        grad[good], ref_grad, dtype, terms=target_terms(good_labels, ref_grad.shape, ignore_index=4), what="gradient"
    )


def test_ignored_row_and_gradient_in_place():
    """An ignored row's gradient is exactly 0, and grad_logits may alias logits."""
    rng = np.random.default_rng(4)
    shape = (40, 3001)
    logits = rng.normal(size=shape) * 2
    labels = rng.integers(0, shape[1], size=40)
    labels[0] = 7  # ignored below
    grad_loss = rng.normal(size=40)
    z, y = to_device(logits), to_device(labels)
    common = dict(
        dtype="float64",
        logits=z,
        labels=y,
        outer=40,
        classes=shape[1],
        inner=1,
        label_smoothing=0.1,
        z_loss=0.01,
        ignore_index=7,
        class_weights=None,
    )
    stream = fxcuda._backend(z).stream()
    loss, lse = to_device(np.zeros(40)), to_device(np.zeros(40))
    _core.cuda_sparse_forward(loss=loss, lse=lse, stream=stream, **common)
    grad = to_device(np.zeros(shape))
    _core.cuda_sparse_backward(lse=lse, grad_loss=to_device(grad_loss), grad_logits=grad, stream=stream, **common)
    expected = dict(ignore_index=7, label_smoothing=float(np.float32(0.1)), z_loss=float(np.float32(0.01)))
    ref_loss, ref_grad = reference.sparse(labels, logits, grad_loss=grad_loss, **expected)
    assert_rows_close(to_numpy(lse), reference._lse(logits), "float64", axis=None, what="lse")
    assert_rows_close(to_numpy(loss), ref_loss, "float64", axis=None, what="loss")
    terms = target_terms(labels, shape, grad_loss=grad_loss, **expected)
    assert_rows_close(to_numpy(grad), ref_grad, "float64", terms=terms, what="gradient")
    assert (to_numpy(grad)[labels == 7] == 0).all()
    in_place = to_device(logits)
    _core.cuda_sparse_backward(
        lse=lse, grad_loss=to_device(grad_loss), grad_logits=in_place, stream=stream, **dict(common, logits=in_place)
    )
    assert np.array_equal(to_numpy(in_place), to_numpy(grad))


# --- dense labels -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (7, 13), (3, 70000), (37, 1001), (2, 262144), (65536, 3), (4, 5, 6)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 0.01}], ids=["plain", "smooth,zloss"])
def test_dense_matches_reference(dtype, shape, options):
    rng = np.random.default_rng(5)
    logits = random_logits(rng, shape, dtype)
    labels = rng.random(size=shape)
    labels = rounded(labels / labels.sum(-1, keepdims=True), dtype)
    grad_loss = rounded(rng.normal(size=shape[:-1]), dtype)
    loss, grad = fxcuda.softmax_cross_entropy_with_logits(
        to_device(labels, dtype), to_device(logits, dtype), grad_loss=to_device(grad_loss, dtype), **options
    )
    expected = {k: float(np.float32(v)) for k, v in options.items()}
    ref_loss, ref_grad, _ = reference.dense(labels, logits, grad_loss=grad_loss, **expected)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    terms = dense_target_terms(labels, shape, label_smoothing=expected.get("label_smoothing", 0.0), grad_loss=grad_loss)
    assert_rows_close(to_numpy(grad), ref_grad, dtype, terms=terms, what="gradient")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_dense_with_axis(axis):
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 500, 6))
    labels = rng.random(size=(4, 500, 6))
    loss, grad = fxcuda.softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits), axis=axis, label_smoothing=0.1, z_loss=0.01
    )
    smoothing = float(np.float32(0.1))
    ref_loss, ref_grad, _ = reference.dense(
        labels, logits, axis=axis, label_smoothing=smoothing, z_loss=float(np.float32(0.01))
    )
    assert_rows_close(to_numpy(loss), ref_loss, "float64", axis=None, what="loss")
    assert_rows_close(
        to_numpy(grad),
        ref_grad,
        "float64",
        axis=axis,
        terms=dense_target_terms(labels, logits.shape, axis, smoothing),
        what="gradient",
    )


@pytest.mark.parametrize("classes", [1, 3, 40, 5000])
def test_dense_edge_values(classes):
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(35, classes)).astype(np.float32) * 4
    labels = rng.random(size=(35, classes)).astype(np.float32)
    labels /= labels.sum(-1, keepdims=True)
    logits[2] = np.nan
    if classes > 1:
        logits[4, 0], labels[4, 0] = -np.inf, 0.0  # a 0 label against -inf adds nothing
    logits[6] = 1e4
    grad_loss = rng.normal(size=35).astype(np.float32)
    loss, grad = fxcuda.softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits), grad_loss=to_device(grad_loss)
    )
    loss, grad = to_numpy(loss), to_numpy(grad)
    ref_loss, ref_grad, _ = reference.dense(labels.astype(np.float64), logits.astype(np.float64), grad_loss=grad_loss)
    assert_rows_close(loss, ref_loss, "float32", axis=None, what="loss")
    assert_rows_close(
        grad, ref_grad, "float32", terms=dense_target_terms(labels, logits.shape, grad_loss=grad_loss), what="gradient"
    )
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    if classes > 1:
        assert np.isfinite(loss[4]) and np.isfinite(grad[4]).all()


# --- buffers, determinism, errors -------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_buffers(dtype, offset):
    """Buffers that do not start on 16 bytes (views at an offset) take the head/tail or scalar paths."""
    rng = np.random.default_rng(7)
    shape = (9, 1030)
    logits = random_logits(rng, shape, dtype)
    labels = rng.random(size=shape)
    storage = torch.zeros(logits.size + offset, dtype=getattr(torch, dtype), device="cuda")
    z = storage[offset:].view(shape)
    z.copy_(to_device(logits, dtype))
    t = to_device(labels, dtype)  # 16-byte aligned: a different phase from z
    loss, grad = fxcuda.softmax_cross_entropy_with_logits(t, z)
    labels = rounded(labels, dtype)
    ref_loss, ref_grad, _ = reference.dense(labels, logits)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(to_numpy(grad), ref_grad, dtype, terms=dense_target_terms(labels, shape), what="gradient")
    sparse_labels = rng.integers(0, shape[1], size=shape[0])
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(to_device(sparse_labels), z)
    ref_loss, ref_grad = reference.sparse(sparse_labels, logits)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(to_numpy(grad), ref_grad, dtype, terms=target_terms(sparse_labels, shape), what="gradient")


@pytest.mark.parametrize("shape", [(3, 262144), (512, 32000), (4096, 7)])
def test_deterministic(shape):
    rng = np.random.default_rng(8)
    logits = to_device(rng.normal(size=shape), "float32")
    labels = to_device(rng.integers(0, shape[1], size=shape[0]))
    dense_labels = to_device(rng.random(size=shape), "float32")
    first = fxcuda.sparse_softmax_cross_entropy_with_logits(labels, logits, label_smoothing=0.1)
    dense_first = fxcuda.softmax_cross_entropy_with_logits(dense_labels, logits)
    for _ in range(3):
        again = fxcuda.sparse_softmax_cross_entropy_with_logits(labels, logits, label_smoothing=0.1)
        dense_again = fxcuda.softmax_cross_entropy_with_logits(dense_labels, logits)
        for a, b in zip(first + dense_first, again + dense_again):
            assert np.array_equal(to_numpy(a), to_numpy(b), equal_nan=True)


def test_loss_only_and_empty_batch():
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(np.zeros(0, np.int64)), to_device(np.zeros((0, 5), np.float32))
    )
    assert tuple(loss.shape) == (0,) and tuple(grad.shape) == (0, 5)
    logits = np.random.default_rng(3).normal(size=(3, 8, 2)).astype(np.float32)
    labels = np.array([[0, 7], [3, 3], [1, 2]])
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits), axis=1, compute_gradient=False
    )
    assert grad is None
    ref_loss = reference.sparse(labels, logits.astype(np.float64), axis=1)[0]
    assert_rows_close(to_numpy(loss), ref_loss, "float32", axis=None, what="loss")


def test_bad_input():
    logits = to_device(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"`labels.shape` must equal `logits.shape` except for the class axis"):
        fxcuda.sparse_softmax_cross_entropy_with_logits(to_device(np.array([0, 1])), logits)
    with pytest.raises(TypeError, match=r"labels must be integer"):
        fxcuda.sparse_softmax_cross_entropy_with_logits(to_device(np.zeros(3)), logits)
    with pytest.raises(ValueError, match=r"class_weights has 2 entries but logits have 4 classes"):
        fxcuda.sparse_softmax_cross_entropy_with_logits(
            to_device(np.zeros(3, np.int64)), logits, class_weights=[1.0, 2.0]
        )
    with pytest.raises(TypeError, match=r"PyTorch CUDA tensor or a CuPy array"):
        fxcuda.sparse_softmax_cross_entropy_with_logits([0, 1, 2], np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"logits has 12 elements, expected 24"):
        _core.cuda_sparse_forward(
            "float32",
            logits,
            to_device(np.zeros(6, np.int64)),
            6,
            4,
            1,
            0.0,
            0.0,
            None,
            None,
            to_device(np.zeros(6, np.float32)),
            to_device(np.zeros(6)),
            0,
        )
    with pytest.raises(ValueError, match=r"wrong element type"):
        _core.cuda_sparse_forward(
            "float64",
            logits,
            to_device(np.zeros(3, np.int64)),
            3,
            4,
            1,
            0.0,
            0.0,
            None,
            None,
            to_device(np.zeros(3, np.float32)),
            to_device(np.zeros(3)),
            0,
        )
    with pytest.raises(TypeError, match=r"__cuda_array_interface__"):
        _core.cuda_dense_forward(
            "float32",
            np.zeros((3, 4), np.float32),
            logits,
            3,
            4,
            1,
            0.0,
            0.0,
            to_device(np.zeros(3, np.float32)),
            to_device(np.zeros(3)),
            0,
        )


# --- against PyTorch -------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"ignore_index": 2}, {"weight": True}],
    ids=["plain", "smoothing", "ignore", "weight"],
)
@pytest.mark.parametrize("shape", [(64, 1000), (8, 32000)])
def test_matches_torch_cross_entropy(dtype, options, shape):
    """torch.nn.functional.cross_entropy (reduction='none') in float64 on the same rounded inputs."""
    import torch.nn.functional as F

    rng = np.random.default_rng(11)
    logits = random_logits(rng, shape, dtype)
    labels = rng.integers(0, shape[1], size=shape[0])
    labels[::5] = 2
    weights = rng.random(shape[1]) + 0.5
    ref_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    torch_options = dict(options)
    ours = {k: v for k, v in options.items() if k != "weight"}
    if options.get("weight"):
        torch_options["weight"] = torch.tensor(weights.astype(np.float32).astype(np.float64))
        ours["class_weights"] = to_device(weights, "float32")
    ref_loss = F.cross_entropy(ref_logits, torch.tensor(labels), reduction="none", **torch_options)
    ref_loss.sum().backward()
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(to_device(labels), to_device(logits, dtype), **ours)
    assert_rows_close(to_numpy(loss), ref_loss.detach().numpy(), dtype, axis=None, what="loss")
    terms = target_terms(
        labels,
        shape,
        ignore_index=options.get("ignore_index"),
        label_smoothing=options.get("label_smoothing", 0.0),
        class_weights=torch_options["weight"].numpy() if options.get("weight") else None,
    )
    assert_rows_close(to_numpy(grad), ref_logits.grad.numpy(), dtype, terms=terms, what="gradient")


@needs_torch
def test_runs_on_the_current_torch_stream():
    rng = np.random.default_rng(12)
    logits = to_device(rng.normal(size=(256, 5000)), "float32")
    labels = to_device(rng.integers(0, 5000, size=256))
    expected = fxcuda.sparse_softmax_cross_entropy_with_logits(labels, logits)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(labels, logits)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(loss, expected[0]) and torch.equal(grad, expected[1])


# --- few long rows (split across blocks), bfloat16, the workspace ---------------------------------------
def _cpu_dtype(dtype):
    """The NumPy dtype of the CPU kernels (fused_xent.numpy) for `dtype`; None without ml_dtypes."""
    if dtype == "bfloat16":
        return ml_dtypes.bfloat16 if ml_dtypes is not None else None
    return np.dtype(dtype)


def _against_cpu(gpu, cpu, dtype, what):
    """The GPU's values against the CPU kernels' on the same inputs: the same formulas, summed in a
    different order, so they agree to a few roundings of `dtype` relative to the row's largest value."""
    gpu, cpu = np.asarray(gpu, np.float64), np.asarray(cpu, np.float64)
    eps = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    scale = np.max(np.abs(cpu), axis=-1, keepdims=True) if cpu.ndim > 1 else np.abs(cpu)
    assert np.all(np.abs(gpu - cpu) <= 16 * eps * np.maximum(scale, np.finfo(np.float64).tiny)), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 200000), (1, 262144), (8, 262144), (3, 100003), (2, 3, 65536)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}], ids=["plain", "smooth,zloss"])
def test_few_long_rows_are_split_across_blocks(dtype, shape, options):
    """Rows too few to fill the GPU are cut into chunks, one block each, whose partial sums are
    merged (the forward) or that write their part of the gradient (the backward): against the
    float64 reference and against the CPU kernels, sparse and dense labels."""
    rng = np.random.default_rng(13)
    logits = random_logits(rng, shape, dtype)
    logits.reshape(-1, shape[-1])[0, shape[-1] // 2] += 30  # one confident row: the chunks' maxima differ
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    grad_loss = rounded(rng.normal(size=shape[:-1]), dtype)
    rows = int(np.prod(shape[:-1]))
    assert (
        _core.workspace_bytes(
            "sparse_forward", rows, shape[-1], 1, np.dtype("float16" if dtype == "bfloat16" else dtype).itemsize
        )
        > 0
    )
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels), to_device(logits, dtype), grad_loss=to_device(grad_loss, dtype), **options
    )
    expected = {k: float(np.float32(v)) for k, v in options.items()}
    ref_loss, ref_grad = reference.sparse(labels, logits, grad_loss=grad_loss, **expected)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    assert_rows_close(
        to_numpy(grad),
        ref_grad,
        dtype,
        terms=target_terms(labels, shape, grad_loss=grad_loss, **expected),
        what="gradient",
    )
    cpu_dtype = _cpu_dtype(dtype)
    if cpu_dtype is not None:
        import fused_xent.numpy as fxnp

        cpu_loss, cpu_grad = fxnp.sparse_softmax_cross_entropy_with_logits(
            labels, logits.astype(cpu_dtype), grad_loss=grad_loss.astype(cpu_dtype), **options
        )
        _against_cpu(to_numpy(loss), cpu_loss, dtype, "loss against the CPU kernels")
        _against_cpu(to_numpy(grad), cpu_grad, dtype, "gradient against the CPU kernels")
    targets = rng.random(size=shape)
    targets = rounded(targets / targets.sum(-1, keepdims=True), dtype)
    loss, grad = fxcuda.softmax_cross_entropy_with_logits(
        to_device(targets, dtype), to_device(logits, dtype), grad_loss=to_device(grad_loss, dtype), **options
    )
    ref_loss, ref_grad, _ = reference.dense(targets, logits, grad_loss=grad_loss, **expected)
    assert_rows_close(to_numpy(loss), ref_loss, dtype, axis=None, what="dense loss")
    terms = dense_target_terms(
        targets, shape, label_smoothing=expected.get("label_smoothing", 0.0), grad_loss=grad_loss
    )
    assert_rows_close(to_numpy(grad), ref_grad, dtype, terms=terms, what="dense gradient")


@needs_torch
@pytest.mark.parametrize("shape", [(512, 32000), (64, 4097), (2, 128256), (4096, 100)])
def test_bfloat16_matches_cpu_kernels(shape):
    """bfloat16 logits (loaded 16 bytes at a time, converted and visited two packs at a time,
    stored two values per conversion) against the float64 reference and the CPU kernels."""
    rng = np.random.default_rng(14)
    logits = random_logits(rng, shape, "bfloat16")
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    grad_loss = rounded(rng.normal(size=shape[:-1]), "bfloat16")
    loss, grad = fxcuda.sparse_softmax_cross_entropy_with_logits(
        to_device(labels),
        to_device(logits, "bfloat16"),
        grad_loss=to_device(grad_loss, "bfloat16"),
        label_smoothing=0.05,
    )
    smoothing = float(np.float32(0.05))
    ref_loss, ref_grad = reference.sparse(labels, logits, grad_loss=grad_loss, label_smoothing=smoothing)
    assert_rows_close(to_numpy(loss), ref_loss, "bfloat16", axis=None, what="loss")
    assert_rows_close(
        to_numpy(grad),
        ref_grad,
        "bfloat16",
        terms=target_terms(labels, shape, grad_loss=grad_loss, label_smoothing=smoothing),
        what="gradient",
    )
    if ml_dtypes is not None:
        import fused_xent.numpy as fxnp

        cpu_loss, cpu_grad = fxnp.sparse_softmax_cross_entropy_with_logits(
            labels,
            logits.astype(ml_dtypes.bfloat16),
            grad_loss=grad_loss.astype(ml_dtypes.bfloat16),
            label_smoothing=0.05,
        )
        _against_cpu(to_numpy(loss), cpu_loss, "bfloat16", "loss against the CPU kernels")
        _against_cpu(to_numpy(grad), cpu_grad, "bfloat16", "gradient against the CPU kernels")


@needs_torch
def test_workspace_argument():
    """The bindings take the workspace from the caller (fused_xent.cuda passes one from PyTorch's
    allocator): the same bits as with their own, and too small a buffer is refused."""
    rng = np.random.default_rng(15)
    shape = (4, 200000)
    logits = to_device(rng.normal(size=shape), "float32")
    labels = to_device(rng.integers(0, shape[1], size=4))
    common = dict(
        dtype="float32",
        logits=logits,
        labels=labels,
        outer=4,
        classes=shape[1],
        inner=1,
        label_smoothing=0.0,
        z_loss=0.0,
        ignore_index=None,
        class_weights=None,
    )
    stream = torch.cuda.current_stream().cuda_stream
    size = _core.workspace_bytes("sparse_forward", 4, shape[1], 1, 4)
    assert size > 0
    outputs = []
    for workspace in (None, torch.empty(size, dtype=torch.uint8, device="cuda")):
        loss, lse = torch.empty(4, device="cuda"), torch.empty(4, dtype=torch.float64, device="cuda")
        _core.cuda_sparse_forward(loss=loss, lse=lse, stream=stream, workspace=workspace, **common)
        outputs.append((loss, lse))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    with pytest.raises(ValueError, match=rf"workspace has {size - 16} bytes, this call needs {size}"):
        _core.cuda_sparse_forward(
            loss=outputs[0][0],
            lse=outputs[0][1],
            stream=stream,
            workspace=torch.empty(size - 16, dtype=torch.uint8, device="cuda"),
            **common,
        )
