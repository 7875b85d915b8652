"""Functional twins of the norms inside a recurrent cell, for the hand-written recurrences.

A twin does what the cell's norm module does at one step, on tensors the recurrence owns:
`forward(a, weight, bias, t)` gives ``weight * normalize(a) + bias`` and keeps what the backward
pass needs; `backward(dy, weight, t)` gives the gradient wrt `a`; `param_grads(dys)` the affine's
gradients summed over the steps, where `dys` (T, N, C) holds every step's `dy`. The input `a` of each
step must stay unchanged until the backward pass (the recurrences keep them in buffers of their
own). No `out=` variants of the norm kernels: on CPU they compute into new tensors and copy, which
costs more than the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms import GroupNorm, RecurrentBatchNorm, StepNorm

_aten = torch.ops.aten
_ALL = [True, True, True]


def _summed(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-step (d weight, d bias) pairs summed over the steps; empties `grads`, so that a second backward
    pass through the same graph (retain_graph, or autograd.grad twice) starts from none."""
    summed = [torch.stack(g).sum(0) for g in zip(*grads)]
    grads.clear()
    return summed


class LayerStats:
    """LN over the features of each sample: `StepNorm(nn.LayerNorm)`'s twin."""

    def __init__(self, eps: float, steps: int, like: torch.Tensor):
        self.eps, self.saved, self.grads = eps, [], []

    def forward(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, t: int) -> torch.Tensor:
        y, mean, rstd = torch.native_layer_norm(a, a.shape[1:], weight, bias, self.eps)
        self.saved.append((a, mean, rstd, bias))
        return y

    def backward(self, dy: torch.Tensor, weight: torch.Tensor, t: int) -> torch.Tensor:
        a, mean, rstd, bias = self.saved[t]
        da, dw, db = _aten.native_layer_norm_backward(dy, a, a.shape[1:], mean, rstd, weight, bias, _ALL)
        self.grads.append((dw, db))
        return da

    def param_grads(self, dys: torch.Tensor) -> list[torch.Tensor]:
        return _summed(self.grads)


class GroupStats:
    """GN over consecutive features of each sample: `StepNorm(GroupNorm)`'s twin. Each group is a row
    of a layer norm (PyTorch's group-norm kernel is slow at H x W = 1); the normalized values of
    every step stay in one buffer, so the affine's gradients are two reductions over all steps."""

    def __init__(self, groups: int, eps: float, steps: int, like: torch.Tensor):
        self.groups, self.eps, self.saved = groups, eps, []
        self.ahat = like.new_empty(steps, *like.shape[1:])  # (T, N, C)

    def forward(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, t: int) -> torch.Tensor:
        rows = a.view(-1, a.shape[1] // self.groups)  # (N * G, C / G)
        ahat, mean, rstd = torch.native_layer_norm(rows, rows.shape[1:], None, None, self.eps)
        ahat = self.ahat[t].copy_(ahat.view_as(a))
        self.saved.append((rows, mean, rstd))
        return torch.addcmul(bias, ahat, weight)

    def backward(self, dy: torch.Tensor, weight: torch.Tensor, t: int) -> torch.Tensor:
        rows, mean, rstd = self.saved[t]
        return _aten.native_layer_norm_backward((dy * weight).view_as(rows), rows, rows.shape[1:], mean, rstd, None,
                                                None, [True, False, False])[0].view_as(dy)

    def param_grads(self, dys: torch.Tensor) -> list[torch.Tensor]:
        return [(dys * self.ahat).sum((0, 1)), dys.sum((0, 1))]


class BatchStats:
    """Recurrent BN as RecurrentBatchNorm computes it: step t normalizes with its batch statistics
    (training, or no running averages) or with row `bn.row(t)` of the running averages, and in
    training updates that row. Counts every step in num_batches_tracked at once."""

    def __init__(self, bn: RecurrentBatchNorm, steps: int, like: torch.Tensor):
        self.bn, self.eps, self.saved, self.grads = bn, bn.eps, [], []
        self.batch = bn.training or not bn.track_running_stats
        self.rows = [bn.row(t) for t in range(steps)]
        self.factors = [0.0] * steps
        if bn.training and bn.track_running_stats:
            self.factors = self._count()

    def _count(self) -> list[float]:
        """Add every step's batch to num_batches_tracked; return the momentum of each step's update
        (with momentum None, 1 / the row's count so far: a cumulative average)."""
        bn = self.bn
        tracked = bn.num_batches_tracked
        added = torch.tensor([self.rows.count(r) for r in range(len(tracked))], device=tracked.device)
        if bn.momentum is not None:
            tracked += added
            return [bn.momentum] * len(self.rows)
        counts, factors = tracked.tolist(), []
        for row in self.rows:
            counts[row] += 1
            factors.append(1.0 / counts[row])
        tracked += added
        return factors

    def forward(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, t: int) -> torch.Tensor:
        bn, row = self.bn, self.rows[t]
        mean = bn.running_mean[row] if bn.track_running_stats else None  # a view: updated in place
        var = bn.running_var[row] if bn.track_running_stats else None
        y, save_mean, save_invstd = torch.native_batch_norm(a, weight, bias, mean, var, self.batch,
                                                            self.factors[t], self.eps)
        self.saved.append((a, mean, var, save_mean, save_invstd))
        return y

    def backward(self, dy: torch.Tensor, weight: torch.Tensor, t: int) -> torch.Tensor:
        a, mean, var, save_mean, save_invstd = self.saved[t]
        da, dw, db = _aten.native_batch_norm_backward(dy, a, weight, mean, var, save_mean, save_invstd, self.batch,
                                                      self.eps, _ALL)
        self.grads.append((dw, db))
        return da

    def param_grads(self, dys: torch.Tensor) -> list[torch.Tensor]:
        return _summed(self.grads)


def twin(norm: nn.Module, like: torch.Tensor) -> tuple[LayerStats | GroupStats | BatchStats, torch.Tensor,
                                                       torch.Tensor]:
    """(functional twin, gamma, beta) of a cell norm that `twin_known` accepts; `like` (T, N, C) gives
    the steps, features, dtype and device of its input."""
    steps = like.shape[0]
    if isinstance(norm, RecurrentBatchNorm):
        return BatchStats(norm, steps, like), norm.weight, norm.bias
    inner = norm.norm
    if isinstance(inner, nn.LayerNorm):
        return LayerStats(inner.eps, steps, like), inner.weight, inner.bias
    return GroupStats(inner.num_groups, inner.eps, steps, like), inner.weight, inner.bias


def twin_known(norm: nn.Module, batch: int) -> bool:
    """Whether `twin` can stand in for this norm at this batch size."""
    if isinstance(norm, RecurrentBatchNorm):  # ghost sub-batches take the step loop
        return not (norm.training and norm.norm_batch_size not in (None, batch))
    inner = norm.norm if isinstance(norm, StepNorm) else None
    if isinstance(inner, nn.LayerNorm):
        return len(inner.normalized_shape) == 1 and inner.weight is not None and inner.bias is not None
    return isinstance(inner, (GroupNorm, nn.GroupNorm)) and inner.weight is not None
