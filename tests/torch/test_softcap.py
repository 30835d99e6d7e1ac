"""The final-logit softcap (Gemma 2/3: z -> cap * tanh(z / cap)) in fused_xent.torch.

Every value and derivative is checked against a float64 composite of torch ops: the logits capped
with torch.tanh, then torch's own log_softmax. The kernels compute the loss on the capped logits
and the gradient for the uncapped ones; the closed forms behind the second derivatives (and
forward mode) include the cap's slope and curvature. Logits are drawn at about twice the cap, so
that the cap bends them (its slope falls well below 1)."""

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as tnf  # noqa: E402

import fused_xent.torch as ft  # noqa: E402
from fused_xent import _checks  # noqa: E402

F = torch.func
CAP = 4.0
EPS, LAM = 0.125, 0.015625  # exact in float32, the kernels' option type
C = 7

# rtol, atol by dtype: the kernels accumulate in float32 (float64 for float64) and round the
# result to the logits' dtype once.
TOLERANCES = {
    torch.float64: (1e-11, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-5),
    torch.bfloat16: (1.6e-2, 2e-4),
}


def _close(actual, expected, dtype=torch.float64):
    """actual (any dtype) against the float64 reference, at the tolerance of `dtype`; tuples
    (of several gradients) element by element."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for a, b in zip(actual, expected):
            _close(a, b, dtype)
        return
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol)


def _logits(shape, seed, dtype=torch.float64, scale=2 * CAP):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(shape, seed, classes=C):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, classes, shape, generator=g)


def _distribution(shape, seed, axis=-1):
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), axis)


WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.75, 1.25, 0.25], dtype=torch.float64)

# ---------------------------------------------------------------- the float64 composites


def capped(x, cap=CAP):
    return cap * torch.tanh(x / cap)


def sparse_reference(x, labels, axis=-1, label_smoothing=0.0, z_loss=0.0, ignore_index=None, class_weights=None):
    """fused_xent's sparse loss (Keras's rule for weights) on the capped logits, in float64."""
    z = capped(x.to(torch.float64)).movedim(axis, -1)
    log_p = torch.log_softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    classes = z.shape[-1]
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, 0)
    q = tnf.one_hot(safe, classes).to(torch.float64) * (1 - label_smoothing) + label_smoothing / classes
    loss = -(q * log_p).sum(-1) + z_loss * lse**2
    if class_weights is not None:
        loss = loss * class_weights.to(torch.float64)[safe]
    return torch.where(valid, loss, 0.0)


def dense_reference(x, t, axis=-1, label_smoothing=0.0, z_loss=0.0):
    z = capped(x.to(torch.float64))
    q = t.to(torch.float64) * (1 - label_smoothing) + label_smoothing / z.shape[axis]
    return -(q * torch.log_softmax(z, axis)).sum(axis) + z_loss * torch.logsumexp(z, axis) ** 2


# ---------------------------------------------------------------- values and gradients, by dtype

SPARSE_OPTIONS = {
    "plain": {},
    "smoothing, z-loss": dict(label_smoothing=EPS, z_loss=LAM),
    "ignore_index, class weights, smoothing": dict(ignore_index=2, class_weights=WEIGHTS, label_smoothing=EPS),
}
SHAPES = {"rows": ((6, C), -1), "class axis in the middle": ((3, C, 4), 1), "class axis first": ((C, 5), 0)}


def _sparse_inputs(shape, axis, seed):
    label_shape = list(shape)
    del label_shape[axis]
    labels = _labels(tuple(label_shape), seed)
    labels.view(-1)[1] = 2  # a row that ignore_index=2 ignores
    return labels


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("options_name", list(SPARSE_OPTIONS))
def test_sparse_values_and_gradients(dtype, shape_name, options_name):
    shape, axis = SHAPES[shape_name]
    options = SPARSE_OPTIONS[options_name]
    seed = len(shape_name) + 7 * len(options_name)
    x = _logits(shape, seed, dtype).requires_grad_()
    labels = _sparse_inputs(shape, axis, seed)
    upstream = _logits(labels.shape, seed + 1, torch.float64, scale=1.0)

    loss = ft.sparse_softmax_cross_entropy_with_logits(labels, x, axis=axis, softcap=CAP, **options)
    assert loss.dtype == dtype and loss.shape == labels.shape
    (grad,) = torch.autograd.grad(loss, x, upstream.to(dtype))
    assert grad.dtype == dtype

    x64 = x.detach().to(torch.float64).requires_grad_()
    want = sparse_reference(x64, labels, axis, **options)
    (want_grad,) = torch.autograd.grad(want, x64, upstream)
    _close(loss, want, dtype)
    _close(grad, want_grad, dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape_name", ["rows", "class axis in the middle"])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=EPS, z_loss=LAM)], ids=["plain", "smoothing, z-loss"])
def test_dense_values_and_gradients(dtype, shape_name, options):
    shape, axis = SHAPES[shape_name]
    x = _logits(shape, 5, dtype).requires_grad_()
    t = _distribution(shape, 5, axis).to(dtype).requires_grad_()
    upstream = _logits(x.sum(axis).shape, 6, torch.float64, scale=1.0)

    loss = ft.softmax_cross_entropy_with_logits(t, x, axis, softcap=CAP, **options)
    assert loss.dtype == dtype
    grad_x, grad_t = torch.autograd.grad(loss, (x, t), upstream.to(dtype))

    x64 = x.detach().to(torch.float64).requires_grad_()
    t64 = t.detach().to(torch.float64).requires_grad_()
    want = dense_reference(x64, t64, axis, **options)
    want_x, want_t = torch.autograd.grad(want, (x64, t64), upstream)
    _close(loss, want, dtype)
    _close(grad_x, want_x, dtype)
    _close(grad_t, want_t, dtype)


def test_saturated_logits_keep_a_finite_gradient():
    """Logits far beyond the cap: the slope underflows to 0, and nothing is divided by it."""
    x = torch.tensor([[1e4, -1e4, 0.0, 3.0, 1e30]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1])
    loss = ft.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP, z_loss=LAM)
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad * torch.ones_like(grad)).sum(), x)
    x64 = x.detach().clone().requires_grad_()
    want = sparse_reference(x64, labels, z_loss=LAM)
    (want_grad,) = torch.autograd.grad(want.sum(), x64, create_graph=True)
    (want_second,) = torch.autograd.grad(want_grad.sum(), x64)
    assert torch.isfinite(grad).all() and torch.isfinite(second).all()
    _close(loss, want)
    _close(grad, want_grad)
    _close(second, want_second)


# ---------------------------------------------------------------- gradcheck, gradgradcheck (float64)


def test_gradcheck_and_gradgradcheck_sparse():
    x = _logits((4, C, 3), 11, scale=1.5 * CAP).requires_grad_()
    labels = _labels((4, 3), 11)
    labels[0, 0] = 2

    def loss(x):
        return ft.sparse_softmax_cross_entropy_with_logits(
            labels,
            x,
            axis=1,
            softcap=CAP,
            label_smoothing=EPS,
            z_loss=LAM,
            ignore_index=2,
            class_weights=WEIGHTS,
        )

    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


def test_gradcheck_and_gradgradcheck_dense():
    x = _logits((5, C), 12, scale=1.5 * CAP).requires_grad_()
    t = _distribution((5, C), 12).requires_grad_()

    def loss(x, t):
        return ft.softmax_cross_entropy_with_logits(t, x, softcap=CAP, label_smoothing=EPS, z_loss=LAM)

    assert torch.autograd.gradcheck(loss, (x, t))
    assert torch.autograd.gradgradcheck(loss, (x, t))


@pytest.mark.parametrize("target", ["indices", "probabilities"])
def test_gradcheck_and_gradgradcheck_native_weight_with_smoothing(target):
    """cross_entropy's weight-with-smoothing path: the fused op and its two corrections, capped."""
    x = _logits((5, C), 13, scale=1.5 * CAP).requires_grad_()
    y = _labels((5,), 13) if target == "indices" else _distribution((5, C), 13)

    def loss(x):
        return ft.cross_entropy(x, y, weight=WEIGHTS, label_smoothing=EPS, z_loss=LAM, softcap=CAP, reduction="none")

    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


# ---------------------------------------------------------------- torch.func: forward mode, Hessians


def _sparse_ours(x, labels):
    out = ft.sparse_softmax_cross_entropy_with_logits(
        labels, x, softcap=CAP, label_smoothing=EPS, z_loss=LAM, ignore_index=2, class_weights=WEIGHTS
    )
    return out.pow(2).sum()  # squared: the upstream gradient depends on x


def _sparse_ref(x, labels):
    out = sparse_reference(x, labels, label_smoothing=EPS, z_loss=LAM, ignore_index=2, class_weights=WEIGHTS)
    return out.pow(2).sum()


def _dense_ours(x, t):
    return ft.softmax_cross_entropy_with_logits(t, x, softcap=CAP, label_smoothing=EPS, z_loss=LAM).pow(2).sum()


def _dense_ref(x, t):
    return dense_reference(x, t, label_smoothing=EPS, z_loss=LAM).pow(2).sum()


def _native_ours(x, y):
    return ft.cross_entropy(x, y, weight=WEIGHTS, label_smoothing=EPS, z_loss=LAM, softcap=CAP, reduction="none")


def _native_ref(x, y):
    z = capped(x)
    rows = tnf.cross_entropy(z, y, weight=WEIGHTS, label_smoothing=EPS, reduction="none")
    return rows + LAM * WEIGHTS[y] * torch.logsumexp(z, 1) ** 2


def _func_inputs(seed):
    x = _logits((4, C), seed)
    v = _logits((4, C), seed + 1, scale=1.0)
    labels = _labels((4,), seed)
    labels[1] = 2  # ignored
    return x, v, labels


@pytest.mark.parametrize("kind", ["sparse", "native weight with smoothing"])
def test_func_modes_sparse(kind):
    x, v, labels = _func_inputs(21)
    if kind == "sparse":
        ours, ref = (lambda x: _sparse_ours(x, labels)), (lambda x: _sparse_ref(x, labels))
    else:
        ours = lambda x: _native_ours(x, labels).pow(2).sum()  # noqa: E731
        ref = lambda x: _native_ref(x, labels).pow(2).sum()  # noqa: E731
    _close(F.grad(ours)(x), F.grad(ref)(x))
    _close(F.jvp(ours, (x,), (v,))[1], F.jvp(ref, (x,), (v,))[1])
    _close(F.jacfwd(ours)(x), F.jacrev(ref)(x))
    hvp = F.jvp(F.grad(ours), (x,), (v,))[1]  # forward over reverse
    _close(hvp, F.jvp(F.grad(ref), (x,), (v,))[1])
    hessian = F.hessian(ref)(x)
    _close(hvp, (hessian * v).sum((-2, -1)))
    _close(F.jacfwd(F.grad(ours))(x), hessian)
    _close(F.jacrev(F.grad(ours))(x), hessian)


def test_func_modes_dense_logits_and_labels():
    x, v, _ = _func_inputs(22)
    t = _distribution((4, C), 22)
    dt = _logits((4, C), 23, scale=1.0)
    _close(F.jvp(_dense_ours, (x, t), (v, dt))[1], F.jvp(_dense_ref, (x, t), (v, dt))[1])
    for argnums in (0, 1, (0, 1)):
        _close(F.grad(_dense_ours, argnums)(x, t), F.grad(_dense_ref, argnums)(x, t))
    for argnums in (0, 1):
        _close(F.jacfwd(_dense_ours, argnums)(x, t), F.jacrev(_dense_ref, argnums)(x, t))
    ours = F.jvp(F.grad(_dense_ours, argnums=(0, 1)), (x, t), (v, dt))[1]  # forward over reverse
    _close(ours, F.jvp(F.grad(_dense_ref, argnums=(0, 1)), (x, t), (v, dt))[1])
    ours = F.jacfwd(F.grad(_dense_ours, argnums=(0, 1)), argnums=(0, 1))(x, t)
    want = F.hessian(_dense_ref, argnums=(0, 1))(x, t)
    for i in range(2):
        for j in range(2):
            _close(ours[i][j], want[i][j])


def test_per_example_jacobians_forward_mode():
    """jacfwd of the per-example loss (not summed): the forward rule of the loss itself."""
    x, _, labels = _func_inputs(24)
    t = _distribution((4, C), 24)
    _close(
        F.jacfwd(lambda x: ft.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP, z_loss=LAM))(x),
        F.jacrev(lambda x: sparse_reference(x, labels, z_loss=LAM))(x),
    )
    _close(
        F.jacfwd(lambda x: ft.softmax_cross_entropy_with_logits(t, x, softcap=CAP))(x),
        F.jacrev(lambda x: dense_reference(x, t))(x),
    )


# ---------------------------------------------------------------- the native API against PyTorch's


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("target", ["indices", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no weight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, EPS], ids=["no smoothing", "smoothing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_native_cross_entropy_equals_pytorch_on_capped_logits(reduction, target, weighted, smoothing, dtype):
    shape = (6, C, 3)
    x = _logits(shape, 31, dtype).requires_grad_()
    if target == "indices":
        y = _labels((6, 3), 31)
        y[0, 0] = -100  # PyTorch's default ignore_index
    else:
        y = _distribution(shape, 31, 1).to(dtype)
    weight = WEIGHTS.to(dtype) if weighted else None
    upstream = _logits((6, 3), 32, dtype, scale=1.0) if reduction == "none" else torch.tensor(1.5, dtype=dtype)

    got = ft.cross_entropy(x, y, weight=weight, reduction=reduction, label_smoothing=smoothing, softcap=CAP)
    (grad,) = torch.autograd.grad(got, x, upstream)
    x64 = x.detach().to(torch.float64).requires_grad_()
    want = tnf.cross_entropy(
        capped(x64),
        y if target == "indices" else y.to(torch.float64),
        weight=None if weight is None else weight.to(torch.float64),
        reduction=reduction,
        label_smoothing=smoothing,
    )
    (want_grad,) = torch.autograd.grad(want, x64, upstream.to(torch.float64))
    assert got.dtype == dtype
    _close(got, want, dtype)
    _close(grad, want_grad, dtype)


def test_native_weight_that_requires_grad():
    """A weight that requires grad takes the graph of torch ops (not the Function): capped too,
    with its own gradient (PyTorch's rule for weight with smoothing, on the capped logits)."""
    x = _logits((5, C), 34).requires_grad_()
    weight = WEIGHTS.clone().requires_grad_()
    y = _labels((5,), 34)
    y[2] = -100
    got = ft.cross_entropy(x, y, weight, label_smoothing=EPS, z_loss=LAM, softcap=CAP, reduction="sum")
    grads = torch.autograd.grad(got, (x, weight))
    x64, w64 = x.detach().clone().requires_grad_(), WEIGHTS.clone().requires_grad_()
    z = capped(x64)
    safe = torch.where(y == -100, 0, y)
    nll = -torch.log_softmax(z, 1).gather(1, safe[:, None])[:, 0]
    smooth = (w64 * -torch.log_softmax(z, 1)).sum(1)
    rows = (1 - EPS) * w64[safe] * nll + EPS / C * smooth + LAM * w64[safe] * torch.logsumexp(z, 1) ** 2
    want = torch.where(y == -100, 0.0, rows).sum()
    _close(got, want)
    _close(grads, torch.autograd.grad(want, (x64, w64)))


def test_cross_entropy_loss_module():
    criterion = ft.CrossEntropyLoss(weight=WEIGHTS.float(), label_smoothing=EPS, softcap=30.0)
    assert criterion.softcap == 30.0
    assert "softcap=30.0" in repr(criterion)
    assert "softcap" not in repr(ft.CrossEntropyLoss())
    assert repr(ft.CrossEntropyLoss(z_loss=LAM, softcap=2)).endswith(f"(z_loss={LAM}, softcap=2.0)")
    x = _logits((5, C), 33, torch.float32, scale=60.0).requires_grad_()
    y = _labels((5,), 33)
    got = criterion(x, y)
    want = tnf.cross_entropy(capped(x.detach().double(), 30.0), y, weight=WEIGHTS, label_smoothing=EPS)
    _close(got, want, torch.float32)


# ---------------------------------------------------------------- the argument


BAD_CAPS = [0, 0.0, -1, -1.5, math.nan, math.inf, -math.inf, 1e39, "a", True, False, torch.tensor(True)]


def _message(value):
    with pytest.raises(ValueError) as error:
        _checks.softcap(value)
    return str(error.value)


@pytest.mark.parametrize("value", BAD_CAPS, ids=repr)
def test_bad_softcap_raises_the_common_message(value):
    message = _message(value)
    assert message.startswith("softcap must be None (no cap) or a finite number > 0")
    x, t, y = torch.randn(3, C), torch.softmax(torch.randn(3, C), -1), torch.tensor([0, 1, 2])
    calls = [
        lambda: ft.sparse_softmax_cross_entropy_with_logits(y, x, softcap=value),
        lambda: ft.softmax_cross_entropy_with_logits(t, x, softcap=value),
        lambda: ft.cross_entropy(x, y, softcap=value),
        lambda: ft.cross_entropy(x, t, softcap=value),
        lambda: ft.CrossEntropyLoss(softcap=value),
    ]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == message


def test_good_softcap_kinds():
    """A softcap may be an int, a NumPy scalar or a 0-d tensor; the kernels see its float32 value."""
    import numpy as np

    x, y = _logits((3, C), 41, torch.float32), torch.tensor([0, 1, 2])
    want = ft.sparse_softmax_cross_entropy_with_logits(y, x, softcap=4.0)
    for value in (4, np.float32(4.0), np.int64(4), torch.tensor(4.0)):
        assert torch.equal(ft.sparse_softmax_cross_entropy_with_logits(y, x, softcap=value), want)


# ---------------------------------------------------------------- no cap: exactly as before


def _loss_and_grads(fn, *inputs):
    inputs = [i.detach().clone().requires_grad_() if i.is_floating_point() else i for i in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out.sum(), [i for i in inputs if i.requires_grad])
    return [out, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_none_is_no_cap_bitwise(dtype):
    x = _logits((6, C), 51, dtype)
    y = _labels((6,), 51)
    t = _distribution((6, C), 51).to(dtype)
    weight = WEIGHTS.to(dtype)
    functions = [
        lambda x, **k: ft.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=EPS, z_loss=LAM, **k),
        lambda x, t, **k: ft.softmax_cross_entropy_with_logits(t, x, label_smoothing=EPS, **k),
        lambda x, **k: ft.cross_entropy(x, y, weight=weight, label_smoothing=EPS, reduction="none", **k),
        lambda x, t, **k: ft.cross_entropy(x, t, reduction="none", **k),
    ]
    for fn in functions:
        inputs = (x, t) if fn.__code__.co_argcount == 2 else (x,)
        without = _loss_and_grads(fn, *inputs)
        with_none = _loss_and_grads(lambda *a: fn(*a, softcap=None), *inputs)
        for a, b in zip(without, with_none):
            assert torch.equal(a, b)
        capped_result = _loss_and_grads(lambda *a: fn(*a, softcap=CAP), *inputs)
        assert not torch.equal(capped_result[0], without[0])  # the cap changes these logits' loss


# ---------------------------------------------------------------- the ops themselves


def test_ops_opcheck_with_softcap():
    x = _logits((4, C), 61, torch.float32)
    labels = torch.tensor([0, 1, 2, 6])
    g = torch.ones(4)
    t = torch.softmax(torch.randn(4, C), -1)
    lse = torch.logsumexp(capped(x.double()), -1)
    ops = torch.ops.fused_xent
    for op, args in [
        (ops.sparse_forward, (x.clone().requires_grad_(), labels, WEIGHTS.float(), 1, EPS, 0.0, 2, CAP)),
        (ops.sparse_backward, (x, labels, None, lse, g, 1, 0.0, LAM, None, CAP)),
        (ops.dense_forward, (x.clone().requires_grad_(), t, 1, 0.0, LAM, CAP)),
        (ops.dense_backward, (x, t, lse, g, 1, EPS, 0.0, CAP)),
    ]:
        torch.library.opcheck(op, args)
    loss, got_lse = ops.sparse_forward(x, labels, None, 1, 0.0, 0.0, None, CAP)
    torch.testing.assert_close(got_lse, lse, rtol=0, atol=1e-5)


def test_torch_compile_with_softcap():
    x = _logits((6, C), 62, torch.float32)
    y = _labels((6,), 62)
    t = _distribution((6, C), 62).float()

    weight = WEIGHTS.float()

    def step(x):
        sparse = ft.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=EPS, softcap=CAP)
        dense = ft.softmax_cross_entropy_with_logits(t, x * 2.0, z_loss=LAM, softcap=CAP)
        native = ft.cross_entropy(x, y, weight, label_smoothing=EPS, softcap=CAP)  # torch ops around the op
        return sparse.mean() + dense.mean() + native

    def loss_and_grad(fn):
        z = x.clone().requires_grad_()
        out = fn(z)
        return out, torch.autograd.grad(out, z)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got, want = loss_and_grad(compiled), loss_and_grad(step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    x64 = x.double().requires_grad_()
    ref = (
        sparse_reference(x64, y, label_smoothing=EPS).mean()
        + dense_reference(x64 * 2.0, t.double(), z_loss=LAM).mean()
        + tnf.cross_entropy(capped(x64), y, WEIGHTS, label_smoothing=EPS)
    )
    _close(got[0], ref, torch.float32)
    _close(got[1], torch.autograd.grad(ref, x64)[0], torch.float32)


# ---------------------------------------------------------------- the comparison itself


def test_the_comparison_fails_on_a_wrong_cap():
    """The helper above must see a wrong cap (here 1.01 times the true one), and a missing slope."""
    x, _, labels = _func_inputs(71)
    loss = ft.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP * 1.01)
    with pytest.raises(AssertionError):
        _close(loss, sparse_reference(x, labels))
    x = x.requires_grad_()
    (grad,) = torch.autograd.grad(ft.sparse_softmax_cross_entropy_with_logits(labels, x, softcap=CAP).sum(), x)
    z = capped(x.detach()).requires_grad_()
    (unsloped,) = torch.autograd.grad(tnf.cross_entropy(z, labels, reduction="sum"), z)
    with pytest.raises(AssertionError):
        _close(grad, unsloped)
    with pytest.raises(AssertionError):  # even at bfloat16's tolerance
        _close(grad.bfloat16(), unsloped, torch.bfloat16)


def test_ops_second_derivatives_with_softcap():
    """The custom ops' own autograd (what torch.compile traces): the backward op's derivative is
    the composite in _ops, capped."""
    x = _logits((4, C), 63, scale=1.5 * CAP).requires_grad_()
    t = _distribution((4, C), 63).requires_grad_()
    labels = torch.tensor([0, 1, 2, 6])
    ops = torch.ops.fused_xent

    def sparse(x):
        return ops.sparse_forward(x, labels, WEIGHTS.float(), 1, EPS, LAM, 2, CAP)[0]

    def dense(x, t):
        return ops.dense_forward(x, t, 1, EPS, LAM, CAP)[0]

    assert torch.autograd.gradgradcheck(sparse, (x,))
    assert torch.autograd.gradgradcheck(dense, (x, t))
    v = _logits((4, C), 64, scale=1.0)
    for ours, ref in [
        (sparse, lambda x: sparse_reference(x, labels, 1, EPS, LAM, 2, WEIGHTS)),
        (lambda x: dense(x, t.detach()), lambda x: dense_reference(x, t.detach(), 1, EPS, LAM)),
    ]:
        hvps = []
        for f in (ours, ref):
            z = x.detach().clone().requires_grad_()
            (g,) = torch.autograd.grad(f(z).pow(2).sum(), z, create_graph=True)
            hvps.append(torch.autograd.grad((g * v).sum(), z)[0])
        _close(*hvps)


def test_cuda_kernels_get_the_softcap(monkeypatch):
    """The CUDA branch of each kernel passes the cap to fused_xent.cuda as ``softcap`` (and, without
    a cap, calls it as before the option existed). No GPU here: fused_xent.cuda is replaced by a
    recorder and the logits by an object that says it is on a GPU."""
    from fused_xent import cuda
    from fused_xent.torch import _ops

    calls = []
    for name in ("sparse_forward", "sparse_backward", "dense_forward", "dense_backward"):
        monkeypatch.setattr(cuda, name, lambda *args, _name=name, **kwargs: calls.append((_name, kwargs)))

    class OnGpu:
        is_cuda = True

    z, labels, lse, g = OnGpu(), object(), object(), object()
    for cap in (CAP, 0.0):
        calls.clear()
        _ops._sparse_forward_kernel(z, labels, None, 1, EPS, LAM, 2, cap)
        _ops._sparse_backward_kernel(z, labels, None, lse, g, 1, EPS, LAM, 2, cap)
        _ops._dense_forward_kernel(z, labels, 1, EPS, LAM, cap)
        _ops._dense_backward_kernel(z, labels, lse, g, 1, EPS, LAM, cap)
        assert [name for name, _ in calls] == ["sparse_forward", "sparse_backward", "dense_forward", "dense_backward"]
        for name, kwargs in calls:
            assert kwargs.get("softcap") == (cap or None), (name, kwargs)
            assert kwargs["label_smoothing"] == EPS and kwargs["z_loss"] == LAM and kwargs["axis"] == 1
