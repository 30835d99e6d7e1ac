"""The CPU backward reuses the last large gradient's memory only when nothing references it:
a gradient the caller keeps (itself, a view, a NumPy view, a .grad) is never overwritten."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fused_xent.torch as ft  # noqa: E402

N, C = 1024, 4096  # 16 MiB of float32: large enough to be kept


def _step(seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=generator, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=generator)
    (grad,) = torch.autograd.grad(ft.cross_entropy(z, y), z)
    expected = torch.softmax(z.detach(), -1)
    expected[torch.arange(N), y] -= 1
    return grad, expected / N


def test_a_dropped_gradient_is_reused():
    ft.release_cached_memory()
    pointers = set()
    for seed in range(3):
        grad, expected = _step(seed)
        torch.testing.assert_close(grad, expected)
        pointers.add(grad.data_ptr())
        del grad
    assert len(pointers) == 1


@pytest.mark.parametrize("keep", ["tensor", "view", "numpy", "grad attribute"])
def test_a_kept_gradient_is_never_overwritten(keep):
    ft.release_cached_memory()
    kept, expected = [], []
    for seed in range(3):
        if keep == "grad attribute":
            generator = torch.Generator().manual_seed(seed)
            z = torch.randn(N, C, generator=generator, requires_grad=True)
            y = torch.randint(0, C, (N,), generator=generator)
            ft.cross_entropy(z, y).backward()
            grad, want = z.grad, torch.softmax(z.detach(), -1)
            want[torch.arange(N), y] -= 1
            want /= N
            del z
        else:
            grad, want = _step(seed)
        kept.append({"tensor": grad, "view": grad[:7], "numpy": grad.numpy(), "grad attribute": grad}[keep])
        expected.append(want[:7] if keep == "view" else want)
        del grad
    for got, want in zip(kept, expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-7)


def test_the_check_catches_an_overwritten_gradient():
    """The comparison above fails where a kept gradient was overwritten by a later step."""
    grad, _ = _step(0)
    _, later = _step(1)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(grad.numpy(), later.numpy(), rtol=1e-5, atol=1e-7)


def test_a_leaf_gradient_is_stolen_not_copied():
    """Only the storage is cached: autograd can move the gradient into a leaf's .grad as is."""
    ft.release_cached_memory()
    _step(0)  # leaves a free buffer behind
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(N, C, generator=generator, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=generator)
    captured = []
    z.register_hook(lambda grad: captured.append(grad.data_ptr()))
    ft.cross_entropy(z, y).backward()
    assert z.grad.data_ptr() == captured[0]
