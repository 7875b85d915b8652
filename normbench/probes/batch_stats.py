"""How far a batch's statistics stray from the population's: the noise batch norm trains with (Ioffe &
Szegedy 2015, arXiv 1502.03167, §3: the batch estimates of the mean and variance; Wu & Johnson 2021,
arXiv 2105.07576, §3 on the normalization batch).

At step t, on the current weights: `probes.batch_stats.samples` training samples (at most the training
set; the first of a permutation seeded by the seed, the same at every step, augmented as in training by a
generator of their own) go through the network in one forward, with every BN layer normalizing with the statistics of all of
them (the population) and every other layer in eval mode (`batch_statistics`, as the batch-statistics
evaluation does). At every norm layer's input (batch norm, and for comparison the inputs of LN, GN and the
other norms) and for every channel c:

* population: mu_c and sigma_c (biased) over all samples (x H x W on conv features);
* for each B in `probes.batch_stats.sizes`, the samples cut into n // B consecutive batches, each with
  its mu_B and sigma_B over B samples (x H x W) as BN computes them in training;
* relative errors ``|mu_B - mu_c| / sigma_c`` (``stat=mean``) and ``|sigma_B - sigma_c| / sigma_c``
  (``stat=std``), whose quantiles over batches and channels are recorded.

For independent samples both shrink like 1/sqrt(values per statistic): 1/sqrt(B) on flat features,
1/sqrt(B H W) at most on conv features (neighbouring positions are correlated, so less). The batches
are drawn without replacement from the n samples, so the error also carries the finite-population factor
sqrt(1 - B/n): with B near n it falls faster than 1/sqrt(B) (log-log slopes a little below -0.5). Inside a
recurrent cell each time step has its own population; errors are pooled over steps. Channels with no
spread (sigma_c = 0) have no relative error and are left out.
"""

from __future__ import annotations

import numpy as np
import torch

from normbench.data import get_batch
from normbench.evaluation import batch_statistics
from normbench.norms import RecurrentBatchNorm, StepNorm
from normbench.probes.base import StepView, hooked, norm_layers

KEYS = ("norm", "batch_size", "values", "stat", "quantile")
SAMPLE_SEED = 3_000_017  # offset of the seed of this probe's sample choice and augmentation


def applies(cfg) -> str | None:
    return None


def sample_inputs(data, cfg, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + SAMPLE_SEED)
    idx = torch.randperm(len(data.train_y), generator=g)[:n].to(data.train_x.device)
    augmentation = torch.Generator(data.train_x.device).manual_seed(cfg.seed + SAMPLE_SEED)
    return get_batch(data, idx, augmentation)[0]


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each sample's mean and mean square per channel, (N, C) each in float64, and the values per sample
    and channel (1 on flat features, H x W on conv features)."""
    x = x.detach().double()
    if x.dim() == 2:
        return x, x * x, 1
    flat = x.flatten(2)  # (N, C, H * W)
    return flat.mean(2), (flat * flat).mean(2), flat.shape[2]


def relative_errors(first: torch.Tensor, second: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative errors of the mean and std of every consecutive batch of `batch` samples against all samples,
    given each sample's per-channel mean and mean square (N, C); flattened over batches and channels."""
    n = first.shape[0] // batch * batch
    mu = first.mean(0)
    sigma = (second.mean(0) - mu * mu).clamp_min(0).sqrt()
    keep = sigma > 0
    mu_b = first[:n].view(-1, batch, first.shape[1]).mean(1)  # (n / B, C)
    sigma_b = (second[:n].view(-1, batch, first.shape[1]).mean(1) - mu_b * mu_b).clamp_min(0).sqrt()
    mean_err = ((mu_b - mu).abs() / sigma)[:, keep]
    std_err = ((sigma_b - sigma).abs() / sigma)[:, keep]
    return mean_err.flatten().cpu().numpy(), std_err.flatten().cpu().numpy()


class _Collector:
    """A forward pre-hook: every input of one norm layer as per-sample moments, per time step when recurrent."""

    def __init__(self, module):
        self.recurrent = isinstance(module, (RecurrentBatchNorm, StepNorm))
        self.steps: dict[int, list] = {}

    def __call__(self, module, args, kwargs) -> None:
        x = args[0]
        if self.recurrent and x.dim() == 3:  # a whole sequence (T, N, C)
            for t, x_t in enumerate(x.unbind(0)):
                self.steps[t] = per_sample_moments(x_t)
            return
        t = args[1] if len(args) > 1 else kwargs.get("t", 0)
        self.steps[t or 0] = per_sample_moments(x)


class BatchStats:
    name = "batch_stats"

    def __init__(self, options, cfg, model, data):
        self.inputs = sample_inputs(data, cfg, min(options.samples, len(data.train_y)))
        self.sizes = [b for b in sorted(options.sizes) if b <= len(self.inputs)]  # B > samples: no batch to measure
        self.quantiles = sorted(options.quantiles)

    def measure(self, view: StepView) -> list[dict]:
        layers = norm_layers(view.model)
        collectors = [_Collector(m) for _, m in layers]
        handles = [m.register_forward_pre_hook(c, with_kwargs=True) for (_, m), c in zip(layers, collectors)]
        with hooked(handles), torch.no_grad(), batch_statistics(view.model, len(self.inputs)):
            view.model(self.inputs)
        rows = []
        for depth, ((name, module), c) in enumerate(zip(layers, collectors)):
            kind = type(module.norm if isinstance(module, StepNorm) else module).__name__
            per_value = next(iter(c.steps.values()))[2] if c.steps else 1
            for b in self.sizes:
                errors = [relative_errors(first, second, b) for first, second, _ in c.steps.values()]
                for stat, k in (("mean", 0), ("std", 1)):
                    pooled = np.concatenate([e[k] for e in errors]) if errors else np.array([])
                    for q in self.quantiles:
                        value = float(np.quantile(pooled, q)) if len(pooled) else float("nan")
                        rows.append({"layer": name, "depth": depth, "norm": kind, "batch_size": b,
                                     "values": b * per_value, "stat": stat, "quantile": q, "value": value})
        return rows
