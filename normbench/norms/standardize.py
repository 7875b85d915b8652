"""Weight Standardization (Qiao et al. 2019) with group norm: the `ws_gn` norm.

Each conv or linear layer that feeds the norm standardizes its weights in the forward pass: every
output filter's weights, over its fan-in (in_channels x kernel), to zero mean and unit (biased)
variance, ``w_hat = (w - mean) / sqrt(var + 1e-10)``; the stored weights are left as they are. Models
get these layers from the norm factory's `linear` / `conv` hooks, so they never ask which norm it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.group import GroupNorm
from normbench.norms.spec import RECURRENT, NormOptions, norm, undefined

WS_EPS = 1e-10  # on the variance: a floor of 1e-5 on the std, the scale of the paper's code


def standardized(weight: torch.Tensor) -> torch.Tensor:
    """Each output filter (dim 0) to zero mean and unit variance over the rest."""
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, correction=0, keepdim=True)
    return (weight - mean) * torch.rsqrt(var + WS_EPS)


class WSLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, standardized(self.weight), self.bias)


class WSConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardized(self.weight), self.bias)


@norm("ws_gn", standardize=True)
def _ws_gn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Weight-standardized conv/linear layers feeding group norm (MLP and conv nets)."""
    if kind == RECURRENT:
        raise undefined("ws_gn", kind, "weight standardization + group norm",
                        "the recurrent cells' projections are not weight-standardized; use norm=gn")
    return GroupNorm(opts.num_groups, c, opts.eps, kind)
