"""Every autodiff mode of fused_xent.torch against the same loss written with torch ops, in
float64: reverse (torch.func.grad, jacrev), forward (forward_ad, torch.func.jvp, jacfwd), Hessians
forward over reverse and reverse over reverse, third derivatives with one forward level; forward
over forward raises instead of giving a wrong value (it used to give zero tangents silently)."""

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402

import fused_xent.torch as ft  # noqa: E402

F = torch.func
EPS, LAM = 0.125, 0.015625  # exact in float32, the kernels' option type
C = 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, C, generator=g, dtype=torch.float64) * 2
    v = torch.randn(4, C, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, C, generator=g, dtype=torch.float64), -1)
    dt = torch.randn(4, C, generator=g, dtype=torch.float64)
    return z, v, t, dt


LABELS = torch.tensor([0, 3, 4, 1])
WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.75], dtype=torch.float64)


def sparse_ours(z, ignore_index=None):
    return (
        ft.sparse_softmax_cross_entropy_with_logits(
            LABELS, z, label_smoothing=EPS, z_loss=LAM, class_weights=WEIGHTS, ignore_index=ignore_index
        )
        .pow(2)
        .sum()
    )  # squared: the upstream gradient depends on z


def sparse_reference(z, ignore_index=None):
    lse = torch.logsumexp(z, -1)
    q = torch.nn.functional.one_hot(LABELS, C).to(torch.float64) * (1 - EPS) + EPS / C
    loss = WEIGHTS[LABELS] * (-(q * (z - lse[:, None])).sum(-1) + LAM * lse**2)
    if ignore_index is not None:
        loss = torch.where(LABELS == ignore_index, 0.0, loss)
    return loss.pow(2).sum()


def dense_ours(z, t):
    return ft.softmax_cross_entropy_with_logits(t, z, label_smoothing=EPS, z_loss=LAM).pow(2).sum()


def dense_reference(z, t):
    lse = torch.logsumexp(z, -1)
    q = t * (1 - EPS) + EPS / C
    return (-(q * (z - lse[:, None])).sum(-1) + LAM * lse**2).pow(2).sum()


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [None, 3])
def test_sparse_every_mode(ignore_index):
    z, v, _, _ = _inputs()
    ours = lambda x: sparse_ours(x, ignore_index)  # noqa: E731
    ref = lambda x: sparse_reference(x, ignore_index)  # noqa: E731
    _close(F.grad(ours)(z), F.grad(ref)(z))
    _close(F.jvp(ours, (z,), (v,))[1], F.jvp(ref, (z,), (v,))[1])
    _close(F.jacfwd(ours)(z), F.jacrev(ref)(z))
    _close(F.jacrev(ours)(z), F.jacrev(ref)(z))
    hessian = F.hessian(ref)(z)
    _close(F.jacfwd(F.grad(ours))(z), hessian)  # forward over reverse
    _close(F.jacrev(F.grad(ours))(z), hessian)
    _close(F.hessian(ours)(z), hessian)
    hvp = F.jvp(F.grad(ours), (z,), (v,))[1]
    _close(hvp, (hessian * v).sum((-2, -1)))
    third = F.jacrev(F.hessian(ref))(z)
    _close(F.jacrev(F.jacfwd(F.grad(ours)))(z), third)
    _close(F.jacfwd(F.jacrev(F.grad(ours)))(z), third)
    _close(F.jacrev(F.jacrev(F.grad(ours)))(z), third)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(z, v))).tangent
    _close(tangent, F.jvp(ref, (z,), (v,))[1])


def test_dense_every_mode_for_logits_and_labels():
    z, v, t, dt = _inputs(1)
    _close(F.jvp(dense_ours, (z, t), (v, dt))[1], F.jvp(dense_reference, (z, t), (v, dt))[1])
    for argnums in (0, 1, (0, 1)):
        _close(F.grad(dense_ours, argnums)(z, t), F.grad(dense_reference, argnums)(z, t))
    ours = F.jacfwd(F.grad(dense_ours, argnums=(0, 1)), argnums=(0, 1))(z, t)
    ref = F.hessian(dense_reference, argnums=(0, 1))(z, t)
    for i in range(2):
        for j in range(2):
            _close(ours[i][j], ref[i][j])
    third = F.jacrev(F.jacfwd(F.grad(dense_ours)))(z, t)
    _close(third, F.jacrev(F.hessian(dense_reference))(z, t))
    with fwAD.dual_level():
        out = dense_ours(fwAD.make_dual(z, v), fwAD.make_dual(t, dt))
        tangent = fwAD.unpack_dual(out).tangent
    _close(tangent, F.jvp(dense_reference, (z, t), (v, dt))[1])


def test_plain_autograd_to_third_order():
    z, v, _, _ = _inputs(2)
    grads = []
    for f in (sparse_ours, sparse_reference):
        x = z.clone().requires_grad_()
        (g1,) = torch.autograd.grad(f(x), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * v).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad((g2 * v).sum(), x)
        grads.append((g1, g2, g3))
    for ours, ref in zip(*grads):
        _close(ours, ref)


@pytest.mark.parametrize("compose", ["jacfwd(jacfwd)", "jvp(jvp)", "jacfwd(jacfwd(grad))"])
def test_forward_over_forward_raises(compose):
    z, v, t, _ = _inputs(3)
    run = {
        "jacfwd(jacfwd)": lambda: F.jacfwd(F.jacfwd(sparse_ours))(z),
        "jvp(jvp)": lambda: F.jvp(lambda x: F.jvp(sparse_ours, (x,), (v,))[1], (z,), (v,)),
        "jacfwd(jacfwd(grad))": lambda: F.jacfwd(F.jacfwd(F.grad(lambda x: dense_ours(x, t))))(z),
    }[compose]
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        run()


def test_the_comparison_sees_a_zero_tangent():
    """What forward mode used to return (zeros) must fail the comparison above."""
    z, v, _, _ = _inputs()
    with pytest.raises(AssertionError):
        _close(torch.zeros(()), F.jvp(sparse_reference, (z,), (v,))[1])
