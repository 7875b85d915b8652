"""The training loop: `train_one_epoch`, the three evaluations, and `fit`, which returns records.

Batch norm is evaluated three ways, to separate training with noisy statistics
from evaluating with poor running averages (PROTOCOL.md section 2.5):

* ``test_acc``: eval mode, with the running averages (the standard);
* ``test_acc_batch_stats``: train-mode BN at the training batch size, each batch
  normalized with its own statistics, running averages untouched;
* ``test_acc_precise``: population statistics recomputed over training samples with
  the weights frozen (PreciseBN), then eval mode.

Nothing here writes files. Per step there is no host-device sync: losses and correct
counts accumulate on the device and are read at most a few times a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import Config, effective_lr
from normbench.data import Data, train_batches
from normbench.norms import RecurrentBatchNorm

REFRESH_SECONDS = 0.5  # how often the loop reads the loss back: progress display and divergence check


@dataclass
class EpochRecord:
    epoch: int
    step: int
    lr: float
    train_loss: float
    train_acc: float  # percent
    test_loss: float
    test_acc: float  # percent, eval mode
    test_acc_batch_stats: float  # percent; NaN without batch norm
    test_acc_precise: float  # percent; NaN without batch norm
    seconds: float  # since the start of training
    samples_per_s: float  # training throughput of this epoch


@dataclass
class FitResult:
    records: list[EpochRecord] = field(default_factory=list)
    status: str = "completed"  # completed | diverged
    diverged_step: int | None = None
    steps_per_epoch: int = 0


class Progress:
    """What `fit` reports to; the CLI's Rich display implements it. This one shows nothing."""

    def run_start(self, name: str, epochs: int, batch_size: int) -> None: ...

    def epoch_start(self, epoch: int, steps: int) -> None: ...

    def update(self, steps_done: int, loss: float) -> None: ...

    def epoch_end(self, record: EpochRecord) -> None: ...


def resolve_device(name: str) -> torch.device:
    """auto prefers cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o, lr = cfg.optim, effective_lr(cfg)
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return opt(model.parameters(), lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def lr_factor(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the effective lr at `step`: linear warmup, then constant, cosine or step decay."""
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    schedule = cfg.optim.schedule.value
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return cfg.optim.step_gamma ** sum(progress >= m for m in cfg.optim.step_milestones)
    return 1.0


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


@contextmanager
def batch_statistics(model: nn.Module):
    """BN layers normalize each batch with its own statistics and leave the running averages untouched."""
    bns = [m for m in model.modules() if is_batch_norm(m)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    model.eval()
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, track) in zip(bns, saved):
            m.train(training)
            m.track_running_stats = track


@torch.inference_mode()
def evaluate_batch_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy (percent) with BN in train mode at the training batch size.

    The test set is cut into batches of exactly `batch_size`; the last one is filled
    up with samples from the start, which are not counted twice.
    """
    n = len(y)
    padded = torch.arange(math.ceil(n / batch_size) * batch_size, device=x.device) % n
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with batch_statistics(model):
        for s in _chunks(len(padded), batch_size):
            idx = padded[s]
            hit = model(x[idx]).argmax(1) == y[idx]
            correct += hit[: max(0, min(s.stop, n) - s.start)].sum()
    return 100.0 * correct.item() / n


@contextmanager
def recomputed_statistics(model: nn.Module, x: torch.Tensor, batch_size: int):
    """Replace BN running averages by population statistics over `x` (weights frozen); restore after.

    `x` is cut into nearly equal chunks, and each chunk's statistics are weighted by its size.
    """
    bns = [m for m in model.modules() if is_batch_norm(m) and m.track_running_stats]
    saved = [({k: b.clone() for k, b in m.named_buffers()}, m.momentum) for m in bns]
    model.eval()
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.train()
        seen = 0
        for chunk in torch.tensor_split(x, math.ceil(len(x) / batch_size)):
            seen += len(chunk)
            for m in bns:
                m.momentum = len(chunk) / seen  # a running mean weighted by chunk size
            model(chunk)
    model.eval()
    try:
        yield
    finally:
        for m, (buffers, momentum) in zip(bns, saved):
            m.momentum = momentum
            for k, b in m.named_buffers():
                b.copy_(buffers[k])


def evaluate_precise(model: nn.Module, data: Data, cfg: Config) -> float:
    """Accuracy (percent) in eval mode with BN statistics recomputed over training samples."""
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(data.train_y), generator=g)[: cfg.eval.precise_bn_samples].to(data.train_x.device)
    with recomputed_statistics(model, data.train_x[idx], cfg.eval_batch_size):
        return evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)[1]


def train_one_epoch(model: nn.Module, data: Data, cfg: Config, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, generators: tuple[torch.Generator, ...],
                    progress: Progress) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over the training set. Returns per-step losses, the correct count, and steps taken.

    Stops early when the loss stops being finite; the caller finds the step in the losses.
    """
    model.train()
    steps = len(data.train_y) // cfg.batch_size
    losses = torch.full((steps,), float("nan"), device=data.train_x.device)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.long)
    next_refresh, done = time.monotonic() + REFRESH_SECONDS, 0
    for i, (x, y) in enumerate(train_batches(data, cfg.batch_size, *generators)):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses[i] = loss.detach()
        correct += (logits.detach().argmax(1) == y).sum()
        done = i + 1
        if time.monotonic() >= next_refresh:  # the only read-back: a few times a second
            seen = losses[:done]
            if not torch.isfinite(seen).all():
                break
            progress.update(done, seen.mean().item())
            next_refresh = time.monotonic() + REFRESH_SECONDS
    return losses[:done], correct, done


def fit(cfg: Config, model: nn.Module, data: Data, progress: Progress | None = None) -> FitResult:
    """Train for cfg.epochs, evaluating after each epoch. Returns one record per epoch."""
    progress = progress or Progress()
    device = data.train_x.device
    steps_per_epoch = len(data.train_y) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch))
    generators = (torch.Generator().manual_seed(cfg.seed),  # data order, on the CPU: the same on every device
                  torch.Generator(device).manual_seed(cfg.seed + 1_000_003))  # augmentation
    bn = has_running_stats(model)
    batch_norm_anywhere = any(is_batch_norm(m) for m in model.modules())
    result = FitResult(steps_per_epoch=steps_per_epoch)
    start, step = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        progress.epoch_start(epoch, steps_per_epoch)
        t0 = time.perf_counter()
        losses, correct, done = train_one_epoch(model, data, cfg, optimizer, scheduler, generators, progress)
        train_seconds = time.perf_counter() - t0
        finite = torch.isfinite(losses)
        nan = float("nan")
        if not finite.all():
            result.status = "diverged"
            result.diverged_step = step + int((~finite).nonzero()[0]) + 1
            result.records.append(EpochRecord(epoch, result.diverged_step, optimizer.param_groups[0]["lr"],
                                              nan, nan, nan, nan, nan, nan, time.perf_counter() - start, nan))
            break
        step += done
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)
        record = EpochRecord(
            epoch=epoch, step=step, lr=optimizer.param_groups[0]["lr"],
            train_loss=losses.mean().item(), train_acc=100.0 * correct.item() / (done * cfg.batch_size),
            test_loss=test_loss, test_acc=test_acc,
            test_acc_batch_stats=(evaluate_batch_stats(model, data.test_x, data.test_y, cfg.batch_size)
                                  if batch_norm_anywhere and cfg.eval.batch_stats else nan),
            test_acc_precise=evaluate_precise(model, data, cfg) if bn and cfg.eval.precise_bn else nan,
            seconds=time.perf_counter() - start, samples_per_s=done * cfg.batch_size / train_seconds)
        result.records.append(record)
        progress.epoch_end(record)
    return result
