"""Leave-one-out batch norm: a normbench plugin (load it with ``--plugin examples/loo_bn.py``).

In training, batch norm normalizes sample i with statistics that include sample i itself. At small
batch sizes that self-inclusion matters: at batch 2, BN's mean is half made of the sample it
normalizes, which shrinks every output towards its partner. This norm takes the mean and variance
of each channel over the *other* samples of the batch (and all their H x W positions):

    mu_-i  = (S1 - s1_i) / m_-i           S1, S2: sums of x and x^2 over the batch and positions
    var_-i = (S2 - s2_i) / m_-i - mu_-i^2  s1_i, s2_i: the same sums over sample i's positions alone
    y_i    = gamma * (x_i - mu_-i) / sqrt(var_-i + eps) + beta      m_-i = (N - 1) * H * W

In evaluation it uses running averages of the whole batch's statistics, as BN does. It is defined on
spatial features only: on flat features at batch 2 the other sample is a single value, whose variance
is zero. Compare it with BN, GN and LN across batch sizes::

    normbench sweep --plugin examples/loo_bn.py --config-dir examples model=cnn \\
        norm=loo_bn,bn,gn,ln batch_size=2,4,8,16,32,64,128 seed=range(2)

Check it first (``normbench check --plugin examples/loo_bn.py norm=loo_bn``): it is batch-dependent,
like BN, by measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import normbench


@dataclass
class LooOptions:
    eps: float = 1e-5  # declared here, so the builder receives norm.eps
    momentum: float = 0.1  # weight of the new batch in the running averages


class LeaveOneOutBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float, momentum: float):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        if not self.training:
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        else:
            n, positions = x.shape[0], x.shape[2] * x.shape[3]
            if n < 2:
                raise ValueError("leave-one-out batch norm needs at least 2 samples in a batch")
            s1, s2 = x.sum(dim=(2, 3), keepdim=True), x.pow(2).sum(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
            others = (n - 1) * positions
            mean = (s1.sum(0, keepdim=True) - s1) / others
            var = ((s2.sum(0, keepdim=True) - s2) / others - mean.pow(2)).clamp_min(0)
            with torch.no_grad():  # running averages of the whole batch's statistics, as BN keeps them
                m = n * positions
                batch_mean = s1.sum(0).flatten() / m
                batch_var = (s2.sum(0).flatten() / m - batch_mean.pow(2)).clamp_min(0) * m / max(m - 1, 1)
                self.running_mean.lerp_(batch_mean, self.momentum)
                self.running_var.lerp_(batch_var, self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


@normbench.register_norm("loo_bn", options=LooOptions, kinds=("spatial",))
def build(num_features: int, kind: str, options: LooOptions) -> nn.Module:
    """Leave-one-out batch norm: each sample normalized with the statistics of the other samples of the batch."""
    return LeaveOneOutBatchNorm2d(num_features, options.eps, options.momentum)
