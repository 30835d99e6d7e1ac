"""The fused ops on DTensors (``torch.distributed.tensor``): rules for the four custom ops.

Importing this module registers, with ``torch.library.register_torch_dispatch``, what each of
``fused_xent::{sparse,dense}_{forward,backward}`` does when DTensors reach it. The public
functions and their autograd Functions are unchanged: they call the ops, DTensor's dispatch
hands the call to the rule below, and the rule returns DTensors. The strategy API
(``register_sharding``) could express the row case only; the class case needs collectives
between the kernel calls, the same reason PyTorch's own ``loss_parallel`` uses handlers.

Placements, for logits sharded or replicated on each mesh dimension (Partial: reduced first):

* Rows: ``Shard(d)`` on a dimension d that is not the class axis. Every op is row-wise, so it
  runs on each shard's rows with no communication. The loss and lse are sharded on the
  matching dimension of the row shape, the gradient has the logits' placements; labels and the
  loss's gradient are moved to the row placements (a local slice when they are replicated).
* Classes, sparse labels: ``Shard(axis)`` runs vocabulary-parallel (the Megatron layout, as
  fused_xent.jax does, docs/distributed.md). Each rank's kernel, in shard mode, returns its
  classes' logsumexp lse_s and its part L_s of the loss; the row's values come from two
  all-reduces of row-sized tensors over the class mesh dimensions (a max, then one sum of two
  values per row). The backward, given the row's lse, is local. CPU only: the CUDA bindings
  have no shard mode (NotImplementedError).
* Classes, dense labels: vocabulary-parallel too. Each rank's kernel also returns its
  classes' sum of the labels, and Q_s, the row's target share on the shard, is (1 - eps) times
  it plus eps C_s / C; the row's values come from a max and one sum of three values per row.
  The backward reads the whole rows' label sums (one more row-sized all-reduce).

A softcap (cap tanh(z / cap), elementwise) is applied by each shard's kernels to its own
logits, so the combine math above is the same with or without one.

Plain tensors passed with DTensor logits (labels, class weights, the loss's gradient) are
taken as whole tensors, the same on every rank. A label outside ``[0, C)`` that is not
``ignore_index`` raises the same ``ValueError`` on every rank: where labels are sharded, the
ranks first exchange one (found, value) pair each, so that no rank goes on to a collective the
others never reach.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from fused_xent import _checks, _core
from fused_xent.torch import _ops

# ---------------------------------------------------------------- placements


def _contiguous_stride(shape):
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _wrap(local, mesh, placements, shape):
    """A DTensor of global `shape` from this rank's piece (shape given: shards may be uneven)."""
    shape = tuple(shape)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=_contiguous_stride(shape))


def _on_mesh(tensor, mesh):
    """`tensor` as a DTensor on `mesh`: a plain tensor is the whole tensor, replicated."""
    if isinstance(tensor, DTensor):
        if tensor.device_mesh != mesh:
            raise ValueError("fused_xent.torch: the DTensor arguments must share the logits' device mesh")
        return tensor
    return DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _whole(tensor):
    """The whole of a small tensor (class weights) on every rank."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _no_partial(placements):
    """Partial sums are reduced before the kernels, which need the values."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def _refuse_unknown(placements):
    for placement in placements:
        if not (type(placement) is Shard or placement.is_replicate() or placement.is_partial()):
            raise NotImplementedError(f"fused_xent.torch: DTensor placement {placement} is not supported")


def _chunk(size, parts, index):
    """(offset, length) of chunk `index` when Shard splits `size` into `parts` (torch.chunk)."""
    step = math.ceil(size / parts) if size else 0
    begin = min(index * step, size)
    return begin, min(begin + step, size) - begin


class _Layout:
    """How a call's logits lie on the mesh, and what that asks of its row-shaped tensors."""

    def __init__(self, mesh, placements, shape, axis):
        self.mesh = mesh
        self.axis = axis
        self.shape = tuple(shape)
        self.placements = tuple(placements)
        self.class_dims = tuple(i for i, p in enumerate(self.placements) if p.is_shard(axis))
        self.rows = tuple(self._row_placement(p) for p in self.placements)
        self.row_shape = self.shape[:axis] + self.shape[axis + 1 :]

    @classmethod
    def of(cls, logits, axis):
        _refuse_unknown(logits.placements)
        return cls(logits.device_mesh, _no_partial(logits.placements), logits.shape, axis)

    def _row_placement(self, placement):
        if placement.is_shard() and placement.dim != self.axis:
            return Shard(placement.dim - (placement.dim > self.axis))  # the row shape lacks the class axis
        return Replicate()

    def local(self, tensor):
        """This rank's piece of a logits-shaped tensor, moved to this layout."""
        return _on_mesh(tensor, self.mesh).redistribute(self.mesh, self.placements).to_local()

    def local_rows(self, tensor):
        """This rank's rows of a row-shaped tensor (labels, lse, the loss's gradient)."""
        return _on_mesh(tensor, self.mesh).redistribute(self.mesh, self.rows).to_local()

    def wrap_rows(self, local):
        return _wrap(local, self.mesh, self.rows, self.row_shape)

    def wrap(self, local):
        return _wrap(local, self.mesh, self.placements, self.shape)

    def class_range(self):
        """(offset, width) of this rank's classes, splitting along the class mesh dimensions in order."""
        coordinate = self.mesh.get_coordinate()
        offset, width = 0, self.shape[self.axis]
        for dim in self.class_dims:
            begin, width = _chunk(width, self.mesh.size(dim), coordinate[dim])
            offset += begin
        return offset, width

    def class_groups(self):
        return [self.mesh.get_group(dim) for dim in self.class_dims]


def _arguments(op, args, kwargs):
    """The op's arguments in schema order, however they were passed (an argument left out: its
    schema default, as for the softcap)."""
    schema = op._schema.arguments
    rest = schema[len(args) :]
    return list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value for a in rest]


# ---------------------------------------------------------------- labels


def _first_found(report, group):
    """The first (found, value) pair among the group's ranks that found one, on every rank."""
    reports = [torch.empty_like(report) for _ in range(dist.get_world_size(group))]
    dist.all_gather(reports, report, group=group)
    return next((r for r in reports if r[0]), report)


def _check_labels(labels, classes, ignore_index):
    """Raises the same ValueError on every rank if any rank holds a label outside [0, classes)
    that is not ignore_index (the kernels would raise on that rank only)."""
    local = labels.to_local()
    bad = (local < 0) | (local >= classes)
    if ignore_index is not None:
        bad &= local != ignore_index
    values = local[bad]
    report = torch.tensor([1, int(values[0])] if values.numel() else [0, 0], device=local.device)
    for dim, placement in enumerate(labels.placements):
        if not placement.is_replicate():  # ranks along a replicated dimension saw the same labels
            report = _first_found(report, labels.device_mesh.get_group(dim))
    if report[0]:
        raise _checks.bad_label_error(int(report[1]), classes, ignore_index)


def _sparse_labels(labels, layout, ignore_index):
    labels = _on_mesh(labels, layout.mesh)
    labels = labels.redistribute(labels.device_mesh, _no_partial(labels.placements))
    _check_labels(labels, layout.shape[layout.axis], ignore_index)
    return layout.local_rows(labels)


# ---------------------------------------------------------------- vocabulary-parallel (sparse, classes sharded)


def _sentinels(dtype):
    """(ignored, absent): the kernel's ignore_index and absent_label. Negative, so never a local
    class; a user's label equal to either is out of range and refused before the kernel."""
    lowest = torch.iinfo(dtype).min
    return lowest, lowest + 1


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ShardRows:
    """What one class shard knows of its rows' (valid) labels."""

    def __init__(self, labels, ignore_index, offset, width):
        self.labels = labels
        self.ignored = (
            labels == ignore_index if ignore_index is not None else torch.zeros_like(labels, dtype=torch.bool)
        )
        self.here = ~self.ignored & (labels >= offset) & (labels < offset + width)
        ignored_value, absent_value = _sentinels(labels.dtype)
        local = torch.where(self.here, labels - offset, absent_value)
        self.local = torch.where(self.ignored, ignored_value, local).contiguous()

    def weights(self, class_weights, dtype):
        """The row weights the unsharded kernel applies: class_weights[label], or 1."""
        if class_weights is None:
            return torch.ones(self.labels.shape, dtype=dtype, device=self.labels.device)
        safe = torch.where(self.ignored, 0, self.labels).long()
        return class_weights.to(device=self.labels.device, dtype=dtype)[safe]

    def target_share(self, eps, width, classes):
        """Q_s: the share of the row's (smoothed) target on this shard's classes."""
        return self.here.to(torch.float64) * (1.0 - eps) + eps * width / classes


def _refuse_cuda(logits):
    if logits.is_cuda:
        raise NotImplementedError(
            "fused_xent.torch: logits sharded on the class axis need the kernels' shard mode, which the CUDA "
            "bindings lack; shard CUDA logits on rows (Shard on another dimension), or replicate the class axis"
        )


def _shard_kernel_call(logits, rows, axis, eps, lam, cap, classes):
    layout = _checks.layout(tuple(logits.shape), axis)
    ignored_value, absent_value = _sentinels(rows.local.dtype)
    call = _ops._host_call(logits, rows.local, layout, eps, lam, cap)
    return layout[3], dict(
        call, ignore_index=ignored_value, class_weights=None, total_classes=classes, absent_label=absent_value
    )


def _shard_forward(logits, rows, axis, eps, cap, classes):
    """(L_s, lse_s) of this shard's classes; z-loss is of the row's lse, added once after."""
    if logits.shape[axis] == 0:  # an empty shard (fewer classes than shards): no mass, no target
        reduced = _ops._reduced(logits.shape, axis)
        return torch.zeros(reduced, dtype=logits.dtype), torch.full(reduced, -math.inf, dtype=torch.float64)
    logits = logits.contiguous()
    reduced, call = _shard_kernel_call(logits, rows, axis, eps, 0.0, cap, classes)
    part, lse = torch.empty(reduced, dtype=logits.dtype), torch.empty(reduced, dtype=torch.float64)
    _core.sparse_forward(**call, loss=_ops._host(part), lse=_ops._host(lse))
    return part, lse


def _all_reduce(tensor, op, groups):
    for group in groups:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _combine(part, shard_lse, share, groups, shares_sum_to_one=True):
    """(lse, loss before weights and z-loss) of whole rows from every shard's (L_s, lse_s, Q_s):

        lse  = log(sum_s exp(lse_s))
        loss = sum_s (L_s + Q_s (lse - lse_s))

    The parts are first moved to the common base M = max_s lse_s, so that one sum carries both
    sums; moving all of them from M to lse then adds (sum_s Q_s)(lse - M). That sum is 1 for a
    kept row with sparse labels; dense labels need not sum to 1, so it is summed too."""
    top = _all_reduce(shard_lse.clone(), dist.ReduceOp.MAX, groups)
    finite = torch.isfinite(top)
    base = torch.where(finite, top, 0.0)
    # a shard with no target share adds nothing, even where its lse_s is -inf (Q_s * inf, and
    # the kernel's L_s is NaN where the shard's logits of the row are all -inf: a masked block)
    moved = torch.where(share > 0, share * (base - shard_lse), 0.0)
    part = torch.where((share == 0) & (shard_lse == -math.inf), 0.0, part.to(torch.float64))
    columns = [torch.exp(shard_lse - base), part + moved]
    if not shares_sum_to_one:
        columns.append(share.to(torch.float64))
    sums = _all_reduce(torch.stack(columns, dim=-1), dist.ReduceOp.SUM, groups)
    lse = torch.where(finite, base + torch.log(sums[..., 0]), top)
    total_share = 1.0 if shares_sum_to_one else sums[..., 2]
    return lse, sums[..., 1] + torch.where(finite, total_share * (lse - base), 0.0)


def _vocab_parallel_forward(logits, labels, weights, layout, eps, lam, ignore_index, cap):
    _refuse_cuda(logits)
    offset, width = layout.class_range()
    classes = layout.shape[layout.axis]
    rows = _ShardRows(labels, ignore_index, offset, width)
    part, shard_lse = _shard_forward(logits, rows, layout.axis, eps, cap, classes)
    lse, loss = _combine(part, shard_lse, rows.target_share(eps, width, classes), layout.class_groups())
    loss = rows.weights(weights, torch.float64) * (loss + lam * lse * lse)
    return torch.where(rows.ignored, 0.0, loss).to(logits.dtype), lse


def _vocab_parallel_backward(logits, labels, weights, lse, grad_loss, layout, eps, lam, ignore_index, cap):
    """This shard's gradient given the rows' lse: the kernel with the whole row's eps / C and the
    target only where it lies on this shard; no communication."""
    _refuse_cuda(logits)
    offset, width = layout.class_range()
    if width == 0:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    rows = _ShardRows(labels, ignore_index, offset, width)
    logits = logits.contiguous()
    reduced, call = _shard_kernel_call(logits, rows, layout.axis, eps, lam, cap, layout.shape[layout.axis])
    acc = _acc(logits.dtype)
    scaled = (grad_loss.to(acc) * rows.weights(weights, acc)).to(logits.dtype).expand(reduced).contiguous()
    grad = _ops._empty(tuple(logits.shape), logits.dtype)
    _core.sparse_backward(
        **call, lse=_ops._host(lse.contiguous()), grad_loss=_ops._host(scaled), grad_logits=_ops._host(grad)
    )
    return grad


# ---------------------------------------------------------------- vocabulary-parallel (dense, classes sharded)


def _dense_shard_call(logits, labels, axis, eps, lam, cap, classes):
    layout = _checks.layout(tuple(logits.shape), axis)
    return layout[3], dict(_ops._host_call(logits, labels, layout, eps, lam, cap), total_classes=classes)


def _dense_vocab_parallel_forward(logits, labels, layout, eps, lam, cap):
    """(loss, lse) of whole rows: each shard's kernel gives L_s, lse_s and its label sums, and
    Q_s = (1 - eps) sum_s t + eps C_s / C moves L_s to the row's lse (three row-sized sums)."""
    _refuse_cuda(logits)
    offset, width = layout.class_range()
    classes = layout.shape[layout.axis]
    reduced = _ops._reduced(logits.shape, layout.axis)
    part, shard_lse = torch.zeros(reduced, dtype=logits.dtype), torch.full(reduced, -math.inf, dtype=torch.float64)
    label_sums = torch.zeros(reduced, dtype=torch.float64)
    if width:  # an empty shard (fewer classes than shards) has no mass and no target
        logits = logits.contiguous()
        labels = _ops._dense_labels(logits, labels)
        reduced, call = _dense_shard_call(logits, labels, layout.axis, eps, 0.0, cap, classes)
        _core.dense_forward(**call, loss=_ops._host(part), lse=_ops._host(shard_lse), label_sums=_ops._host(label_sums))
    share = (1.0 - eps) * label_sums + eps * width / classes
    lse, loss = _combine(part, shard_lse, share, layout.class_groups(), shares_sum_to_one=False)
    return (loss + lam * lse * lse).to(logits.dtype), lse


def _dense_vocab_parallel_backward(logits, labels, lse, grad_loss, layout, eps, lam, cap):
    """This shard's gradient given the rows' lse and label sums (one row-sized all-reduce)."""
    _refuse_cuda(logits)
    logits = logits.contiguous()
    labels = _ops._dense_labels(logits, labels)
    # every shard joins the all-reduce, an empty one (fewer classes than shards) with zeros
    label_sums = _all_reduce(labels.sum(layout.axis, dtype=torch.float64), dist.ReduceOp.SUM, layout.class_groups())
    if logits.shape[layout.axis] == 0:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    reduced, call = _dense_shard_call(logits, labels, layout.axis, eps, lam, cap, layout.shape[layout.axis])
    grad = _ops._empty(tuple(logits.shape), logits.dtype)
    _core.dense_backward(
        **call,
        lse=_ops._host(lse.contiguous()),
        grad_loss=_ops._host_grad_loss(grad_loss, logits, reduced),
        grad_logits=_ops._host(grad),
        label_sums=_ops._host(label_sums.contiguous()),
    )
    return grad


# ---------------------------------------------------------------- the rules


def _sparse_forward_rule(cls, op, types, args, kwargs):
    logits, labels, weights, axis, eps, lam, ignore_index, cap = _arguments(op, args, kwargs)
    layout = _Layout.of(logits, axis)
    labels = _sparse_labels(labels, layout, ignore_index)
    z, weights = layout.local(logits), _whole(weights)
    if layout.class_dims:
        loss, lse = _vocab_parallel_forward(z, labels, weights, layout, eps, lam, ignore_index, cap)
    else:
        loss, lse = _ops._sparse_forward_kernel(z, labels, weights, axis, eps, lam, ignore_index, cap)
    return layout.wrap_rows(loss), layout.wrap_rows(lse)


def _sparse_backward_rule(cls, op, types, args, kwargs):
    logits, labels, weights, lse, grad_loss, axis, eps, lam, ignore_index, cap = _arguments(op, args, kwargs)
    layout = _Layout.of(logits, axis)
    z, weights = layout.local(logits), _whole(weights)
    labels, lse, grad_loss = (layout.local_rows(t) for t in (labels, lse, grad_loss))
    if layout.class_dims:
        grad = _vocab_parallel_backward(z, labels, weights, lse, grad_loss, layout, eps, lam, ignore_index, cap)
    else:
        grad = _ops._sparse_backward_kernel(z, labels, weights, lse, grad_loss, axis, eps, lam, ignore_index, cap)
    return layout.wrap(grad)


def _dense_forward_rule(cls, op, types, args, kwargs):
    logits, labels, axis, eps, lam, cap = _arguments(op, args, kwargs)
    layout = _Layout.of(logits, axis)
    z, t = layout.local(logits), layout.local(labels)
    if layout.class_dims:
        loss, lse = _dense_vocab_parallel_forward(z, t, layout, eps, lam, cap)
    else:
        loss, lse = _ops._dense_forward_kernel(z, t, axis, eps, lam, cap)
    return layout.wrap_rows(loss), layout.wrap_rows(lse)


def _dense_backward_rule(cls, op, types, args, kwargs):
    logits, labels, lse, grad_loss, axis, eps, lam, cap = _arguments(op, args, kwargs)
    layout = _Layout.of(logits, axis)
    z, t = layout.local(logits), layout.local(labels)
    lse, grad_loss = layout.local_rows(lse), layout.local_rows(grad_loss)
    if layout.class_dims:
        grad = _dense_vocab_parallel_backward(z, t, lse, grad_loss, layout, eps, lam, cap)
    else:
        grad = _ops._dense_backward_kernel(z, t, lse, grad_loss, axis, eps, lam, cap)
    return layout.wrap(grad)


def _register():
    rules = {
        _ops.sparse_forward: _sparse_forward_rule,
        _ops._sparse_backward: _sparse_backward_rule,
        _ops.dense_forward: _dense_forward_rule,
        _ops._dense_backward: _dense_backward_rule,
    }
    for op, rule in rules.items():
        torch.library.register_torch_dispatch(op, DTensor, rule)


_register()
