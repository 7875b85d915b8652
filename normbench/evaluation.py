"""How a trained model is evaluated: eval mode, and batch norm's two other evaluations.

Batch norm is evaluated three ways, to separate training with noisy statistics
from evaluating with poor running averages (docs/protocol.md §3):

* ``test_acc`` (`evaluate`): eval mode, with the running averages (the standard);
* ``test_acc_batch_stats`` (`evaluate_batch_stats`): train-mode BN at the normalization batch
  size (``norm_batch_size``, else the training batch size), each batch normalized with its own
  statistics, running averages untouched;
* ``test_acc_precise`` (`evaluate_precise`): population statistics recomputed over training
  samples with the weights frozen (PreciseBN), then eval mode. They are exact: each BN layer's
  batch moments are pooled over all samples (and over the time steps that share statistics),
  not blended by momentum; samples are augmented as in training.

Nothing here writes files or changes a model's weights; running averages are changed only
inside `recomputed_statistics`, and restored when it exits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import Config
from normbench.data import Data, get_batch
from normbench.norms import RecurrentBatchNorm, batch_moments


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, RecurrentBatchNorm))


def has_running_stats(model: nn.Module) -> bool:
    return any(is_batch_norm(m) and m.track_running_stats for m in model.modules())


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy (percent) in eval mode."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in _chunks(len(y), batch_size):
        logits = model(x[s])
        loss += F.cross_entropy(logits, y[s], reduction="sum")
        correct += (logits.argmax(1) == y[s]).sum()
    return loss.item() / len(y), 100.0 * correct.item() / len(y)


def _ghost_norm(x: torch.Tensor, group: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                batch_dim: int = 0) -> torch.Tensor:
    """Batch norm with statistics over each run of `group` consecutive samples (biased variance)."""
    shape = x.shape
    n, c = shape[batch_dim], shape[batch_dim + 1]
    xg = x.reshape(*shape[:batch_dim], n // group, group, *shape[batch_dim + 1:])
    dims = tuple(d for d in range(xg.dim()) if d > batch_dim and d != batch_dim + 2)  # batch and H x W
    mean = xg.mean(dims, keepdim=True)
    var = xg.var(dims, unbiased=False, keepdim=True)
    affine = (c,) + (1,) * (xg.dim() - batch_dim - 3)
    out = (xg - mean) * torch.rsqrt(var + eps) * weight.view(affine) + bias.view(affine)
    return out.reshape(shape)


@contextmanager
def batch_statistics(model: nn.Module, group: int):
    """BN layers normalize each run of `group` samples with its own statistics, like a train-mode
    forward at batch size `group`, and leave the running averages untouched. One forward of many
    groups replaces many small forwards."""
    bns = [m for m in model.modules() if is_batch_norm(m)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in bns:
        if isinstance(m, RecurrentBatchNorm):  # (N, C) at a step, or (T, N, C) for a whole sequence
            m.forward = lambda x, t=None, m=m: _ghost_norm(x, group, m.weight, m.bias, m.eps, x.dim() - 2)
        else:
            m.forward = lambda x, m=m: _ghost_norm(x, group, m.weight, m.bias, m.eps)
    try:
        yield
    finally:
        for m in bns:
            del m.forward  # back to the class's forward
        for m, training in modes:
            m.training = training


@torch.inference_mode()
def evaluate_batch_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                         eval_batch_size: int = 1024) -> float:
    """Accuracy (percent) with BN normalizing each test batch of `batch_size` with its own statistics.

    The test set is cut into batches of exactly `batch_size`; the last one is filled up
    with samples from the start, which are not counted twice.
    """
    n = len(y)
    padded = torch.arange(math.ceil(n / batch_size) * batch_size, device=x.device) % n
    chunk = max(1, eval_batch_size // batch_size) * batch_size  # whole batches per forward
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with batch_statistics(model, batch_size):
        for s in _chunks(len(padded), chunk):
            idx = padded[s]
            hit = model(x[idx]).argmax(1) == y[idx]
            correct += hit[: max(0, min(s.stop, n) - s.start)].sum()
    return 100.0 * correct.item() / n


class PopulationMoments:
    """The exact mean and variance of every value a BN layer's statistic covers, pooled over chunks.

    A forward pre-hook on the layer: each call adds its batch moments (`batch_moments`), weighted
    by the values they cover. Per statistic, as in Wu & Johnson 2021:
    ``mean = E[mu_B]`` and ``var = E[sigma_B^2 + mu_B^2] - E[mu_B]^2``, with sigma_B^2 biased,
    which is the biased variance of all the values at once. Accumulated in float64 (float32 on
    MPS, which has no float64).
    """

    def __init__(self, bn: nn.Module):
        self.bn = bn
        rows = bn.running_mean.view(-1, bn.num_features)
        self.dtype = torch.float32 if rows.device.type == "mps" else torch.float64
        self.count = torch.zeros(rows.shape[0], 1, dtype=self.dtype, device=rows.device)  # values per row
        self.first = torch.zeros(rows.shape, dtype=self.dtype, device=rows.device)  # sum of n_B * mu_B
        self.second = torch.zeros_like(self.first)  # sum of n_B * (sigma_B^2 + mu_B^2)
        self.indices: dict[tuple[int, ...], torch.Tensor] = {}  # rows -> index on the device, made once

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("t")
        rows, n, mean, var = batch_moments(self.bn, args[0].detach(), t)
        if rows not in self.indices:
            self.indices[rows] = torch.tensor(rows, device=self.count.device)
        index = self.indices[rows]
        mean, var = mean.to(self.dtype), var.to(self.dtype)
        self.count.index_add_(0, index, torch.full((len(rows), 1), float(n), dtype=self.dtype, device=mean.device))
        self.first.index_add_(0, index, n * mean)
        self.second.index_add_(0, index, n * (var + mean * mean))

    def install(self) -> None:
        """running_mean: the population mean; running_var: the population variance times n / (n - 1),
        the unbiased estimate that running_var holds in PyTorch. Rows no value reached keep theirs."""
        n = self.count
        mean = self.first / n.clamp_min(1)
        var = (self.second / n.clamp_min(1) - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)
        seen = n > 0
        for buffer, value in ((self.bn.running_mean, mean), (self.bn.running_var, var)):
            rows = buffer.view(-1, self.bn.num_features)
            rows.copy_(torch.where(seen, value.to(rows.dtype), rows))


@contextmanager
def recomputed_statistics(model: nn.Module, x: torch.Tensor, batch_size: int):
    """Replace BN running averages by population statistics over `x` (weights frozen); restore after.

    `x` runs through the model in nearly equal chunks of at most `batch_size`, with every BN
    layer normalizing each chunk with the chunk's own statistics (train mode, running averages
    untouched) and every other layer in eval mode. Each BN layer's input is pooled over all
    chunks (and, for recurrent BN, over the steps that share a row: each step its own row, or
    all steps one shared row) into exact population statistics (`PopulationMoments`), set once
    at the end. For BatchNorm1d/2d and per-step recurrent BN with one chunk, these are the
    buffers a train-mode forward of all of `x` leaves at momentum 1.
    """
    bns = [m for m in model.modules() if is_batch_norm(m) and m.track_running_stats]
    saved = [{k: b.clone() for k, b in m.named_buffers()} for m in bns]
    moments = [PopulationMoments(m) for m in bns]
    handles = [m.register_forward_pre_hook(p, with_kwargs=True) for m, p in zip(bns, moments)]
    model.eval()
    try:
        for m in bns:
            m.train()
            m.track_running_stats = False  # batch statistics, buffers neither read nor written
        with torch.no_grad():
            for chunk in torch.tensor_split(x, math.ceil(len(x) / batch_size)):
                model(chunk)
    finally:
        for h in handles:
            h.remove()
        for m in bns:
            m.track_running_stats = True
        model.eval()
    with torch.no_grad():
        for p in moments:
            p.install()
    try:
        yield
    finally:
        for m, buffers in zip(bns, saved):
            for k, b in m.named_buffers():
                b.copy_(buffers[k])


PRECISE_AUGMENT_SEED = 2_000_003  # offset of the seed of PreciseBN's own augmentation generator


def precise_bn_inputs(data: Data, cfg: Config) -> torch.Tensor:
    """The training samples PreciseBN recomputes statistics over: the first `eval.precise_bn_samples`
    of a permutation seeded by the seed, the same after every epoch. With `data.augment` they are
    augmented as in training, since that is the distribution BN saw, by a generator of their own
    (seeded by the seed), so no other random stream of the run moves."""
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(data.train_y), generator=g)[: cfg.eval.precise_bn_samples].to(data.train_x.device)
    augmentation = torch.Generator(data.train_x.device).manual_seed(cfg.seed + PRECISE_AUGMENT_SEED)
    return get_batch(data, idx, augmentation)[0]


def evaluate_precise(model: nn.Module, data: Data, cfg: Config) -> float:
    """Accuracy (percent) in eval mode with BN statistics recomputed over training samples."""
    with recomputed_statistics(model, precise_bn_inputs(data, cfg), cfg.eval_batch_size):
        return evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)[1]
