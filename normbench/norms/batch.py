"""Norms whose statistics come from the batch: BN (with ghost sub-batches), recurrent BN, batch renorm.

Ghost batch norm (Hoffer et al. 2017; the normalization batch of Wu & Johnson 2021): with
``norm_batch_size`` set to NBS below the SGD batch B, a training forward normalizes each run of
NBS consecutive samples with that run's own statistics. The batch is reshaped once so that the
B/NBS sub-batches become separate channels, ``(B, C, ...) -> (NBS, B/NBS * C, ...)``, and one
fused batch-norm kernel normalizes them all. The running averages get one update per sub-batch,
in order, as a BN trained at batch NBS would: with momentum m and K = B/NBS sub-batches,
``r <- (1 - m)^K r + sum_k m (1 - m)^(K-1-k) stat_k``; the cumulative average (momentum null)
counts K batches. With NBS equal to B (or null) the plain BatchNorm forward runs, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.spec import FLAT, SPATIAL, NormOptions, norm


@lru_cache(maxsize=64)
def _momentum_weights(momentum: float, k: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(weight of the old value, weights of the K new values) after K updates at one momentum."""
    factors = [momentum] * k
    return _weights(factors, device, dtype)


def _weights(factors: Sequence[float], device: torch.device, dtype: torch.dtype) -> tuple:
    keep, new = 1.0, []
    for f in reversed(factors):  # a value's weight: its factor times what every later update keeps
        new.append(f * keep)
        keep *= 1.0 - f
    return keep, torch.tensor(new[::-1], device=device, dtype=dtype)


def sequential_update(buffer: torch.Tensor, values: torch.Tensor, factors: Sequence[float] | float) -> None:
    """`buffer` (C,) after ``buffer = (1 - f) buffer + f value`` for each row of `values` (K, C) in order."""
    k = values.shape[0]
    if isinstance(factors, float):
        keep, new = _momentum_weights(factors, k, values.device, values.dtype)
    else:
        keep, new = _weights(factors, values.device, values.dtype)
    buffer.addmv_(values.t().to(buffer.dtype), new.to(buffer.dtype), beta=keep)  # one kernel


class _FlatGhostNorm(torch.autograd.Function):
    """Ghost batch norm of flat features (N, C) with a hand-written backward.

    On small flat layers the cost of ghost BN is kernel launches, not arithmetic: the channel-
    stacking route below takes two layout copies each way plus the affine repeats. Here the sub-
    batches are a view, ``(K, NBS, C)``, the forward is eight small kernels and the backward the textbook
    batch-norm gradient, ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * gamma``,
    each mean over the sub-batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group: int, eps: float):
        n, c = x.shape
        xv = x.view(n // group, group, c)
        mean = xv.mean(1, keepdim=True)  # (var_mean over a middle dim is a slow kernel on CPU)
        xhat = xv - mean
        var = (xhat * xhat).mean(1, keepdim=True)
        rstd = (var + eps).rsqrt_()
        xhat.mul_(rstd)
        if weight is None:
            out = xhat if bias is None else xhat + bias
        else:
            out = xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        unbiased = var.mul_(group / (group - 1)) if group > 1 else var
        return out.view(n, c), mean.view(-1, c), unbiased.view(-1, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dmean, _dvar):
        xhat, rstd, weight = ctx.saved_tensors
        dy = dout.view(xhat.shape)
        dweight = (dy * xhat).sum((0, 1)) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dy.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            g = dy * weight if weight is not None else dy
            dx = g - g.mean(1, keepdim=True)
            dx.addcmul_(xhat, (g * xhat).mean(1, keepdim=True), value=-1.0).mul_(rstd)
            dx = dx.view(dout.shape)
        return dx, dweight, dbias, None, None


def ghost_batch_norm(x: torch.Tensor, group: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of each run of `group` consecutive samples of `x` (N, C, ...) with its own statistics.

    Returns the output and each sub-batch's mean and unbiased variance, both (N/group, C).
    """
    n, c = x.shape[:2]
    k = n // group
    if x.dim() == 2:
        return _FlatGhostNorm.apply(x, weight, bias, group, eps)
    # (K, NBS, C, S) -> (NBS, K*C, S): each sub-batch's channels are channels of their own.
    # Flat features stay 2-D, where the batch-norm kernel is fastest.
    spatial = (-1,) if x.dim() > 2 else ()
    xs = x.reshape(k, group, c, *spatial).transpose(0, 1).reshape(group, k * c, *spatial)
    mean, var = x.new_zeros(k * c), x.new_ones(k * c)  # momentum 1 leaves the batch statistics in them
    out = F.batch_norm(xs, mean, var, None if weight is None else weight.repeat(k),
                       None if bias is None else bias.repeat(k), True, 1.0, eps)
    out = out.reshape(group, k, c, *spatial).transpose(0, 1).reshape(x.shape)
    return out, mean.view(k, c), var.view(k, c)


def _factors(momentum: float | None, tracked: torch.Tensor, k: int) -> list[float] | float:
    """The update factors of K consecutive updates; `tracked` already counts them."""
    if momentum is not None:
        return float(momentum)
    done = int(tracked) - k
    return [1.0 / (done + j) for j in range(1, k + 1)]  # cumulative average, as in BatchNorm


class GhostBatchNorm:
    """Mixin for BatchNorm1d/2d: statistics over sub-batches of `norm_batch_size` while training.

    `norm_batch_size` is set by `norm_batches` around the training loop; None is the plain forward.
    """

    norm_batch_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.norm_batch_size
        if group is None or group == x.shape[0] or not self.training:
            return super().forward(x)
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(x.shape[0] // group)
        out, mean, var = ghost_batch_norm(x, group, self.weight, self.bias, self.eps)
        if track:
            with torch.no_grad():
                factors = _factors(self.momentum, self.num_batches_tracked, mean.shape[0])
                sequential_update(self.running_mean, mean, factors)
                sequential_update(self.running_var, var, factors)
        return out


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
        out, mean, var = ghost_batch_norm(x, group, weight, bias, self.eps)
        if self.track_running_stats:
            k = mean.shape[0]
            self.num_batches_tracked[rows] += k
            factors = _factors(self.momentum, self.num_batches_tracked[rows.start], k)
            with torch.no_grad():  # per row the same sequence of K updates: flatten rows into features
                sequential_update(self.running_mean[rows].view(-1), mean, factors)
                sequential_update(self.running_var[rows].view(-1), var, factors)
        return out

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
