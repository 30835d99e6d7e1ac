"""fused_xent.torch.cross_entropy and CrossEntropyLoss against torch.nn.functional.cross_entropy
computed in float64 on the same values: PyTorch's own cross-entropy test cases ported (test_nn.py's
cross_entropy tests, common_modules' CrossEntropyLoss inputs, the OpInfo samples of
nn.functional.cross_entropy), values and gradients in every dtype; reductions, class weights
(negative ones too), label smoothing, ignore_index, K-dimensional and unbatched inputs, empty and
all-ignored batches, probability targets; the exception types for bad input; z_loss; gradcheck;
torch.compile. Each comparison helper is shown to reject a planted error.

The kernels take label_smoothing as a float32: the float64 reference gets that value too.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fused_xent.torch as ft  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Relative to the larger of |expected| and the largest |expected| of the tensor (so that a mean's
# small gradient entries are held to their tensor's scale, not to 1).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------- running both


def _float32_smoothing(kwargs):
    """The options with label_smoothing as the float32 the kernels see."""
    if kwargs.get("label_smoothing"):
        kwargs = dict(kwargs, label_smoothing=float(np.float32(kwargs["label_smoothing"])))
    return kwargs


def _upstream(loss, seed):
    """A random upstream gradient shaped like the loss: row errors cannot cancel in a sum."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=generator, dtype=torch.float64).add(0.5).to(loss.dtype)


def run(f, input, target, weight=None, seed=0, **kwargs):
    """(loss, gradient for the input, gradient for a floating target or None) of `f`."""
    input = input.detach().clone().requires_grad_()
    probabilities = target.is_floating_point()
    if probabilities:
        target = target.detach().clone().requires_grad_()
    loss = f(input, target, weight=weight, **kwargs)
    inputs = (input, target) if probabilities else (input,)
    grads = torch.autograd.grad(loss, inputs, _upstream(loss, seed), allow_unused=True) if loss.numel() else ()
    grads = list(grads) + [None] * (2 - len(grads))
    return loss, grads[0], grads[1]


def reference(input, target, weight=None, seed=0, **kwargs):
    """F.cross_entropy in float64 on the same values (its loss, input and target gradients)."""
    wide = torch.float64
    target = target.to(wide) if target.is_floating_point() else target.long()
    weight = None if weight is None else weight.to(wide)
    return run(F.cross_entropy, input.to(wide), target, weight, seed, **_float32_smoothing(kwargs))


def _numpy(t):
    return None if t is None else t.detach().to(torch.float64).numpy()


def assert_matches(actual, expected, dtype, what="values"):
    """Element-wise: |actual - expected| <= tol * max(|expected|, the tensor's largest |expected|);
    NaN and +-inf exactly where expected. Shapes must be equal."""
    actual, expected = _numpy(actual), _numpy(expected)
    assert (actual is None) == (expected is None), what
    if actual is None:
        return
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(finite.max(initial=0.0), np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore"):
        ok = (np.isnan(actual) & np.isnan(expected)) | (actual == expected)
        ok |= np.abs(actual - expected) <= TOLERANCE[dtype] * np.maximum(np.abs(expected), scale)
    if not ok.all():
        bad = np.argwhere(~ok)[:5]
        details = [(tuple(int(k) for k in i), actual[tuple(i)], expected[tuple(i)]) for i in bad]
        raise AssertionError(f"{what}: {(~ok).sum()} of {ok.size} differ: {details}")


def assert_like_torch(input, target, weight=None, seed=0, **kwargs):
    """Ours against the float64 reference, in values and gradients; the result dtype as PyTorch's."""
    dtype = input.dtype
    ours = run(ft.cross_entropy, input, target, weight, seed, **kwargs)
    theirs = reference(input, target, weight, seed, **kwargs)
    expected_dtype = F.cross_entropy(input, target, weight=weight, **kwargs).dtype
    assert ours[0].dtype == expected_dtype, (ours[0].dtype, expected_dtype)
    for a, b, what in zip(ours, theirs, ("loss", "input gradient", "target gradient")):
        assert_matches(a, b, dtype, what)
    return ours


def test_comparison_rejects_planted_error():
    input, target = _logits((6, 5), torch.float32), _classes((6,), 5)
    loss, grad, _ = run(ft.cross_entropy, input, target, reduction="none")
    ref_loss, ref_grad, _ = reference(input, target, reduction="none")
    assert_matches(grad, ref_grad, torch.float32)
    small = np.unravel_index(np.argmin(np.abs(_numpy(ref_grad))), ref_grad.shape)
    planted = grad.clone()
    planted[small] += 1e-4 * ref_grad.abs().max().float()
    with pytest.raises(AssertionError):
        assert_matches(planted, ref_grad, torch.float32)
    with pytest.raises(AssertionError):  # a NaN where a number is expected
        assert_matches(torch.where(torch.arange(6) == 2, float("nan"), loss), ref_loss, torch.float32)
    with pytest.raises(AssertionError):  # a wrong denominator of the mean
        assert_matches(loss.sum() / 5, ref_loss.sum() / 6, torch.float32)


def test_reference_rejects_planted_error():
    """The reference is F.cross_entropy itself: a wrong option shows in the comparison."""
    input, target = _logits((6, 5), torch.float64), _classes((6,), 5)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    ours = run(ft.cross_entropy, input, target, weight, label_smoothing=0.25)
    assert_matches(ours[0], reference(input, target, weight, label_smoothing=0.25)[0], torch.float64)
    with pytest.raises(AssertionError):  # Keras's rule for weight with smoothing is not PyTorch's
        assert_matches(ours[0], _keras_weighted_smoothing(input, target, weight, 0.25), torch.float64)


def _keras_weighted_smoothing(input, target, weight, eps):
    unweighted = F.cross_entropy(input, target, reduction="none", label_smoothing=eps)
    return (weight[target] * unweighted).sum() / weight[target].sum()


# ---------------------------------------------------------------- inputs


def _logits(shape, dtype, seed=0):
    """OpInfo's make_tensor range: uniform in [-9, 9)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 18 - 9).to(dtype)


def _classes(shape, classes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=generator)


def _probabilities(shape, dtype, class_dim, seed=2, normalized=True):
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (t / t.sum(class_dim, keepdim=True) if normalized else t).to(dtype)


def _weight(kind, classes, dtype, seed=3):
    """None, positive, or signed (as OpInfo's make_tensor gives: PyTorch accepts negative weights)."""
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    w = torch.rand(classes, generator=generator, dtype=torch.float64)
    return (w * 2 + 0.25 if kind == "positive" else w * 4 - 1).to(dtype)


# ---------------------------------------------------------------- class indices

# common_nn's CrossEntropyLoss criterion tests and OpInfo's samples: (N, C), K-dimensional
# (N, C, d1, ...) and unbatched (C,) inputs.
CLASS_SHAPES = {
    "15x10": (15, 10),
    "2x3x5x5": (2, 3, 5, 5),
    "2x3x5": (2, 3, 5),
    "2x3x1x2x3": (2, 3, 1, 2, 3),
    "unbatched 9": (9,),
}
CLASS_OPTIONS = {
    "plain": {},
    "weight": {"weight": "positive"},
    "negative weight": {"weight": "signed"},
    "smoothing": {"label_smoothing": 0.15},
    "smoothing 1": {"label_smoothing": 1.0},
    "weight, smoothing": {"weight": "positive", "label_smoothing": 0.15},
    "negative weight, smoothing": {"weight": "signed", "label_smoothing": 0.5},
    "ignore_index 1": {"ignore_index": 1},
    "ignored, weight, smoothing": {"ignore_index": -100, "weight": "positive", "label_smoothing": 0.05},
}


def _class_case(shape, dtype, options):
    class_dim = 0 if len(shape) == 1 else 1
    classes = shape[class_dim]
    input = _logits(shape, dtype)
    target = _classes(shape[:1] + shape[2:] if class_dim else (), classes)
    kwargs = {k: v for k, v in options.items() if k != "weight"}
    if kwargs.get("ignore_index") == -100 and target.ndim:
        target.view(-1)[::3] = -100  # the default ignore_index, planted in every third target
    return input, target, _weight(options.get("weight"), classes, dtype), kwargs


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(CLASS_OPTIONS))
@pytest.mark.parametrize("shape", list(CLASS_SHAPES))
def test_class_indices_match_torch(shape, options, reduction, dtype):
    input, target, weight, kwargs = _class_case(CLASS_SHAPES[shape], DTYPES[dtype], CLASS_OPTIONS[options])
    assert_like_torch(input, target, weight, reduction=reduction, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weight, smoothing", "ignored, weight, smoothing"])
def test_uint8_and_int32_targets(options, reduction):
    input, target, weight, kwargs = _class_case((15, 10), torch.float32, CLASS_OPTIONS[options])
    target = torch.where(target == -100, 255, target)
    kwargs = dict(kwargs, ignore_index=255) if "ignore_index" in kwargs else kwargs
    # PyTorch takes uint8 (not int32) but fails on it with weight and smoothing (its gather needs
    # int64): int64 targets are the reference.
    expected = run(F.cross_entropy, input, target, weight, reduction=reduction, **kwargs)
    for dtype in (torch.uint8, torch.int32):
        ours = run(ft.cross_entropy, input, target.to(dtype), weight, reduction=reduction, **kwargs)
        for a, b in zip(ours, expected):
            assert_matches(a, b, torch.float32)


def test_ignore_index_no_target_can_hold_ignores_nothing():
    input, target = _logits((6, 5), torch.float32), _classes((6,), 5).to(torch.uint8)
    assert_like_torch(input, target, ignore_index=-100, reduction="none")
    assert_like_torch(input, target, ignore_index=300)


# test_nn.py: test_cross_entropy_label_smoothing_weight_ignore_indices
@pytest.mark.parametrize("weight", [None, [0.3, 0.6]], ids=["no weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.05, 0.15])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ignored_targets_leave_no_trace(reduction, label_smoothing, weight):
    """The logits of an ignored target change nothing; the mean's denominator does not count it."""
    weight = None if weight is None else torch.tensor(weight)
    inp1 = torch.tensor([[0.3, 0.4], [1.0, 2.0]])
    inp2 = torch.tensor([[0.3, 0.6], [1.0, 2.0]])
    for ignore_index, ignored in [(-100, -100), (-2, -2), (2, 2)]:
        loss = ft.CrossEntropyLoss(
            weight=weight, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
        )
        target = torch.tensor([ignored, 1])
        torch.testing.assert_close(loss(inp1, target), loss(inp2, target))
        if reduction != "none":
            torch.testing.assert_close(loss(inp1, target), loss(inp2[1:], target[1:]))
        theirs = torch.nn.CrossEntropyLoss(
            weight=weight, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
        )
        torch.testing.assert_close(loss(inp1, target), theirs(inp1, target))


def test_unbatched_target_of_size_one():
    """PyTorch reads a (1,)-shaped target of a (C,) input as the unbatched scalar target."""
    input, target = _logits((9,), torch.float32), torch.tensor([4])
    for reduction in ("none", "mean"):
        ours = run(ft.cross_entropy, input, target, reduction=reduction)
        theirs = F.cross_entropy(input.double(), target, reduction=reduction)
        assert ours[0].shape == theirs.shape == ()
        assert_matches(ours[0], theirs, torch.float32)
        # PyTorch's own backward fails on that target's shape: the gradient of the scalar target's
        for a, b in zip(ours, reference(input, target[0], reduction=reduction)):
            assert_matches(a, b, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weight", "smoothing", "weight, smoothing"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 5, 0), (0, 5, 3)], ids=["0x5", "2x5x0", "0x5x3"])
def test_empty_batches(shape, options, reduction):
    """An empty batch: mean is NaN (0 / 0), sum 0, none empty; the gradient is empty."""
    input, target, weight, kwargs = _class_case(shape, torch.float32, CLASS_OPTIONS[options])
    loss, _, _ = assert_like_torch(input, target, weight, reduction=reduction, **kwargs)
    if reduction == "mean":
        assert torch.isnan(loss)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("options", ["plain", "weight", "smoothing", "weight, smoothing", "negative weight, smoothing"])
def test_all_ignored_mean_is_nan_with_zero_gradient(options, dtype):
    input, target, weight, kwargs = _class_case((6, 5, 2), DTYPES[dtype], CLASS_OPTIONS[options])
    target.fill_(-100)
    for reduction in ("mean", "sum", "none"):
        loss, grad, _ = assert_like_torch(input, target, weight, reduction=reduction, **kwargs)
        assert torch.count_nonzero(grad) == 0
        assert torch.isnan(loss) if reduction == "mean" else torch.count_nonzero(loss) == 0


def test_zero_weights_give_nan_as_torch():
    """Weights summing to 0 over the targets: the mean is 0 / 0 and the gradient NaN, as PyTorch's."""
    input, target = _logits((6, 5), torch.float32), _classes((6,), 5)
    for kwargs in ({}, {"label_smoothing": 0.25}):
        assert_like_torch(input, target, torch.zeros(5), **kwargs)


def test_label_smoothing_at_most_zero_is_none():
    """PyTorch applies label_smoothing only when it is > 0: a negative one (or NaN) is none."""
    input, target = _logits((6, 5), torch.float32), _classes((6,), 5)
    plain = ft.cross_entropy(input, target, reduction="none")
    for value in (-0.5, float("nan"), torch.tensor(-0.25)):
        torch.testing.assert_close(ft.cross_entropy(input, target, reduction="none", label_smoothing=value), plain)
        if not isinstance(value, float) or value == value:  # PyTorch's own answer (its NaN check differs)
            theirs = F.cross_entropy(input, target, reduction="none", label_smoothing=value)
            torch.testing.assert_close(theirs, F.cross_entropy(input, target, reduction="none"))
    assert_like_torch(input, target, label_smoothing=torch.tensor(0.125))


def test_non_contiguous_inputs():
    input = _logits((3, 4, 5, 6), torch.float32).contiguous(memory_format=torch.channels_last)
    target = _classes((3, 5, 6), 4)
    weight = _weight("positive", 4, torch.float32)
    assert_like_torch(input, target, weight, label_smoothing=0.25)
    assert_like_torch(input.transpose(2, 3), target.transpose(1, 2), label_smoothing=0.25)
    assert_like_torch(_logits((10, 7), torch.float32).t(), _classes((7,), 10))
    assert_like_torch(_logits((20, 7), torch.float32)[::2], _classes((10,), 7), weight=torch.ones(14)[::2])


def test_infinite_logits():
    input = torch.tensor([[0.0, -float("inf"), 1.0], [2.0, 1.0, 0.0]])
    for kwargs in ({}, {"label_smoothing": 0.1}, {"weight": torch.tensor([1.0, 2.0, 3.0])}):
        for reduction in ("none", "sum"):
            assert_like_torch(input, torch.tensor([0, 1]), reduction=reduction, **kwargs)  # inf at the label
            assert_like_torch(input, torch.tensor([2, 0]), reduction=reduction, **kwargs)


# ---------------------------------------------------------------- class probabilities

PROBABILITY_SHAPES = {"15x10": (15, 10), "2x3x5x5": (2, 3, 5, 5), "2x3x1x2x3": (2, 3, 1, 2, 3), "unbatched 9": (9,)}
PROBABILITY_OPTIONS = {
    "plain": {},
    "weight": {"weight": "positive"},
    "negative weight": {"weight": "signed"},
    "smoothing": {"label_smoothing": 0.15},
    "weight, smoothing": {"weight": "positive", "label_smoothing": 0.3},
    "unnormalized": {"normalized": False},  # OpInfo's targets: uniform in [0, 1), not summing to 1
}


def _probability_case(shape, dtype, options):
    class_dim = 0 if len(shape) == 1 else 1
    target = _probabilities(shape, dtype, class_dim, normalized=options.get("normalized", True))
    kwargs = {k: v for k, v in options.items() if k not in ("weight", "normalized")}
    return _logits(shape, dtype), target, _weight(options.get("weight"), shape[class_dim], dtype), kwargs


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(PROBABILITY_OPTIONS))
@pytest.mark.parametrize("shape", list(PROBABILITY_SHAPES))
def test_probabilities_match_torch(shape, options, reduction, dtype):
    input, target, weight, kwargs = _probability_case(
        PROBABILITY_SHAPES[shape], DTYPES[dtype], PROBABILITY_OPTIONS[options]
    )
    assert_like_torch(input, target, weight, reduction=reduction, **kwargs)


def test_probabilities_promote_dtypes_as_torch():
    """input * target (* weight) decides the result's dtype; each gradient keeps its tensor's."""
    input = _logits((6, 5), torch.float16)
    target = _probabilities((6, 5), torch.float32, 1)
    assert_like_torch(input, target, reduction="none")
    assert_like_torch(input.float(), target.double(), weight=torch.rand(5, dtype=torch.float16) + 0.5)
    loss, grad, grad_target = run(ft.cross_entropy, input.bfloat16(), target.half(), label_smoothing=0.2)
    assert (loss.dtype, grad.dtype, grad_target.dtype) == (torch.float32, torch.bfloat16, torch.float16)


def test_probability_weight_gradient_matches_torch():
    input, target = _logits((6, 5), torch.float64), _probabilities((6, 5), torch.float64, 1)
    grads = []
    for f in (ft.cross_entropy, F.cross_entropy):
        weight = (torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5).requires_grad_()
        (grad,) = torch.autograd.grad(f(input, target, weight=weight, label_smoothing=0.25), weight)
        grads.append(grad)
    assert_matches(*grads, torch.float64)


def test_class_index_weight_gradient_is_the_losss():
    """PyTorch refuses a weight that requires grad with class indices; ours gives its gradient,
    here against the loss written with torch ops (log_softmax), PyTorch's weighted-smoothing rule."""
    input, target = _logits((8, 5), torch.float64), _classes((8,), 5)
    target[2] = -100
    base = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5

    def by_hand(weight, eps=0.25):
        valid = target != -100
        log_p = torch.log_softmax(input, 1)[valid]
        y = target[valid]
        rows = (1 - eps) * weight[y] * -log_p.gather(1, y[:, None])[:, 0] + eps / 5 * -(log_p * weight).sum(1)
        return rows.sum() / weight[y].sum()

    grads = []
    for f in (lambda w: ft.cross_entropy(input, target, weight=w, label_smoothing=0.25), by_hand):
        weight = base.clone().requires_grad_()
        grads.append(torch.autograd.grad(f(weight), weight)[0])
    assert_matches(*grads, torch.float64)


# test_nn.py: test_cross_entropy_loss_{prob,index}_target_unit_weights
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_unit_weights_change_nothing(probabilities, reduction):
    input = _logits((5, 4, 3), torch.float64)
    target = _probabilities((5, 4, 3), torch.float64, 1) if probabilities else _classes((5, 3), 4)
    for eps in (0.0, 0.25):
        plain = run(ft.cross_entropy, input, target, reduction=reduction, label_smoothing=eps)
        unit = run(
            ft.cross_entropy,
            input,
            target,
            torch.ones(4, dtype=torch.float64),
            reduction=reduction,
            label_smoothing=eps,
        )
        for a, b in zip(unit, plain):
            assert_matches(a, b, torch.float64)


# test_nn.py: test_cross_entropy_loss_one_hot_target, ..._label_smoothing_consistent_index_target_and_probs
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(15, 10), (2, 3, 5, 5)], ids=["15x10", "2x3x5x5"])
def test_one_hot_probabilities_equal_class_indices(shape, reduction):
    input = _logits(shape, torch.float64)
    target = _classes(shape[:1] + shape[2:], shape[1])
    one_hot = F.one_hot(target, shape[1]).movedim(-1, 1).to(torch.float64)
    weight = _weight("positive", shape[1], torch.float64)
    rows = torch.ones_like(target, dtype=torch.float64) if reduction == "mean" else None
    for kwargs in ({}, {"label_smoothing": 0.125}, {"weight": weight}):
        index_loss = ft.cross_entropy(input, target, reduction=reduction, **kwargs)
        prob_loss = ft.cross_entropy(input, one_hot, reduction=reduction, **kwargs)
        if "weight" in kwargs and reduction == "mean":  # probabilities divide by N, indices by sum w[y]
            prob_loss = prob_loss * rows.numel() / weight[target].sum()
        assert_matches(prob_loss, index_loss, torch.float64)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3)], ids=["0x5", "5x0", "2x0x3"])
def test_probabilities_without_rows_or_classes(shape):
    """test_nn.py's test_cross_entropy_loss_zero_div: a (5, 0) input and target do not fail."""
    input, target = torch.rand(shape), torch.rand(shape)
    for reduction in ("mean", "sum", "none"):
        ours, theirs = (
            ft.cross_entropy(input, target, reduction=reduction),
            F.cross_entropy(input, target, reduction=reduction),
        )
        assert_matches(ours, theirs, torch.float32)
    assert torch.isnan(ft.CrossEntropyLoss()(input, target))


def test_zero_probability_at_minus_infinity_is_zero_not_nan():
    """The one documented difference: 0 * log(0) adds 0 here; PyTorch's product gives NaN."""
    input = torch.tensor([[0.0, -float("inf"), 1.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.0, 0.5]])
    assert torch.isnan(F.cross_entropy(input, target))
    loss = ft.cross_entropy(input, target)
    finite = torch.tensor([[0.0, -1e30, 1.0]])
    torch.testing.assert_close(loss, F.cross_entropy(finite, target))
    (grad,) = torch.autograd.grad(loss, input)
    torch.testing.assert_close(grad, torch.autograd.grad(F.cross_entropy(finite.requires_grad_(), target), finite)[0])


# ---------------------------------------------------------------- z_loss


def _z_loss_by_hand(input, target, weight, eps, lam, reduction):
    """PyTorch's loss plus lam * lse^2 per row, times w[y] for class indices, in float64."""
    rows = F.cross_entropy(input, target, weight=weight, reduction="none", label_smoothing=eps)
    lse = torch.logsumexp(input, 1)
    if target.is_floating_point():
        rows, denominator = rows + lam * lse**2, rows.numel()
    else:
        valid = target != -100
        row_weight = torch.where(
            valid, (weight if weight is not None else torch.ones(input.shape[1]).double())[target.clamp(min=0)], 0.0
        )
        rows, denominator = rows + lam * row_weight * lse**2, row_weight.sum()
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / denominator}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options", ["plain", "weight", "smoothing", "weight, smoothing", "probabilities", "probabilities, weight"]
)
def test_z_loss(options, reduction):
    lam, eps = 0.0625, 0.125 if "smoothing" in options else 0.0
    input = _logits((7, 5, 2), torch.float64)
    weight = _weight("positive", 5, torch.float64) if "weight" in options else None
    target = _probabilities((7, 5, 2), torch.float64, 1) if "probabilities" in options else _classes((7, 2), 5)
    if not target.is_floating_point():
        target[1, 0] = -100
    ours = run(ft.cross_entropy, input, target, weight, reduction=reduction, label_smoothing=eps, z_loss=lam)
    theirs = run(lambda x, t, weight: _z_loss_by_hand(x, t, weight, eps, lam, reduction), input, target, weight)
    for a, b, what in zip(ours, theirs, ("loss", "input gradient", "target gradient")):
        assert_matches(a, b, torch.float64, what)


# ---------------------------------------------------------------- second derivatives, compile, the module


@pytest.mark.parametrize("options", ["plain", "weight", "smoothing", "weight, smoothing", "ignored, weight, smoothing"])
def test_gradcheck_and_gradgradcheck(options):
    input, target, weight, kwargs = _class_case((4, 5, 3), torch.float64, CLASS_OPTIONS[options])
    input.requires_grad_()
    f = lambda x: ft.cross_entropy(x, target, weight, **kwargs, z_loss=0.03125)  # noqa: E731
    assert torch.autograd.gradcheck(f, (input,), atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, (input,), atol=1e-8, rtol=1e-6)
    t = _probabilities((4, 5, 3), torch.float64, 1).requires_grad_()
    g = lambda x, t: ft.cross_entropy(x, t, weight, label_smoothing=0.25)  # noqa: E731
    assert torch.autograd.gradcheck(g, (input, t), atol=1e-8, rtol=1e-6)


def _by_hand(input, target, weight, eps, lam):
    """The summed loss with weight, smoothing and z-loss in torch ops (log_softmax), float64."""
    valid = target != -100
    log_p = torch.log_softmax(input, 1)
    y = target.clamp(min=0)
    w_y = torch.where(valid, weight[y], 0.0)
    nll = -log_p.gather(1, y.unsqueeze(1)).squeeze(1)
    smooth = -(log_p * weight.view(1, -1, 1)).sum(1)
    lse = torch.logsumexp(input, 1)
    rows = (1 - eps) * w_y * nll + eps / input.shape[1] * smooth + lam * w_y * lse**2
    return torch.where(valid, rows, 0.0).pow(2).sum()  # squared: the upstream gradient depends on z


def test_weight_with_smoothing_in_every_autodiff_mode():
    """The Function behind weight with label smoothing: forward mode (torch.func.jvp), Hessians
    forward over reverse and reverse over reverse, vmap; against the loss written in torch ops."""
    input, target, weight, _ = _class_case((4, 5, 3), torch.float64, CLASS_OPTIONS["ignored, weight, smoothing"])
    eps, lam = 0.25, 0.0625

    def ours(x, target=target):
        return ft.cross_entropy(x, target, weight, reduction="none", label_smoothing=eps, z_loss=lam).pow(2).sum()

    def theirs(x, target=target):
        return _by_hand(x, target, weight, eps, lam)

    tangent = _logits((4, 5, 3), torch.float64, seed=9)
    for a, b in zip(torch.func.jvp(ours, (input,), (tangent,)), torch.func.jvp(theirs, (input,), (tangent,))):
        assert_matches(a, b, torch.float64, "jvp")
    expected = torch.func.hessian(theirs)(input)
    assert_matches(torch.func.hessian(ours)(input), expected, torch.float64, "jacfwd(jacrev)")
    assert_matches(torch.func.jacrev(torch.func.jacrev(ours))(input), expected, torch.float64, "jacrev(jacrev)")
    with warnings.catch_warnings():  # the custom ops have no batching rule: a loop, with a warning
        warnings.simplefilter("ignore", UserWarning)
        batched = torch.func.vmap(lambda x, t: ours(x[None], t[None]))(input, target)
    expected = torch.stack([theirs(x[None], t[None]) for x, t in zip(input, target)])
    assert_matches(batched, expected, torch.float64, "vmap")


def test_torch_compile_matches_eager():
    input = _logits((12, 7, 2), torch.float32)
    target = _classes((12, 2), 7)
    target[0, 0] = -100
    probabilities = _probabilities((12, 7, 2), torch.float32, 1)
    weight = _weight("positive", 7, torch.float32)

    def loss(x):
        return (
            ft.cross_entropy(x, target)
            + ft.cross_entropy(x, target, weight, label_smoothing=0.1)  # the composite with the kernel's lse
            + ft.cross_entropy(x, probabilities, weight, reduction="sum")
        )

    compiled = torch.compile(loss, fullgraph=True)
    eager, ours = run(lambda x, t, weight: loss(x), input, target), run(lambda x, t, weight: compiled(x), input, target)
    for a, b in zip(ours, eager):
        assert_matches(a, b, torch.float32)


def test_module_is_a_torch_cross_entropy_loss():
    weight = _weight("positive", 10, torch.float32)
    ours = ft.CrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.2, z_loss=0.01)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.2)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert "z_loss=0.01" in repr(ours)
    input, target = _logits((15, 10), torch.float32), _classes((15,), 10)
    ours.z_loss = 0.0
    for a, b in zip(
        run(lambda x, t, weight: ours(x, t), input, target), run(lambda x, t, weight: theirs(x, t), input, target)
    ):
        assert_matches(a, b, torch.float32)
    ours.to(torch.float64)  # the weight buffer follows the module
    assert ours.weight.dtype == torch.float64
    theirs.label_smoothing = float(np.float32(0.2))  # the kernels' value
    assert_matches(ours(input.double(), target), theirs.double()(input.double(), target), torch.float64)


def test_module_legacy_reduction_arguments():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for size_average, reduce in [(False, None), (None, False), (True, True)]:
            ours = ft.CrossEntropyLoss(size_average=size_average, reduce=reduce)
            assert ours.reduction == torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce).reduction


# ---------------------------------------------------------------- bad input: PyTorch's exception types


def _error(f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except Exception as error:  # noqa: BLE001  (the type is what is compared)
        return error
    return None


X, Y = _logits((4, 5), torch.float32), torch.tensor([0, 1, 2, 3])
BAD_INPUT = {
    "int32 target": None,  # accepted here (PyTorch: RuntimeError); see test_uint8_and_int32_targets
    "float target of another shape": (X, Y.float()),
    "int16 target": (X, Y.short()),
    "bool target": (X, Y.bool()),
    "target out of range": (X, torch.tensor([0, 9, 2, 3])),
    "negative target": (X, torch.tensor([0, -1, 2, 3])),
    "target out of range, smoothing": (X, torch.tensor([0, 9, 2, 3]), dict(label_smoothing=0.1)),
    "target out of range, weight, smoothing": (
        X,
        torch.tensor([5, 0, 2, 3]),
        dict(label_smoothing=0.1, weight=torch.ones(5)),
    ),
    "target out of range, none": (X, torch.tensor([0, 9, 2, 3]), dict(reduction="none")),
    "no classes": (torch.rand(3, 0), torch.zeros(3, dtype=torch.long)),
    "weight of another dtype": (X, Y, dict(weight=torch.ones(5, dtype=torch.float64))),
    "half input, float weight": (X.half(), Y, dict(weight=torch.ones(5))),
    "weight too short": (X, Y, dict(weight=torch.ones(4))),
    "weight 2-d": (X, Y, dict(weight=torch.ones(1, 5))),
    "weight 0-d": (X, Y, dict(weight=torch.tensor(1.0))),
    "probabilities, weight too short": (X, torch.rand(4, 5), dict(weight=torch.ones(4))),
    "weight list": (X, Y, dict(weight=[1.0] * 5)),
    "probabilities, ignore_index 0": (X, torch.rand(4, 5), dict(ignore_index=0)),
    "probabilities, integer": (X, torch.ones(4, 5, dtype=torch.long)),
    "smoothing 1.5": (X, Y, dict(label_smoothing=1.5)),
    "probabilities, smoothing 1.5": (X, torch.rand(4, 5), dict(label_smoothing=1.5)),
    "reduction avg": (X, Y, dict(reduction="avg")),
    "ignore_index float": (X, Y, dict(ignore_index=1.5)),
    "ignore_index None": (X, Y, dict(ignore_index=None)),
    "target list": (X, [0, 1, 2, 3]),
    "batch sizes differ": (X, torch.tensor([0, 1, 2])),
    "2-d target": (X, torch.zeros(4, 1, dtype=torch.long)),
    "0-d target": (X, torch.tensor(1)),
    "K-dim target too short": (torch.rand(2, 5, 3), torch.zeros(2, dtype=torch.long)),
    "K-dim target too long": (torch.rand(2, 5, 3), torch.zeros(2, 3, 1, dtype=torch.long)),
    "K-dim sizes differ": (torch.rand(2, 5, 3, 4, 2), torch.zeros(2, 3, 5, 2, dtype=torch.long)),
    "K-dim batch sizes differ": (torch.rand(2, 5, 3), torch.zeros(3, 3, dtype=torch.long)),
    "unbatched, 2 targets": (torch.rand(5), torch.tensor([1, 2])),
    "unbatched, 2-d target": (torch.rand(5), torch.tensor([[1]])),
    "probabilities of another shape": (X, torch.rand(4, 6)),
}
# Where ours differs on purpose: a clearer type than PyTorch's for a wrong dtype or rank of input.
OUR_ERRORS = {
    "integer input": ((torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long)), TypeError),
    "complex input": ((X.to(torch.complex64), Y), TypeError),
    "0-d input": ((torch.tensor(1.0), torch.tensor(1.0)), ValueError),
    "negative z_loss": ((X, Y, dict(z_loss=-1.0)), ValueError),
}


@pytest.mark.parametrize("case", [k for k, v in BAD_INPUT.items() if v is not None])
def test_bad_input_raises_as_torch(case):
    input, target, *kwargs = BAD_INPUT[case]
    kwargs = kwargs[0] if kwargs else {}
    theirs = _error(F.cross_entropy, input, target, **kwargs)
    ours = _error(ft.cross_entropy, input, target, **kwargs)
    assert theirs is not None, case
    assert type(ours) is type(theirs), (case, ours, theirs)
    if isinstance(theirs, (IndexError, ValueError)) or "label_smoothing" in str(theirs):
        assert str(ours) == str(theirs)


@pytest.mark.parametrize("case", list(OUR_ERRORS))
def test_bad_input_raises_ours(case):
    (input, target, *kwargs), error = OUR_ERRORS[case]
    with pytest.raises(error):
        ft.cross_entropy(input, target, **(kwargs[0] if kwargs else {}))


def test_error_comparison_rejects_planted_error():
    """A different exception type fails the comparison above."""
    theirs = _error(F.cross_entropy, X, torch.tensor([0, 9, 2, 3]))
    assert type(_error(ft.cross_entropy, X, torch.tensor([0, 9, 2, 3]))) is type(theirs) is IndexError
    assert type(_error(lambda: ft.sparse_softmax_cross_entropy_with_logits(torch.tensor([0, 9, 2, 3]), X))) is not type(
        theirs
    )
