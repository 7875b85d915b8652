"""Every normalization normbench compares, behind one factory.

All of them compute ``(x - mean) / sqrt(var + eps)`` and then apply a learnable
per-channel scale (gamma) and shift (beta). They differ only in the set of values
the statistics are taken over, and that set depends on where the norm sits:

======== ====================== ========================== ===================================
name     flat ``(N, C)``         spatial ``(N, C, H, W)``    recurrent (per time step, ``(N, C)``)
======== ====================== ========================== ===================================
bn       BatchNorm1d: over N     BatchNorm2d: over N, H, W   recurrent BN (Cooijmans et al. 2016):
                                                             over N, separate running averages
                                                             per time step (or shared, by flag),
                                                             gamma starts at 0.1
ln       LayerNorm(C)           GroupNorm(1, C): over        LayerNorm(C) on the gate
                                 C, H, W of each sample,     pre-activations (Ba et al. 2016)
                                 per-channel affine
in       refused (undefined)    InstanceNorm2d(affine=True) refused (undefined)
gn       GroupNorm(G, C)        GroupNorm(G, C)             GroupNorm(G, C) on the gate
                                                             pre-activations
none     identity               identity                    identity
======== ====================== ========================== ===================================

Training-time normalization uses the biased variance (divide by m); BN's running
variance accumulates the unbiased one (divide by m - 1), as in PyTorch. BN's
momentum 0.1 keeps 0.9 of the old running value at each update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.registry import Registry

FLAT, SPATIAL, RECURRENT = "flat", "spatial", "recurrent"
KINDS = (FLAT, SPATIAL, RECURRENT)

NORMS: Registry = Registry("norm")


class GroupNorm(nn.Module):
    """GroupNorm that defers the divisibility check to `validate_norms`, so the error can name the layer."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, kind: str):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.kind = num_groups, num_channels, eps, kind
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class StepNorm(nn.Module):
    """A norm whose statistics do not depend on the batch (LN, GN, none), used inside a recurrent cell.

    Takes one step ``(N, C)`` or a whole sequence ``(T, N, C)``; the step index is ignored.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        if x.dim() == 3:
            return self.norm(x.flatten(0, 1)).view_as(x)
        return self.norm(x)


class RecurrentBatchNorm(nn.Module):
    """Batch norm inside a recurrent cell (Cooijmans et al. 2016).

    Each time step t normalizes with the statistics of its own batch in training.
    With ``shared=False`` every step keeps its own running averages (rows of
    ``running_mean``/``running_var``, shape ``(steps, C)``); steps past the last row
    reuse it. With ``shared=True`` one set of running averages is updated at every step,
    as a single BatchNorm1d reused over time would be.
    """

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
        use_batch = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked[rows] += 1
        # Rows are contiguous, so the flattened view shares storage and is updated in place.
        mean = self.running_mean[rows].reshape(-1) if self.track_running_stats else None
        var = self.running_var[rows].reshape(-1) if self.track_running_stats else None
        factor = self._factor(rows.start) if update else 0.0
        return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, self.eps)

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


# Every module a norm is made of: what `create_norm` builds, and PyTorch's own norms.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, GroupNorm, StepNorm, RecurrentBatchNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


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


@dataclass(frozen=True)
class NormOptions:
    eps: float = 1e-5
    momentum: float | None = 0.1
    track_running_stats: bool = True
    num_groups: int = 32
    recurrent_stats: str = "per_step"  # per_step | shared


@NORMS.register("bn")
def _bn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Batch norm: statistics over the batch (and H x W); running averages at eval."""
    args = dict(eps=opts.eps, momentum=opts.momentum, track_running_stats=opts.track_running_stats)
    if kind == FLAT:
        return nn.BatchNorm1d(c, **args)
    if kind == SPATIAL:
        return nn.BatchNorm2d(c, **args)
    return RecurrentBatchNorm(c, steps or 1, shared=opts.recurrent_stats == "shared", **args)


@NORMS.register("ln")
def _ln(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Layer norm: statistics over all features of each sample (C, or C x H x W)."""
    if kind == SPATIAL:
        return GroupNorm(1, c, opts.eps, kind)
    return nn.LayerNorm(c, eps=opts.eps)


@NORMS.register("in")
def _in(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Instance norm: statistics over H x W of each sample and channel (conv nets only)."""
    if kind != SPATIAL:
        raise UserError(f"norm 'in' (instance norm) is undefined on {kind} features: it needs H x W "
                        "positions to average over; use it with model=cnn or model=resnet20")
    return nn.InstanceNorm2d(c, eps=opts.eps, affine=True, track_running_stats=False)


@NORMS.register("gn")
def _gn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Group norm: statistics over each group of C/G channels (x H x W) of each sample."""
    return GroupNorm(opts.num_groups, c, opts.eps, kind)


@NORMS.register("none")
def _none(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """No normalization (the baseline)."""
    return nn.Identity()


def create_norm(name: str, num_features: int, kind: str, options: NormOptions = NormOptions(),
                steps: int | None = None) -> nn.Module:
    """Build norm `name` for `num_features` channels of the given kind (flat, spatial or recurrent).

    Recurrent norms take ``(x, t)``; `steps` is the sequence length, for per-step statistics.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layer = NORMS.get(name)(num_features, kind, options, steps)
    if kind == RECURRENT and not isinstance(layer, RecurrentBatchNorm):
        layer = StepNorm(layer)
    return layer


@dataclass(frozen=True)
class NormFactory:
    """`create_norm` bound to one norm config: what models receive. Models never branch on the name."""

    name: str
    options: NormOptions = NormOptions()
    position: str = "pre_act"  # pre_act: layer -> norm -> ReLU; post_act: layer -> ReLU -> norm

    def __call__(self, num_features: int, kind: str, steps: int | None = None) -> nn.Module:
        return create_norm(self.name, num_features, kind, self.options, steps)

    @property
    def bias(self) -> bool:
        """Whether a conv/linear layer before this norm needs a bias: a norm right after it removes one."""
        return self.name == "none" or self.position == "post_act"

    def block(self, num_features: int, kind: str) -> nn.Sequential:
        """The norm and a ReLU, in the configured order."""
        norm, act = self(num_features, kind), nn.ReLU(inplace=False)
        return nn.Sequential(norm, act) if self.position == "pre_act" else nn.Sequential(act, norm)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_norms(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Check every norm of a built model before training, naming the layers that cannot work.

    GroupNorm needs C divisible by G; a group or instance of one value would normalize
    to zero. The error lists the group counts valid for every layer.
    """
    _check_group_counts(model)
    _check_single_values(model, input_shape)


def _check_single_values(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """A dry forward on two blank samples: any GN/IN group holding one value is refused."""

    def hook(name):
        def check(module, inputs):
            x = inputs[0]
            groups = module.num_groups if isinstance(module, GroupNorm) else x.shape[1]
            if x[0].numel() // groups <= 1:
                raise UserError(f"layer '{name}' sees input {tuple(x.shape[1:])}: each group or instance would "
                                "hold a single value, which normalizes to zero; use fewer stages, larger inputs "
                                "or fewer groups")
        return check

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (GroupNorm, nn.InstanceNorm2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _check_group_counts(model: nn.Module) -> None:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GroupNorm) and m.num_groups > 1]
    bad = [(name, m) for name, m in layers
           if m.num_channels % m.num_groups or (m.kind != SPATIAL and m.num_channels == m.num_groups)]
    if not bad:
        return
    common = math.gcd(*(m.num_channels for _, m in layers))
    ok = [g for g in _divisors(common)
          if all(m.kind == SPATIAL or m.num_channels // g > 1 for _, m in layers)]
    name, m = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    why = ("does not divide" if m.num_channels % m.num_groups
           else "leaves one value per group in")
    raise UserError(f"norm.num_groups={m.num_groups} {why} layer '{name}' ({m.num_channels} channels){more}; "
                    f"num_groups values that work for every layer: {', '.join(map(str, ok))}")
