"""Norms whose statistics come from the batch: BN (with ghost sub-batches), recurrent BN, batch renorm.

Ghost batch norm (Hoffer et al. 2017; the normalization batch of Wu & Johnson 2021): with
``norm_batch_size`` set to NBS below the SGD batch B, a training forward normalizes each run of
NBS consecutive samples with that run's own statistics (the arithmetic is in `ghost`: through
normbench's C kernel where it is built; else a few PyTorch kernels for flat features, and the
sub-batches stacked into channels for one batch-norm kernel for spatial ones). The running averages get one
update per sub-batch, in order, as a BN trained at batch NBS would: with momentum m and K = B/NBS
sub-batches, ``r <- (1 - m)^K r + sum_k m (1 - m)^(K-1-k) stat_k``; the cumulative average
(momentum null) counts K batches. With NBS equal to B (or null) the plain BatchNorm forward runs,
unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.ghost import ghost_norm, update_factors
from normbench.norms.spec import FLAT, SPATIAL, NormOptions, norm


class GhostBatchNorm:
    """Mixin for BatchNorm1d/2d: statistics over sub-batches of `norm_batch_size` while training.

    `norm_batch_size` is set by `norm_batches` around the training loop; None is the plain forward.
    """

    norm_batch_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.norm_batch_size
        if group is None or group == x.shape[0] or not self.training:
            return super().forward(x)
        running = None
        if self.track_running_stats:
            k = x.shape[0] // group
            self.num_batches_tracked.add_(k)
            running = self.running_mean, self.running_var, update_factors(self.momentum, self.num_batches_tracked, k)
        return ghost_norm(x, group, self.weight, self.bias, self.eps, running)


class BatchNorm1d(GhostBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d that can take its training statistics over ghost sub-batches."""


class BatchNorm2d(GhostBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d that can take its training statistics over ghost sub-batches."""


@contextmanager
def norm_batches(model: nn.Module, size: int | None):
    """Within it, every batch norm of `model` takes training statistics over sub-batches of `size`."""
    layers = [m for m in model.modules() if hasattr(m, "norm_batch_size")]
    if size is None:  # nothing to set: zero cost when off
        yield
        return
    for m in layers:
        m.norm_batch_size = size
    try:
        yield
    finally:
        for m in layers:
            del m.norm_batch_size  # back to the class's None


class RecurrentBatchNorm(nn.Module):
    """Batch norm inside a recurrent cell (Cooijmans et al. 2016).

    Each time step t normalizes with the statistics of its own batch in training.
    With ``shared=False`` every step keeps its own running averages (rows of
    ``running_mean``/``running_var``, shape ``(steps, C)``); steps past the last row
    reuse it. With ``shared=True`` one set of running averages is updated at every step,
    as a single BatchNorm1d reused over time would be. With `norm_batch_size` set, each
    step's statistics are taken per ghost sub-batch, and each row is updated once per sub-batch
    (shared: step by step, each step's sub-batches in order).
    """

    norm_batch_size: int | None = None

    def __init__(self, num_features: int, steps: int, eps: float, momentum: float | None,
                 track_running_stats: bool, shared: bool, gamma_init: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats, self.shared = track_running_stats, shared
        rows = 1 if shared else steps
        self.weight = nn.Parameter(torch.full((num_features,), gamma_init))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(rows, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _factor(self, row: int) -> float:
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked[row])  # cumulative average, as in BatchNorm

    def _norm(self, x: torch.Tensor, rows: slice, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        group = self.norm_batch_size
        if group is not None and group != x.shape[0] and self.training:
            return self._ghost(x, rows, weight, bias, group)
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked[rows] += 1
        # Rows are contiguous, so the flattened view shares storage and is updated in place.
        mean = self.running_mean[rows].reshape(-1) if self.track_running_stats else None
        var = self.running_var[rows].reshape(-1) if self.track_running_stats else None
        factor = self._factor(rows.start) if update else 0.0
        return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, self.eps)

    def _ghost(self, x: torch.Tensor, rows: slice, weight: torch.Tensor, bias: torch.Tensor,
               group: int) -> torch.Tensor:
        """`_norm` in training with statistics per sub-batch of `group` samples: x (N, rows * C)."""
        running = None
        if self.track_running_stats:
            k = x.shape[0] // group
            self.num_batches_tracked[rows] += k
            # per row the same sequence of K updates: flatten rows into features
            running = (self.running_mean[rows].view(-1), self.running_var[rows].view(-1),
                       update_factors(self.momentum, self.num_batches_tracked[rows.start], k))
        return ghost_norm(x, group, weight, bias, self.eps, running)

    def row(self, t: int) -> int:
        """The row of running averages step `t` uses."""
        return 0 if self.shared else min(t, self.running_mean.shape[0] - 1)

    def _step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        row = self.row(t)
        return self._norm(x, slice(row, row + 1), self.weight, self.bias)

    def forward(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        if x.dim() == 2:  # one step, (N, C)
            return self._step(x, t)
        steps, n, c = x.shape  # a whole sequence, (T, N, C)
        if self.shared or steps > self.running_mean.shape[0]:
            # _step, not self(...): hooks on this module see the call once, with the whole sequence
            return torch.stack([self._step(x[s], s) for s in range(steps)])
        # Per-step statistics for all steps in one call: treat (T, C) as T*C features.
        flat = x.transpose(0, 1).reshape(n, steps * c)
        out = self._norm(flat, slice(0, steps), self.weight.repeat(steps), self.bias.repeat(steps))
        return out.view(n, steps, c).transpose(0, 1)

    def extra_repr(self) -> str:
        rows = "shared" if self.shared else f"steps={self.running_mean.shape[0]}"
        return f"{self.num_features}, {rows}, eps={self.eps}, momentum={self.momentum}"


def batch_moments(bn: nn.Module, x: torch.Tensor, t: int | None = None
                  ) -> tuple[tuple[int, ...], int, torch.Tensor, torch.Tensor]:
    """The statistics a train-mode forward of batch norm `bn` on `x` normalizes with.

    Returns ``(rows, n, mean, var)``: `mean` and the biased `var`, each ``(K, C)``, are taken
    over `n` values each; `rows` (K ints) says which row of ``running_mean.view(-1, C)`` each
    belongs to. A recurrent BN called on a whole sequence ``(T, N, C)`` gives one statistic per
    step, so rows repeat when steps share running averages.
    """
    if isinstance(bn, RecurrentBatchNorm):
        if x.dim() == 2:  # one step, (N, C)
            var, mean = torch.var_mean(x, dim=0, correction=0)
            return (bn.row(t),), x.shape[0], mean[None], var[None]
        var, mean = torch.var_mean(x, dim=1, correction=0)  # (T, C): each step over the batch
        return tuple(bn.row(s) for s in range(x.shape[0])), x.shape[1], mean, var
    flat = x.transpose(0, 1).flatten(1)  # (C, N * positions)
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    return (0,), flat.shape[1], mean[None], var[None]


@norm("bn")
def _bn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Batch norm: statistics over the batch (and H x W), or over ghost sub-batches; running averages at eval."""
    args = dict(eps=opts.eps, momentum=opts.momentum, track_running_stats=opts.track_running_stats)
    if kind == FLAT:
        return BatchNorm1d(c, **args)
    if kind == SPATIAL:
        return BatchNorm2d(c, **args)
    return RecurrentBatchNorm(c, steps or 1, shared=opts.recurrent_stats == "shared", **args)
