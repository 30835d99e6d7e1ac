"""fused_xent._core's CPU forward and backward bindings (sparse_forward, sparse_backward,
dense_forward, dense_backward: the CUDA bindings' arguments, minus the stream).

The forward then the backward give the bits of the combined calls and of fused_xent.numpy;
lse is the float64 row logsumexp; bad buffers raise before any kernel runs. In PyTorch, one
training step runs the forward kernel once: the backward op reads the forward's lse.
"""

import re

import numpy as np
import pytest

from fused_xent import _core
from fused_xent import numpy as fxnp

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

DTYPES = [np.float32, np.float64, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])
SPARSE_OPTIONS = {
    "defaults": {},
    "all": dict(
        ignore_index=2, label_smoothing=0.1, class_weights=np.linspace(0.5, 2.0, 7, dtype=np.float32), z_loss=0.01
    ),
}


def _name(dtype):
    return np.dtype(dtype).name


def _bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _case(dtype, shape=(5, 7, 3), seed=0):
    """Logits [outer, classes, inner] (class axis 1), int64 labels per row (the first is 2: ignored
    under ignore_index=2), grad_loss."""
    rng = np.random.default_rng(seed)
    outer, classes, inner = shape
    z = (rng.normal(size=shape) * 3).astype(dtype)
    labels = rng.integers(0, classes, size=(outer, inner))
    labels[0, 0] = 2
    grad_loss = rng.normal(size=(outer, inner)).astype(dtype)
    return z, labels, grad_loss


def _sparse_kwargs(z, labels, options):
    outer, classes, inner = z.shape
    return dict(
        dtype=_name(z.dtype),
        logits=z,
        labels=labels,
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss=options.get("z_loss", 0.0),
        ignore_index=options.get("ignore_index"),
        class_weights=options.get("class_weights"),
    )


def _dense_kwargs(z, t, label_smoothing=0.0, z_loss=0.0):
    outer, classes, inner = z.shape
    return dict(
        dtype=_name(z.dtype),
        logits=z,
        labels=t,
        outer=outer,
        classes=classes,
        inner=inner,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )


def _forward(binding, kwargs, z):
    rows = z.shape[0] * z.shape[2]
    loss, lse = np.full(rows, np.nan, z.dtype), np.full(rows, np.nan)
    binding(loss=loss, lse=lse, **kwargs)
    return loss, lse


def _backward(binding, kwargs, z, lse, grad_loss):
    grad = np.full_like(z, np.nan)
    binding(lse=lse, grad_loss=np.ascontiguousarray(grad_loss.reshape(-1)), grad_logits=grad, **kwargs)
    return grad


def _logsumexp(z64, axis):
    m = z64.max(axis, keepdims=True)
    return (m + np.log(np.exp(z64 - m).sum(axis, keepdims=True))).squeeze(axis)


def _assert_lse(lse, z):
    ref = _logsumexp(z.astype(np.float64), 1).reshape(-1)
    assert lse.dtype == np.float64
    # float64 logits accumulate in float64; the others in float32.
    eps = np.finfo(np.float64 if z.dtype == np.float64 else np.float32).eps
    assert np.all(np.abs(lse - ref) <= 8 * eps * (1 + np.abs(ref))), np.max(np.abs(lse - ref))


# ---------------------------------------------------------------- forward then backward


@pytest.mark.parametrize("options", list(SPARSE_OPTIONS), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_sparse_forward_then_backward_gives_the_combined_bits(dtype, options):
    options = SPARSE_OPTIONS[options]
    z, labels, grad_loss = _case(dtype)
    kwargs = _sparse_kwargs(z, labels, options)
    loss, lse = _forward(_core.sparse_forward, kwargs, z)
    grad = _backward(_core.sparse_backward, kwargs, z, lse, grad_loss)
    _assert_lse(lse, z)

    combined = (np.empty_like(loss), np.empty_like(lse), np.ascontiguousarray(grad_loss.reshape(-1)), np.empty_like(z))
    _core.sparse(*kwargs.values(), *combined)
    for ours, theirs in zip((loss, lse, grad), (combined[0], combined[1], combined[3])):
        np.testing.assert_array_equal(_bits(ours), _bits(theirs))

    front_loss, front_grad = fxnp.sparse_softmax_cross_entropy_with_logits(
        labels, z, axis=1, grad_loss=grad_loss, **options
    )
    np.testing.assert_array_equal(_bits(front_loss.reshape(-1)), _bits(loss))
    np.testing.assert_array_equal(_bits(front_grad), _bits(grad))
    if "ignore_index" in options:
        assert front_loss[0, 0] == 0 and not grad[0, :, 0].any()  # the ignored row


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_dense_forward_then_backward_gives_the_combined_bits(dtype):
    z, _, grad_loss = _case(dtype, seed=1)
    t = np.random.default_rng(2).dirichlet(np.ones(z.shape[1]), size=(z.shape[0], z.shape[2]))
    t = np.ascontiguousarray(np.moveaxis(t, -1, 1)).astype(dtype)
    kwargs = _dense_kwargs(z, t, label_smoothing=0.05, z_loss=0.02)
    loss, lse = _forward(_core.dense_forward, kwargs, z)
    grad = _backward(_core.dense_backward, kwargs, z, lse, grad_loss)
    _assert_lse(lse, z)

    combined = (np.empty_like(loss), np.empty_like(lse), np.ascontiguousarray(grad_loss.reshape(-1)), np.empty_like(z))
    _core.dense(*kwargs.values(), *combined)
    for ours, theirs in zip((loss, lse, grad), (combined[0], combined[1], combined[3])):
        np.testing.assert_array_equal(_bits(ours), _bits(theirs))

    front_loss, front_grad = fxnp.softmax_cross_entropy_with_logits(
        t, z, axis=1, label_smoothing=0.05, z_loss=0.02, grad_loss=grad_loss
    )
    np.testing.assert_array_equal(_bits(front_loss.reshape(-1)), _bits(loss))
    np.testing.assert_array_equal(_bits(front_grad), _bits(grad))


@pytest.mark.parametrize("shape", [(4, 3, 1), (3, 5000, 1), (64, 10, 1), (2, 9, 5)])
def test_lse_is_the_float64_row_logsumexp(shape):
    for dtype in (np.float64, np.float32):
        z, labels, _ = _case(dtype, shape, seed=3)
        _, lse = _forward(_core.sparse_forward, _sparse_kwargs(z, labels, {}), z)
        _assert_lse(lse, z)


def test_empty_batch_writes_nothing():
    z = np.zeros((0, 4, 1), np.float32)
    kwargs = _sparse_kwargs(z, np.zeros((0, 1), np.int64), {})
    loss, lse = _forward(_core.sparse_forward, kwargs, z)
    assert loss.shape == lse.shape == (0,)
    assert _backward(_core.sparse_backward, kwargs, z, lse, np.zeros(0, np.float32)).shape == z.shape


# ---------------------------------------------------------------- bad buffers


def _sparse_call(**changes):
    """A valid sparse_backward call on 4 rows of 3 classes, with `changes`."""
    z = np.zeros((4, 3), np.float32)
    arguments = dict(
        dtype="float32",
        logits=z,
        labels=np.zeros(4, np.int64),
        outer=4,
        classes=3,
        inner=1,
        label_smoothing=0.0,
        z_loss=0.0,
        ignore_index=None,
        class_weights=None,
        lse=np.zeros(4),
        grad_loss=np.ones(4, np.float32),
        grad_logits=np.empty_like(z),
    )
    arguments.update(changes)
    return arguments


def test_valid_calls_pass():
    _core.sparse_backward(**_sparse_call())
    arguments = _sparse_call()
    del arguments["lse"], arguments["grad_loss"], arguments["grad_logits"]
    _core.sparse_forward(loss=np.empty(4, np.float32), lse=np.empty(4), **arguments)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lse=np.zeros(5)), r"lse has 5 elements, expected 4"),
        (dict(lse=np.zeros(2)), r"lse has 2 elements, expected 4"),
        (dict(lse=np.zeros(8)[::2]), r"lse must be C-contiguous"),
        (dict(lse=np.zeros(4, np.float32)), r"lse has the wrong element type"),
        (dict(lse=np.zeros(4, np.int64)), r"lse has the wrong element type"),
        (dict(grad_loss=np.ones(3, np.float32)), r"grad_loss has 3 elements, expected 4"),
        (dict(grad_loss=np.ones(4, np.float64)), r"grad_loss has the wrong element type"),
        (dict(grad_logits=np.empty((4, 4), np.float32)), r"grad_logits has 16 elements, expected 12"),
        (dict(grad_logits=np.empty((4, 3), np.float16)), r"grad_logits has the wrong element type"),
        (dict(logits=np.zeros((4, 3), np.float64)), r"logits has the wrong element type"),
        (dict(dtype="bfloat16", logits=np.zeros((4, 3), np.float16)), r"logits has the wrong element type"),
        (dict(labels=np.zeros(5, np.int64)), r"labels has 5 elements, expected 4"),
        (dict(labels=np.array([0, 1, 3, 0])), r"label value of 3 which is outside the valid range of \[0, 3\)"),
        (dict(labels=np.array([0, -1, 2, 0])), r"label value of -1"),
        (dict(class_weights=np.ones(2, np.float32)), r"class_weights must be a vector with one weight per class"),
    ],
)
def test_backward_rejects_bad_buffers(changes, message):
    arguments = _sparse_call(**changes)
    grad = arguments["grad_logits"]
    grad.fill(7)
    with pytest.raises(ValueError, match=message):
        _core.sparse_backward(**arguments)
    assert (grad == 7).all()  # checked before the kernel ran


def test_backward_rejects_read_only_grad_logits():
    grad = np.empty((4, 3), np.float32)
    grad.flags.writeable = False
    with pytest.raises(ValueError, match=r"grad_logits must be writable"):
        _core.sparse_backward(**_sparse_call(grad_logits=grad))


@pytest.mark.parametrize(
    "loss, lse, message",
    [
        (np.empty(4, np.float32), np.empty(4, np.float32), r"lse has the wrong element type"),
        (np.empty(4, np.float32), np.empty(3), r"lse has 3 elements, expected 4"),
        (np.empty(5, np.float32), np.empty(4), r"loss has 5 elements, expected 4"),
        (np.empty(4, np.float64), np.empty(4), r"loss has the wrong element type"),
        (np.empty(4, np.float32), np.zeros(4).view(np.float64).copy(), None),
    ],
)
def test_forwards_reject_bad_outputs(loss, lse, message):
    z = np.zeros((4, 3), np.float32)
    common = dict(dtype="float32", logits=z, outer=4, classes=3, inner=1, label_smoothing=0.0, z_loss=0.0)
    calls = [
        lambda: _core.sparse_forward(
            labels=np.zeros(4, np.int32), ignore_index=None, class_weights=None, loss=loss, lse=lse, **common
        ),
        lambda: _core.dense_forward(labels=np.zeros_like(z), loss=loss, lse=lse, **common),
    ]
    for call in calls:
        if message is None:
            call()
        else:
            with pytest.raises(ValueError, match=message):
                call()


def test_forward_rejects_read_only_lse():
    lse = np.empty(4)
    lse.flags.writeable = False
    with pytest.raises(ValueError, match=r"lse must be writable"):
        _core.dense_forward(
            "float32",
            np.zeros((4, 3), np.float32),
            np.zeros((4, 3), np.float32),
            4,
            3,
            1,
            0.0,
            0.0,
            np.empty(4, np.float32),
            lse,
        )


def test_dense_backward_rejects_bad_buffers():
    z = np.zeros((4, 3), np.float32)
    common = dict(
        dtype="float32",
        logits=z,
        labels=np.zeros_like(z),
        outer=4,
        classes=3,
        inner=1,
        label_smoothing=0.0,
        z_loss=0.0,
        grad_loss=np.ones(4, np.float32),
    )
    with pytest.raises(ValueError, match=r"lse has the wrong element type"):
        _core.dense_backward(lse=np.zeros(4, np.float32), grad_logits=np.empty_like(z), **common)
    with pytest.raises(ValueError, match=r"grad_logits has 8 elements, expected 12"):
        _core.dense_backward(lse=np.zeros(4), grad_logits=np.empty((4, 2), np.float32), **common)
    with pytest.raises(ValueError, match=r"labels has 8 elements, expected 12"):
        _core.dense_backward(
            **{**common, "labels": np.zeros((4, 2), np.float32)}, lse=np.zeros(4), grad_logits=np.empty_like(z)
        )


def test_bindings_take_the_cuda_bindings_keywords():
    """Same names and order as cc/py/cuda_bindings.cc, minus the stream and the CUDA launchers'
    optional device workspace (the CPU kernels need none); the CPU sparse bindings add the
    vocabulary-parallel keywords (tests/kernels/test_shard_mode.py), which the CUDA ones lack; both
    end with softcap."""
    shard, dense_shard = ", total_classes, absent_label, softcap", ", total_classes, label_sums, softcap"
    expected = {
        "sparse_forward": "dtype, logits, labels, outer, classes, inner, label_smoothing, z_loss, ignore_index, "
        "class_weights, loss, lse" + shard,
        "sparse_backward": "dtype, logits, labels, outer, classes, inner, label_smoothing, z_loss, ignore_index, "
        "class_weights, lse, grad_loss, grad_logits" + shard,
        "dense_forward": "dtype, logits, labels, outer, classes, inner, label_smoothing, z_loss, loss, lse"
        + dense_shard,
        "dense_backward": "dtype, logits, labels, outer, classes, inner, label_smoothing, z_loss, lse, grad_loss, "
        "grad_logits" + dense_shard,
    }
    for name, parameters in expected.items():
        signature = getattr(_core, name).__doc__.strip().splitlines()[0]
        names = re.findall(r"(\w+): ", signature[len(name) :])
        assert ", ".join(names) == parameters, signature
        cuda = getattr(_core, "cuda_" + name, None)
        if cuda is not None:
            cuda_names = re.findall(r"(\w+): ", cuda.__doc__.strip().splitlines()[0][len(name) + 5 :])
            cpu_only = ("total_classes", "absent_label", "label_sums")
            shared = [n for n in names if n not in cpu_only and n != "softcap"]
            assert [n for n in cuda_names if n != "workspace"] == shared + ["stream", "softcap"], cuda_names


# ---------------------------------------------------------------- PyTorch: one forward kernel per step


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the CPU kernel calls: forwards (sparse_forward, dense_forward, and the combined
    sparse/dense, which always run the forward) and backwards."""
    calls = {"forward": 0, "backward": 0}

    def counting(name, kind, also=None):
        original = getattr(_core, name)

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            # The combined calls run the backward too when given grad_logits (their last argument).
            if also and kwargs.get("grad_logits", args[-1] if args else None) is not None:
                calls[also] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(_core, name, wrapper)

    for kind in ("sparse", "dense"):
        counting(f"{kind}_forward", "forward")
        counting(f"{kind}_backward", "backward")
        counting(kind, "forward", also="backward")
    return calls


def test_torch_training_step_runs_the_forward_kernel_once(torch, kernel_calls):
    import fused_xent.torch as ft

    z = torch.randn(6, 5, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = ft.sparse_softmax_cross_entropy_with_logits(labels, z, label_smoothing=0.1, z_loss=0.01).sum()
    loss.backward()
    assert kernel_calls == {"forward": 1, "backward": 1}

    t = torch.softmax(torch.randn(6, 5), -1).requires_grad_()
    ft.softmax_cross_entropy_with_logits(t, z, z_loss=0.01).sum().backward()
    assert kernel_calls == {"forward": 2, "backward": 2}

    expected_z = torch.autograd.grad(
        (
            torch.nn.functional.cross_entropy(z, labels, reduction="none", label_smoothing=0.1)
            + 0.01 * torch.logsumexp(z, -1) ** 2
        ).sum()
        + (-(t * torch.log_softmax(z, -1)).sum(-1) + 0.01 * torch.logsumexp(z, -1) ** 2).sum(),
        z,
    )[0]
    torch.testing.assert_close(z.grad, expected_z, rtol=1e-5, atol=1e-6)


def test_torch_forward_ops_return_a_non_differentiable_float64_lse(torch):
    import fused_xent.torch  # noqa: F401  (registers the ops)

    z = torch.randn(4, 7, 3, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 7, (4, 3))
    loss, lse = torch.ops.fused_xent.sparse_forward(z, labels, None, 1, 0.0, 0.0, None)
    assert loss.requires_grad and not lse.requires_grad
    assert lse.dtype == torch.float64 and lse.shape == loss.shape == (4, 3)
    torch.testing.assert_close(lse, torch.logsumexp(z.detach().double(), 1), rtol=0, atol=1e-5)
    loss, lse = torch.ops.fused_xent.dense_forward(z, torch.softmax(z.detach(), 1), 1, 0.0, 0.0)
    assert loss.requires_grad and not lse.requires_grad and lse.dtype == torch.float64


def test_torch_second_derivatives_differentiate_through_the_logits(torch):
    import fused_xent.torch as ft

    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1).requires_grad_()
    labels = torch.tensor([0, 4, 2])
    weights = torch.linspace(0.5, 2.0, 5, dtype=torch.float32)
    torch.autograd.gradgradcheck(
        lambda z: ft.sparse_softmax_cross_entropy_with_logits(
            labels, z, z_loss=0.1, label_smoothing=0.2, class_weights=weights, ignore_index=2
        ),
        (z,),
    )
    torch.autograd.gradgradcheck(lambda z, t: ft.softmax_cross_entropy_with_logits(t, z, z_loss=0.1), (z, t))


def test_torch_opcheck(torch):
    import fused_xent.torch  # noqa: F401

    z = torch.randn(4, 7)
    labels = torch.tensor([0, 1, 2, 6])
    g = torch.ones(4)
    t = torch.softmax(z, -1)
    weights = torch.linspace(0.5, 2.0, 7)
    lse = torch.logsumexp(z.double(), -1)
    ops = torch.ops.fused_xent
    for op, args in [
        (ops.sparse_forward, (z.clone().requires_grad_(), labels, weights, 1, 0.1, 0.0, 2)),
        (ops.sparse_backward, (z, labels, None, lse, g, 1, 0.0, 0.01, None)),
        (ops.dense_forward, (z, t, 1, 0.0, 0.0)),
        (ops.dense_backward, (z, t, lse, g, 1, 0.1, 0.0)),
    ]:
        torch.library.opcheck(op, args)


def test_torch_compile_keeps_the_two_ops(torch):
    import fused_xent.torch  # noqa: F401

    z = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    t = torch.softmax(torch.randn(6, 5), -1)

    def step(z):
        sparse = torch.ops.fused_xent.sparse_forward(z, labels, None, 1, 0.1, 0.01, None)[0]
        dense = torch.ops.fused_xent.dense_forward(z * 2.0, t, 1, 0.0, 0.01)[0]
        return sparse.mean() + dense.mean()

    def loss_and_grad(fn):
        x = z.clone().requires_grad_()
        out = fn(x)
        return out, torch.autograd.grad(out, x)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for ours, eager in zip(loss_and_grad(compiled), loss_and_grad(step)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


# ---------------------------------------------------------------- fused_xent.cuda's halves, on the CPU bindings


class _NumPyBackend:
    """fused_xent.cuda's array backend over NumPy (the CPU bindings take the CUDA bindings' keywords)."""

    @staticmethod
    def dtype_name(x):
        return x.dtype.name

    def as_array(self, value, dtype_name=None):
        return np.asarray(value, dtype=dtype_name)

    def contiguous(self, x):
        return np.ascontiguousarray(x)

    def broadcast(self, x, shape):
        return np.ascontiguousarray(np.broadcast_to(x, shape))

    def empty(self, shape, dtype_name):
        return np.empty(shape, dtype_name)

    def ones(self, shape, dtype_name):
        return np.ones(shape, dtype_name)

    def interface(self, x):
        return x

    def stream(self):
        return 0


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """fused_xent.cuda with NumPy arrays, its CUDA bindings replaced by the CPU ones (stream and
    workspace dropped)."""
    from fused_xent import cuda

    monkeypatch.setattr(cuda, "_backend", lambda logits: _NumPyBackend())
    for name in ("sparse_forward", "sparse_backward", "dense_forward", "dense_backward"):
        cpu = getattr(_core, name)
        monkeypatch.setattr(
            _core, "cuda_" + name, lambda stream, _cpu=cpu, workspace=None, **kwargs: _cpu(**kwargs), raising=False
        )
    return cuda


@pytest.mark.parametrize("options", list(SPARSE_OPTIONS), ids=str)
def test_cuda_module_halves_compose_to_its_combined_function(cuda_on_cpu, options):
    options = SPARSE_OPTIONS[options]
    z, labels, grad_loss = _case(np.float32, seed=6)
    loss, lse = cuda_on_cpu.sparse_forward(labels, z, axis=1, **options)
    _assert_lse(lse.reshape(-1), z)
    grad = cuda_on_cpu.sparse_backward(labels, z, lse, grad_loss, axis=1, **options)
    combined = cuda_on_cpu.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, grad_loss=grad_loss, **options)
    ours = fxnp.sparse_softmax_cross_entropy_with_logits(labels, z, axis=1, grad_loss=grad_loss, **options)
    for result in (combined, ours):
        np.testing.assert_array_equal(_bits(result[0]), _bits(loss))
        np.testing.assert_array_equal(_bits(result[1]), _bits(grad))
    with pytest.raises(ValueError, match=r"lse must have the loss's shape \(5, 3\), got \(15,\)"):
        cuda_on_cpu.sparse_backward(labels, z, lse.reshape(-1), grad_loss, axis=1, **options)

    t = np.ascontiguousarray(np.full_like(z, 1.0 / z.shape[1]))
    loss, lse = cuda_on_cpu.dense_forward(t, z, 1, z_loss=0.01)
    grad = cuda_on_cpu.dense_backward(t, z, lse, grad_loss, 1, z_loss=0.01)
    ours = fxnp.softmax_cross_entropy_with_logits(t, z, 1, z_loss=0.01, grad_loss=grad_loss)
    np.testing.assert_array_equal(_bits(ours[0]), _bits(loss))
    np.testing.assert_array_equal(_bits(ours[1]), _bits(grad))
