"""Norms whose statistics come from each sample alone: layer, instance, group and RMS norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.spec import SPATIAL, NormOptions, norm, undefined


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


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * gamma over C (x H x W) of each
    sample; no mean is subtracted and there is no shift."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))  # (N, C) or (N, C, H, W): all but the batch
        scale = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self.eps)
        return x * scale * self.weight.view((1, -1) + (1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class StepNorm(nn.Module):
    """A norm whose statistics do not depend on the batch (LN, GN, RMS, none), used inside a recurrent cell.

    Takes one step ``(N, C)`` or a whole sequence ``(T, N, C)``; the step index is ignored.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        if x.dim() == 3:
            return self.norm(x.flatten(0, 1)).view_as(x)
        return self.norm(x)


@norm("ln")
def _ln(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Layer norm: statistics over all features of each sample (C, or C x H x W)."""
    if kind == SPATIAL:
        return GroupNorm(1, c, opts.eps, kind)
    return nn.LayerNorm(c, eps=opts.eps)


@norm("in")
def _in(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Instance norm: statistics over H x W of each sample and channel (conv nets only)."""
    if kind != SPATIAL:
        raise undefined("in", kind, "instance norm", "it needs H x W positions to average over; "
                        "use it with model=cnn or model=resnet20")
    return nn.InstanceNorm2d(c, eps=opts.eps, affine=True, track_running_stats=False)


@norm("gn")
def _gn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Group norm: statistics over each group of C/G channels (x H x W) of each sample."""
    return GroupNorm(opts.num_groups, c, opts.eps, kind)


@norm("rms", centers=False)
def _rms(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """RMSNorm: the root mean square over LN's set of values; no mean, no shift."""
    return RMSNorm(c, opts.eps)


@norm("none", centers=False)
def _none(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """No normalization (the baseline)."""
    return nn.Identity()

