"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275).

Training normalizes with the batch statistics and then corrects towards the running averages:
``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, where ``mu`` and ``sigma = sqrt(running_var + eps)``
are the running averages and ``sigma_B = sqrt(var_B + eps)`` (biased). r and d are constants for
backprop. The running averages update as BN's; evaluation is BN's. The clip limits warm up linearly
from (1, 0), where BRN is exactly BN, to (r_max, d_max) over `warmup_steps` training forwards, as the
paper warms them; the module counts its own training forwards in the buffer ``steps`` (saved with
the model, so a resumed run continues the schedule), on the device, without a read-back.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms.spec import FLAT, RECURRENT, NormOptions, norm, undefined


class BatchRenorm:
    """Mixin for BatchNorm1d/2d: the renormalized training forward."""

    def setup(self, r_max: float, d_max: float, warmup_steps: int) -> None:
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step, as 0-d tensors on the buffers' device."""
        done = self.steps.to(self.running_var.dtype)
        ramp = (done / self.warmup_steps).clamp(max=1.0) if self.warmup_steps > 0 else torch.ones_like(done)
        return 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PreciseBN turns track_running_stats off to take plain batch statistics: BN's forward then
        if not (self.training and self.track_running_stats) or (self.r_max == 1 and self.d_max == 0):
            if self.training and self.track_running_stats:
                self.steps.add_(1)
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]  # batch (and H x W)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
        sigma_b = torch.sqrt(var_b + self.eps)
        with torch.no_grad():
            r_max, d_max = self.limits()
            sigma = torch.sqrt(self.running_var + self.eps)
            r = torch.minimum(torch.maximum(sigma_b / sigma, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean_b - self.running_mean) / sigma, -d_max), d_max)
            self._update(mean_b, var_b, x.numel() // x.shape[1])
        scale = self.weight * r / sigma_b
        shift = self.bias + self.weight * (d - mean_b * r / sigma_b)
        return x * scale.view(shape) + shift.view(shape)

    def _update(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """BN's running-average update: the unbiased variance, momentum or cumulative average."""
        self.steps.add_(1)
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"


class BatchRenorm1d(BatchRenorm, nn.BatchNorm1d):
    def __init__(self, c: int, eps: float, momentum: float | None, r_max: float, d_max: float, warmup_steps: int):
        super().__init__(c, eps=eps, momentum=momentum)
        self.setup(r_max, d_max, warmup_steps)


class BatchRenorm2d(BatchRenorm, nn.BatchNorm2d):
    def __init__(self, c: int, eps: float, momentum: float | None, r_max: float, d_max: float, warmup_steps: int):
        super().__init__(c, eps=eps, momentum=momentum)
        self.setup(r_max, d_max, warmup_steps)


@norm("brn")
def _brn(c: int, kind: str, opts: NormOptions, steps: int | None) -> nn.Module:
    """Batch renormalization: batch statistics corrected towards the running averages; BN at eval."""
    if kind == RECURRENT:
        raise undefined("brn", kind, "batch renormalization", "normbench has no recurrent batch renorm "
                        "(per-step running averages and r/d corrections); use norm=bn")
    cls = BatchRenorm1d if kind == FLAT else BatchRenorm2d
    return cls(c, opts.eps, opts.momentum, opts.r_max, opts.d_max, opts.warmup_steps)
