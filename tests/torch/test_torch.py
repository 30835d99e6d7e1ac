"""fused_xent.torch: losses and gradients against the float64 reference and against
torch.nn.functional.cross_entropy; gradcheck and gradgradcheck in float64;
torch.compile (inductor); torch.library.opcheck; validation and bad labels.
Each comparison is also shown to reject a planted error.

CPU only: the CUDA path (fused_xent.cuda under the same ops) needs a CUDA build.
"""

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import (
    ToleranceError,
    assert_rows_close,
    dense_target_terms,
    label_gradient_terms,
    target_terms,
)
from tests._support.framework_cases import DTYPES, SPARSE_OPTIONS, WEIGHTS, C, dense_case, f64, logits, sparse_case

torch = pytest.importorskip("torch")
import ml_dtypes  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fused_xent.torch as ft  # noqa: E402

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _tensor(a, dtype=None):
    """A torch tensor of `a`'s values in `dtype` (bfloat16 through float32, which holds it exactly)."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)


def _numpy(t):
    return t.detach().to(torch.float64).numpy()


def sparse_loss_and_grad(labels, z, g, **options):
    """(loss, d sum(loss * g)/dz) as float64 arrays, and the dtypes of both."""
    zt = _tensor(z).requires_grad_()
    loss = ft.sparse_softmax_cross_entropy_with_logits(_tensor(labels), zt, **options)
    (grad,) = torch.autograd.grad(loss, zt, _tensor(g))
    return _numpy(loss), _numpy(grad), (loss.dtype, grad.dtype, zt.dtype)


@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [-1, 1])
def test_sparse_matches_reference(dtype, options, axis):
    shape, z, labels, g = sparse_case(dtype, options, axis)
    loss, grad, (loss_dtype, grad_dtype, z_dtype) = sparse_loss_and_grad(labels, z, g, axis=axis, **options)
    assert loss_dtype == grad_dtype == z_dtype == TORCH_DTYPES[dtype]
    ref_loss, ref_grad = reference.sparse(labels, f64(z), axis=axis, grad_loss=f64(g), **options)
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = target_terms(labels, shape, axis, grad_loss=f64(g), **options)
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [-1, 0])
def test_dense_matches_reference(dtype, axis):
    shape, z, t, g = dense_case(dtype, axis)
    zt, tt = _tensor(z).requires_grad_(), _tensor(t).requires_grad_()
    loss = ft.softmax_cross_entropy_with_logits(tt, zt, axis=axis, label_smoothing=0.125, z_loss=0.0625)
    grad, grad_t = torch.autograd.grad(loss, (zt, tt), _tensor(g))
    assert loss.dtype == grad.dtype == grad_t.dtype == TORCH_DTYPES[dtype]
    ref_loss, ref_grad, ref_grad_t = reference.dense(
        f64(t), f64(z), axis=axis, grad_loss=f64(g), label_smoothing=0.125, z_loss=0.0625
    )
    assert_rows_close(_numpy(loss), ref_loss, dtype, axis=None, what="loss")
    terms = dense_target_terms(f64(t), shape, axis, label_smoothing=0.125, grad_loss=f64(g))
    assert_rows_close(_numpy(grad), ref_grad, dtype, axis=axis, terms=terms, what="gradient")
    terms_t = label_gradient_terms(f64(z), f64(g), 0.125, axis=axis)
    assert_rows_close(_numpy(grad_t), ref_grad_t, dtype, axis=axis, terms=terms_t, what="label gradient")


def test_non_contiguous_logits_and_broadcast_labels():
    z = logits((C, 6), "float32")
    zt = _tensor(z).t()  # a transposed view: copied to a contiguous tensor for the kernel
    labels = np.arange(6) % C
    loss = ft.sparse_softmax_cross_entropy_with_logits(_tensor(labels), zt)
    assert_rows_close(_numpy(loss), reference.sparse(labels, f64(z).T)[0], "float32", axis=None)
    t = np.full((C,), 1.0 / C, np.float32)
    loss = ft.softmax_cross_entropy_with_logits(_tensor(t), zt)
    assert_rows_close(_numpy(loss), reference.dense(np.broadcast_to(t, (6, C)), f64(z).T)[0], "float32", axis=None)
    with pytest.raises(ValueError, match="logits and labels must be broadcastable"):
        ft.softmax_cross_entropy_with_logits(torch.ones(3, C), zt)


def test_reference_comparison_rejects_planted_error():
    z = logits((4, C), "float32")
    labels = np.array([0, 1, 2, 3])
    _, grad, _ = sparse_loss_and_grad(labels, z, np.ones(4, np.float32))
    _, ref_grad = reference.sparse(labels, f64(z))
    terms = target_terms(labels, z.shape)
    assert_rows_close(grad, ref_grad, "float32", terms=terms)
    smallest = np.unravel_index(np.argmin(np.abs(ref_grad)), ref_grad.shape)
    grad[smallest] *= 1.01
    with pytest.raises(ToleranceError):
        assert_rows_close(grad, ref_grad, "float32", terms=terms)


# ---------------------------------------------------------------- against torch.nn.functional.cross_entropy


def assert_matches_torch(ours, theirs):
    np.testing.assert_allclose(_numpy(ours), _numpy(theirs), rtol=1e-5, atol=1e-6)


def _loss_and_grad(f, z):
    z = z.detach().clone().requires_grad_()
    loss = f(z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss, grad


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(), dict()),
        (dict(label_smoothing=0.2), dict(label_smoothing=0.2)),
        (dict(ignore_index=-100, label_smoothing=0.1), dict(ignore_index=-100, label_smoothing=0.1)),
        # Per element, PyTorch's weight scales the loss by the label's weight, as ours does
        # (with label_smoothing it weights each class's smoothing term instead: not compared).
        (dict(ignore_index=3, class_weights=WEIGHTS), dict(ignore_index=3, weight=torch.from_numpy(WEIGHTS))),
    ],
    ids=["plain", "smoothing", "ignore,smoothing", "ignore,weights"],
)
def test_matches_torch_cross_entropy_per_element(ours, theirs):
    z = _tensor(logits((16, C, 3), "float32", seed=5))
    labels = torch.from_numpy(np.random.default_rng(6).integers(0, C, size=(16, 3)))
    labels[::5, 1] = ours.get("ignore_index", 0)
    mine = _loss_and_grad(lambda z: ft.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, **ours), z)
    torchs = _loss_and_grad(lambda z: F.cross_entropy(z, labels, reduction="none", **theirs), z)
    for a, b in zip(mine, torchs):
        assert_matches_torch(a, b)


def test_torch_weighted_mean_is_our_sum_over_the_label_weights():
    """PyTorch's reduction="mean" with weight divides by the sum of the (unignored) labels' weights."""
    z = _tensor(logits((32, C), "float32", seed=7))
    labels = torch.from_numpy(np.random.default_rng(8).integers(0, C, size=32))
    labels[::6] = -100
    weights = torch.from_numpy(WEIGHTS)
    valid = labels != -100
    ours = _loss_and_grad(
        lambda z: (
            ft.sparse_softmax_cross_entropy_with_logits(labels, z, ignore_index=-100, class_weights=weights).sum()
            / weights[labels[valid]].sum()
        ),
        z,
    )
    theirs = _loss_and_grad(lambda z: F.cross_entropy(z, labels, weight=weights, ignore_index=-100), z)
    for a, b in zip(ours, theirs):
        assert_matches_torch(a, b)


def test_dense_matches_torch_soft_targets():
    z = _tensor(logits((10, C), "float32", seed=9))
    t = torch.softmax(torch.from_numpy(np.random.default_rng(10).normal(size=(10, C))).float(), -1)
    options = dict(label_smoothing=0.1)
    ours = _loss_and_grad(lambda z: ft.softmax_cross_entropy_with_logits(t, z, **options), z)
    theirs = _loss_and_grad(lambda z: F.cross_entropy(z, t, reduction="none", **options), z)
    for a, b in zip(ours, theirs):
        assert_matches_torch(a, b)


def test_torch_comparison_rejects_planted_error():
    z = _tensor(logits((8, C), "float32"))
    labels = torch.arange(8) % C
    _, ours = _loss_and_grad(lambda z: ft.sparse_softmax_cross_entropy_with_logits(labels, z), z)
    _, theirs = _loss_and_grad(lambda z: F.cross_entropy(z, labels, reduction="none"), z)
    assert_matches_torch(ours, theirs)
    ours[3, 2] += 1e-4
    with pytest.raises(AssertionError):
        assert_matches_torch(ours, theirs)


# ---------------------------------------------------------------- gradcheck (float64)


# Tighter than gradcheck's defaults (rtol 1e-3), which would pass a 1e-4 relative error.
TIGHT = dict(atol=1e-8, rtol=1e-6)


def _double(shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape) * 2).requires_grad_()


@pytest.mark.parametrize("options", SPARSE_OPTIONS[1:], ids=["smoothing,z_loss", "ignore,weights"])
def test_sparse_gradcheck_and_gradgradcheck(options):
    z = _double((4, 5, 3), 11)
    labels = torch.from_numpy(np.random.default_rng(12).integers(0, 5, size=(4, 3)))
    if "ignore_index" in options:
        labels[0, 1] = -100
        options = dict(options, class_weights=WEIGHTS[:5], z_loss=0.1)
    f = lambda z: ft.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, **options)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z,), **TIGHT)
    assert torch.autograd.gradgradcheck(f, (z,), **TIGHT)  # the composite, for the fused backward's derivative


def test_dense_gradcheck_and_gradgradcheck():
    z, t = _double((5, 6), 13), _double((5, 6), 14)
    f = lambda z, t: ft.softmax_cross_entropy_with_logits(t, z, label_smoothing=0.2, z_loss=0.1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, t), **TIGHT)
    assert torch.autograd.gradgradcheck(f, (z, t), **TIGHT)


def test_gradcheck_rejects_planted_error():
    labels = torch.tensor([0, 4, 2])

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return ft.sparse_softmax_cross_entropy_with_logits(labels, z)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            with torch.enable_grad():
                z = z.detach().requires_grad_()
                (grad,) = torch.autograd.grad(ft.sparse_softmax_cross_entropy_with_logits(labels, z), z, g)
            return grad * (1 + 1e-4)

    z = _double((3, 5), 15)
    assert torch.autograd.gradcheck(lambda z: ft.sparse_softmax_cross_entropy_with_logits(labels, z), (z,), **TIGHT)
    assert not torch.autograd.gradcheck(Planted.apply, (z,), raise_exception=False, **TIGHT)


# ---------------------------------------------------------------- torch.compile, opcheck


def test_torch_compile_inductor_matches_eager():
    z = _tensor(logits((12, C), "float32", seed=16))
    labels = torch.from_numpy(np.random.default_rng(17).integers(0, C, size=12))
    t = torch.softmax(z * 0.5, -1)
    weights = torch.from_numpy(WEIGHTS)

    def loss(z, labels, t):
        sparse = ft.sparse_softmax_cross_entropy_with_logits(labels, z, label_smoothing=0.1, class_weights=weights)
        return sparse.mean() + ft.softmax_cross_entropy_with_logits(t, z * 2.0, z_loss=0.01).mean()

    compiled = torch.compile(loss, fullgraph=True)  # default backend (inductor): the ops stay whole
    eager = _loss_and_grad(lambda z: loss(z, labels, t), z)
    ours = _loss_and_grad(lambda z: compiled(z, labels, t), z)
    for a, b in zip(ours, eager):
        assert_matches_torch(a, b)


def test_opcheck():
    z = _tensor(logits((4, C), "float32", seed=18))
    labels = torch.tensor([0, 1, 2, 6])
    g = torch.ones(4)
    t = torch.softmax(z, -1)
    weights = torch.from_numpy(WEIGHTS)
    lse = torch.logsumexp(z.detach().double(), -1)
    for op, args in [
        (torch.ops.fused_xent.sparse_forward, (z.requires_grad_(), labels, weights, 1, 0.1, 0.0, 2)),
        (torch.ops.fused_xent.sparse_backward, (z, labels, None, lse, g, 1, 0.0, 0.01, None)),
        (torch.ops.fused_xent.dense_forward, (z, t, 1, 0.0, 0.0)),
        (torch.ops.fused_xent.dense_backward, (z, t, lse, g, 1, 0.1, 0.0)),
    ]:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- errors


def test_out_of_range_label_raises():
    z = _tensor(logits((4, C), "float32"))
    with pytest.raises(ValueError, match=r"label value of 9 which is outside the valid range of \[0, 7\)"):
        ft.sparse_softmax_cross_entropy_with_logits(torch.tensor([0, 9, 2, 3]), z)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(labels=torch.zeros(4)), TypeError, "labels must be int32 or int64 class indices, got float32"),
        (
            dict(logits=torch.zeros(4, C, dtype=torch.int32)),
            TypeError,
            "logits must be float16, bfloat16, float32 or float64, got int32",
        ),
        (dict(logits=torch.tensor(1.0)), ValueError, "`logits` cannot be a scalar"),
        (dict(labels=torch.zeros(5, dtype=torch.int32)), ValueError, "`labels.shape` must equal `logits.shape` except"),
        (dict(labels=torch.zeros(4, 1, dtype=torch.int32)), ValueError, "`labels.shape.rank` must equal"),
        (dict(axis=2), ValueError, "axis 2 is out of range for logits of rank 2"),
        (dict(axis=1.0), TypeError, "axis must be an integer"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be a finite number >= 0"),
        (dict(class_weights=np.ones(3)), ValueError, "class_weights has 3 entries but logits have 7 classes"),
        (dict(class_weights=torch.ones(C, dtype=torch.int64)), TypeError, "class_weights must be floating point"),
        (
            dict(class_weights=np.where(np.arange(C) == 3, np.nan, 1.0)),
            ValueError,
            "class_weights must be finite and >= 0, got nan for class 3",
        ),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer or None"),
    ],
)
def test_bad_arguments_raise_like_tensorflow(kwargs, error, message):
    arguments = dict(labels=torch.tensor([0, 1, 2, 3], dtype=torch.int32), logits=_tensor(logits((4, C), "float32")))
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        ft.sparse_softmax_cross_entropy_with_logits(arguments.pop("labels"), arguments.pop("logits"), **arguments)


def test_ignore_index_no_label_can_hold_ignores_nothing():
    z = _tensor(logits((3, C), "float32"))
    labels = torch.tensor([0, 1, 0], dtype=torch.int32)
    plain = ft.sparse_softmax_cross_entropy_with_logits(labels, z)
    assert torch.equal(ft.sparse_softmax_cross_entropy_with_logits(labels, z, ignore_index=2**32), plain)
