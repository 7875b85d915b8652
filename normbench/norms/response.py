"""Norms that replace the activation too, and need no batch: FRN + TLU and EvoNorm-S0 (conv nets only).

* FRN + TLU (Singh & Krishnan 2020): ``nu2 = mean over H x W of x^2`` per sample and channel,
  ``y = gamma * x / sqrt(nu2 + eps) + beta``, ``z = max(y, tau)`` with a learnable per-channel tau
  (the TLU) in place of the ReLU. No mean is subtracted.
* EvoNorm-S0 (Liu et al. 2020): ``x * sigmoid(v * x) / sqrt(groupvar(x) + eps) * gamma + beta``,
  the biased variance over each group of C/G channels x H x W of a sample; v is learnable per channel.

Both are built by the factory where a norm and its ReLU would be; the factory adds no ReLU after them.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms.spec import SPATIAL, NormOptions, norm, undefined

SPATIAL_ONLY = "it needs H x W positions to average over; use it with model=cnn or model=resnet20"


def _channels(p: torch.Tensor) -> torch.Tensor:
    return p.view(1, -1, 1, 1)


class FilterResponseNorm(nn.Module):
    """FRN followed by its thresholded linear unit; x is (N, C, H, W)."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.pow(2).mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        y = x * torch.rsqrt(nu2 + self.eps) * _channels(self.weight) + _channels(self.bias)
        return torch.maximum(y, _channels(self.tau))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class EvoNormS0(nn.Module):
    """EvoNorm-S0; x is (N, C, H, W). Checked like GroupNorm by `validate_norms` (num_groups, num_channels)."""

    kind = SPATIAL

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        var = x.reshape(n, self.num_groups, -1).var(dim=2, correction=0, keepdim=True)  # (N, G, 1)
        gated = (x * torch.sigmoid(_channels(self.v) * x)).reshape(n, self.num_groups, -1)
        y = (gated * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return y * _channels(self.weight) + _channels(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


@norm("frn", centers=False, activation=True)
def _frn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Filter response norm + TLU: mean square over H x W per sample and channel; replaces the ReLU."""
    if kind != SPATIAL:
        raise undefined("frn", kind, "filter response norm", SPATIAL_ONLY)
    return FilterResponseNorm(c, opts.eps)


@norm("evonorm_s0", centers=False, activation=True)
def _evonorm_s0(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """EvoNorm-S0: sigmoid-gated x over the group std (C/G x H x W per sample); replaces the ReLU."""
    if kind != SPATIAL:
        raise undefined("evonorm_s0", kind, "EvoNorm-S0", SPATIAL_ONLY)
    return EvoNormS0(opts.num_groups, c, opts.eps)
