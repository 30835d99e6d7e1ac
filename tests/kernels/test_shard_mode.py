"""The kernels' vocabulary-parallel mode (core Options.total_classes; the CPU bindings'
total_classes/absent_label), shard by shard against a float64 NumPy reference of the
whole rows: each shard's (loss, lse) combined as docs/distributed.md says equals the whole
row's loss, and each shard's gradient, given the row's lse, equals its slice of the whole
row's gradient. Contiguous and strided (class axis not last) rows, few and many classes
(the paths that vectorize over rows do not take shards: rows one by one)."""

import numpy as np
import pytest

from fused_xent import _core

ABSENT = -7
IGNORED = -9  # the kernel's ignore_index: the user's may be a local class index of another shard


def _options(eps, lam):
    return float(np.float32(eps)), float(np.float32(lam))  # what the kernel sees


def _reference(z, y, eps, lam, ignore):
    """Loss and gradient of whole rows [N, C] (float64)."""
    n, c = z.shape
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    q = (1 - eps) * np.eye(c)[np.where(y == ignore, 0, y)] + eps / c
    loss = (q * (lse[:, None] - z)).sum(1) + lam * lse**2
    grad = np.exp(z - lse[:, None]) * (1 + 2 * lam * lse[:, None]) - q
    kept = (y != ignore)[:, None]
    return np.where(kept[:, 0], loss, 0.0), np.where(kept, grad, 0.0), lse


def _layout(z_rows, inner):
    """[N, C] rows as the kernel's [outer, C, inner] buffer (inner > 1: class axis not last)."""
    n, c = z_rows.shape
    return np.ascontiguousarray(z_rows.reshape(n // inner, inner, c).transpose(0, 2, 1)), n // inner


def _rows(buffer, inner):
    outer, c, _ = buffer.shape
    return buffer.transpose(0, 2, 1).reshape(outer * inner, c)


def _local_labels(y, begin, width, ignore):
    here = (y >= begin) & (y < begin + width)
    return np.where(y == ignore, IGNORED, np.where(here, y - begin, ABSENT)).astype(np.int64), here


def _sharded(z, y, eps, lam, shards, inner, ignore, lse_for_backward, total=None):
    """Loss and lse combined from each shard's forward, and the shards' gradients side by side."""
    n, classes = z.shape
    width = classes // shards
    parts, lses, target_shares, grads = [], [], [], []
    for s in range(shards):
        local, here = _local_labels(y, s * width, width, ignore)
        shard, outer = _layout(z[:, s * width : (s + 1) * width], inner)
        loss, lse = np.empty(n), np.empty(n)
        _core.sparse_forward(
            "float64", shard, local, outer, width, inner, eps, 0.0, IGNORED, None, loss, lse, total or classes, ABSENT
        )
        parts.append(loss)
        lses.append(lse)
        target_shares.append(np.where(here, 1 - eps, 0.0) + eps * width / classes)
        grad = np.empty_like(shard)
        _core.sparse_backward(
            "float64",
            shard,
            local,
            outer,
            width,
            inner,
            eps,
            lam,
            IGNORED,
            None,
            lse_for_backward,
            np.ones(n),
            grad,
            total or classes,
            ABSENT,
        )
        grads.append(_rows(grad, inner))
    lse = np.logaddexp.reduce(np.array(lses), axis=0)
    loss = sum(p + t * (lse - ls) for p, t, ls in zip(parts, target_shares, lses)) + lam * lse**2
    return np.where(y == ignore, 0.0, loss), lse, np.concatenate(grads, axis=1)


def _case(classes, inner, eps, lam, seed):
    eps, lam = _options(eps, lam)
    rng = np.random.default_rng(seed)
    z = 4 * rng.standard_normal((8, classes))
    y = rng.integers(0, classes, 8)
    y[5] = 2  # ignore_index below: an ignored row, and a class index of shard 0
    return z, y, eps, lam


@pytest.mark.parametrize("classes, shards", [(24, 3), (6, 2), (3000, 4)])
@pytest.mark.parametrize("inner", [1, 4])
@pytest.mark.parametrize("eps, lam", [(0.0, 0.0), (0.1, 1e-3)])
def test_shards_combine_to_the_whole_row(classes, shards, inner, eps, lam):
    z, y, eps, lam = _case(classes, inner, eps, lam, classes + inner)
    want_loss, want_grad, want_lse = _reference(z, y, eps, lam, 2)
    loss, lse, grad = _sharded(z, y, eps, lam, shards, inner, 2, want_lse)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-14)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-13)


def test_the_comparison_rejects_a_wrong_total():
    """With total_classes wrong (the shard's own count), shards claim the whole uniform target."""
    z, y, eps, lam = _case(24, 1, 0.1, 0.0, 0)
    want_loss, want_grad, want_lse = _reference(z, y, eps, lam, 2)
    loss, _, grad = _sharded(z, y, eps, lam, 3, 1, 2, want_lse, total=8)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-14)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-13)


def test_out_of_range_labels_name_the_whole_row():
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"label value of 9 .*\[0, 12\)"):
        _core.sparse_forward(
            "float64", z, np.array([1, 9]), 2, 4, 1, 0.0, 0.0, None, None, np.empty(2), np.empty(2), 12, ABSENT
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_classes=3, absent_label=-1), "at least the shard's classes"),
        (dict(total_classes=12, absent_label=2), "absent_label"),
    ],
)
def test_bad_shard_options(kwargs, message):
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match=message):
        _core.sparse_forward(
            "float64", z, np.array([1, 0]), 2, 4, 1, 0.0, 0.0, None, None, np.empty(2), np.empty(2), **kwargs
        )


def test_shards_take_no_class_weights():
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match="class_weights"):
        _core.sparse_forward(
            "float64",
            z,
            np.array([1, 0]),
            2,
            4,
            1,
            0.0,
            0.0,
            None,
            np.ones(4, np.float32),
            np.empty(2),
            np.empty(2),
            12,
            -1,
        )


# ---------------------------------------------------------------- dense labels


def _dense_reference(z, t, eps, lam):
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    q = (1 - eps) * t + eps / z.shape[1]
    loss = (q * (lse[:, None] - z)).sum(1) + lam * lse**2
    grad = np.exp(z - lse[:, None]) * (q.sum(1, keepdims=True) + 2 * lam * lse[:, None]) - q
    return loss, grad, lse


def _dense_sharded(z, t, eps, lam, shards, inner, lse_for_backward, sums_for_backward=None):
    """Each shard's forward (loss part, lse, label sums) combined as docs/distributed.md says, and
    the shards' gradients given the whole rows' lse and label sums."""
    n, classes = z.shape
    width = classes // shards
    parts, lses, sums, grads = [], [], [], []
    for s in range(shards):
        columns = slice(s * width, (s + 1) * width)
        shard, outer = _layout(z[:, columns], inner)
        labels, _ = _layout(t[:, columns], inner)
        loss, lse, label_sums = np.empty(n), np.empty(n), np.empty(n)
        _core.dense_forward(
            "float64",
            shard,
            labels,
            outer,
            width,
            inner,
            eps,
            0.0,
            loss,
            lse,
            total_classes=classes,
            label_sums=label_sums,
        )
        parts.append(loss)
        lses.append(lse)
        sums.append(label_sums)
    whole_sums = sum(sums) if sums_for_backward is None else sums_for_backward
    for s in range(shards):
        columns = slice(s * width, (s + 1) * width)
        shard, outer = _layout(z[:, columns], inner)
        labels, _ = _layout(t[:, columns], inner)
        grad = np.empty_like(shard)
        _core.dense_backward(
            "float64",
            shard,
            labels,
            outer,
            width,
            inner,
            eps,
            lam,
            lse_for_backward,
            np.ones(n),
            grad,
            total_classes=classes,
            label_sums=whole_sums,
        )
        grads.append(_rows(grad, inner))
    lse = np.logaddexp.reduce(np.array(lses), axis=0)
    shares = [(1 - eps) * ls + eps * width / classes for ls in sums]
    loss = sum(p + q * (lse - shard_lse) for p, q, shard_lse in zip(parts, shares, lses)) + lam * lse**2
    return loss, lse, np.concatenate(grads, axis=1), sums


def _dense_case(classes, eps, lam, seed):
    eps, lam = _options(eps, lam)
    rng = np.random.default_rng(seed)
    z = 4 * rng.standard_normal((8, classes))
    t = rng.dirichlet(np.ones(classes), 8) * rng.uniform(0.5, 1.5, (8, 1))  # rows need not sum to 1
    return z, t, eps, lam


@pytest.mark.parametrize("classes, shards", [(24, 3), (6, 2), (3000, 4)])
@pytest.mark.parametrize("inner", [1, 4])
@pytest.mark.parametrize("eps, lam", [(0.0, 0.0), (0.1, 1e-3)])
def test_dense_shards_combine_to_the_whole_row(classes, shards, inner, eps, lam):
    z, t, eps, lam = _dense_case(classes, eps, lam, classes + inner)
    want_loss, want_grad, want_lse = _dense_reference(z, t, eps, lam)
    loss, lse, grad, sums = _dense_sharded(z, t, eps, lam, shards, inner, want_lse)
    width = classes // shards
    np.testing.assert_allclose(sums, [t[:, s * width : (s + 1) * width].sum(1) for s in range(shards)], rtol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-14)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-13)


def test_dense_comparison_rejects_shard_label_sums():
    """The backward given a shard's own label sums instead of the whole rows' is wrong."""
    z, t, eps, lam = _dense_case(24, 0.1, 1e-3, 1)
    _, want_grad, want_lse = _dense_reference(z, t, eps, lam)
    width = 8
    own = t[:, :width].sum(1)
    _, _, grad, _ = _dense_sharded(z, t, eps, lam, 3, 1, want_lse, sums_for_backward=own)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "call, kwargs, message",
    [
        ("dense_forward", dict(total_classes=3), "at least the shard's classes"),
        ("dense_forward", dict(label_sums=np.empty(2)), "label_sums is for a vocabulary-parallel call"),
        ("dense_backward", dict(total_classes=12), "needs label_sums"),
        ("dense_backward", dict(total_classes=12, label_sums=np.empty(3)), "label_sums has 3 elements"),
    ],
)
def test_bad_dense_shard_options(call, kwargs, message):
    z = np.zeros((2, 4))
    buffers = (np.empty(2), np.empty(2)) if call == "dense_forward" else (np.zeros(2), np.ones(2), np.empty((2, 4)))
    with pytest.raises(ValueError, match=message):
        getattr(_core, call)("float64", z, np.zeros((2, 4)), 2, 4, 1, 0.0, 0.0, *buffers, **kwargs)
