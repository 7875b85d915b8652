"""The training loop: `train_one_epoch`, the three evaluations, and `fit`, which returns records.

Batch norm is evaluated three ways, to separate training with noisy statistics
from evaluating with poor running averages (docs/protocol.md §3):

* ``test_acc``: eval mode, with the running averages (the standard);
* ``test_acc_batch_stats``: train-mode BN at the normalization batch size (``norm_batch_size``,
  else the training batch size), each batch normalized with its own statistics, running
  averages untouched;
* ``test_acc_precise``: population statistics recomputed over training samples with
  the weights frozen (PreciseBN), then eval mode. They are exact: each BN layer's
  batch moments are pooled over all samples (and over the time steps that share
  statistics), not blended by momentum; samples are augmented as in training.

Nothing here writes files. Per step there is no host-device sync: losses and correct
counts accumulate on the device and are read at most a few times a second.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import Config, effective_lr
from normbench.data import Data, batches_per_epoch, epoch_order, get_batch
from normbench.norms import RecurrentBatchNorm, batch_moments, is_norm, norm_batches
from normbench.shifts import evaluate_shifts

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
    shifts: dict = field(default_factory=dict)  # eval.shifts: {shift: {test_acc, test_acc_adapted}}


class Progress:
    """What `fit` reports to; the CLI's Rich display implements it. This one shows nothing."""

    def run_start(self, name: str, epochs: int, batch_size: int) -> None: ...

    def resumed(self, epochs_done: int, epochs: int) -> None: ...

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


def decay_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two parameter groups: every parameter of a norm module (scales and shifts) and every bias
    (a 1-D parameter named `bias` or `bias_*`) decay by `norm_weight_decay`, the rest by
    `weight_decay`. Each keeps the order of `model.parameters()`; an empty group is left out."""
    exempt = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
    exempt |= {id(p) for name, p in model.named_parameters()
               if p.dim() == 1 and name.rpartition(".")[2].partition("_")[0] == "bias"}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": norm_weight_decay}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over all parameters; with `optim.norm_weight_decay` set, in two `decay_groups`.
    Unset, there is one group, as before the setting existed, so older checkpoints resume."""
    o, lr = cfg.optim, effective_lr(cfg)
    params = (model.parameters() if o.norm_weight_decay is None
              else decay_groups(model, o.weight_decay, o.norm_weight_decay))
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return opt(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


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


class LrSchedule:
    """Sets the lr of each step: the effective lr times `lr_factor`. Writes nothing when it is constant."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        self.cfg, self.optimizer, self.steps_per_epoch = cfg, optimizer, steps_per_epoch
        self.total = steps_per_epoch * cfg.epochs
        self.base = effective_lr(cfg)
        self.constant = cfg.optim.schedule.value == "constant" and cfg.optim.warmup_epochs == 0

    def lr(self, step: int) -> float:
        return self.base * lr_factor(self.cfg, step, self.total, self.steps_per_epoch)

    def apply(self, step: int) -> None:
        if not self.constant:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(step)


@dataclass
class EpochResult:
    losses: torch.Tensor  # (steps done,) on the device
    correct: int
    steps: int


def autocast(cfg: Config, device: torch.device):
    """The forward's precision context: bf16 autocast when asked for, else nothing."""
    if cfg.perf.precision.value == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compiled(cfg: Config, model: nn.Module) -> nn.Module:
    """The module the training step calls: `model` itself, or its torch.compile'd version.

    Evaluation always runs the plain module, whose BN layers it swaps and restores.
    """
    mode = cfg.perf.compile.value
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


@contextmanager
def _gc_paused():
    """Pause Python's cycle collector for an epoch: its passes over the growing per-step lists cost
    more than a small step (measured: 140 us a step at batch 2). Autograd graphs are freed by
    reference counting, so nothing waits for it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def train_one_epoch(model: nn.Module, data: Data, cfg: Config, optimizer: torch.optim.Optimizer,
                    schedule: LrSchedule, step: int, generators: tuple[torch.Generator, torch.Generator],
                    progress: Progress, step_model: nn.Module | None = None) -> EpochResult:
    """One pass over the training set, starting at global step `step`.

    Per step this adds one kernel to a bare loop (the argmax for train accuracy) and no
    read-back; losses are read a few times a second, which also stops a diverged epoch early.
    """
    model.train()
    step_model = step_model or model
    precision = autocast(cfg, data.train_x.device)
    order = epoch_order(data, cfg.batch_size, generators[0])  # (steps * B,)
    losses, predictions = [], []
    next_refresh, loss_sum, checked = time.monotonic() + REFRESH_SECONDS, 0.0, 0
    with _gc_paused(), norm_batches(model, cfg.norm_batch_size):  # ghost BN: only while training
        for start in range(0, len(order), cfg.batch_size):
            x, y = get_batch(data, order[start: start + cfg.batch_size], generators[1])
            schedule.apply(step + len(losses))
            with precision():
                logits = step_model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            predictions.append(logits.detach().argmax(1))
            if time.monotonic() >= next_refresh:  # the only read-back
                recent = torch.stack(losses[checked:])
                loss_sum, checked = loss_sum + recent.sum().item(), len(losses)
                if not math.isfinite(loss_sum):
                    break
                progress.update(len(losses), loss_sum / checked)
                next_refresh = time.monotonic() + REFRESH_SECONDS
    done = len(losses)
    hits = torch.cat(predictions) == data.train_y[order[: done * cfg.batch_size]]
    return EpochResult(torch.stack(losses), int(hits.sum()), done)


def _nan_record(epoch: int, step: int, lr: float, seconds: float) -> EpochRecord:
    nan = float("nan")
    return EpochRecord(epoch, step, lr, nan, nan, nan, nan, nan, nan, seconds, nan)


def fit(cfg: Config, model: nn.Module, data: Data, progress: Progress | None = None,
        resume: dict | None = None, on_epoch_end: Callable[[dict], None] | None = None) -> FitResult:
    """Train for cfg.epochs, evaluating after each epoch. Returns one record per epoch.

    `resume` is a state from `on_epoch_end` (model, optimizer, generators, records): training
    continues after that epoch exactly as if it had never stopped.
    """
    progress = progress or Progress()
    steps_per_epoch = batches_per_epoch(data, cfg.batch_size)
    optimizer = make_optimizer(cfg, model)
    schedule = LrSchedule(cfg, optimizer, steps_per_epoch)
    generators = (torch.Generator().manual_seed(cfg.seed),  # data order, on the CPU: the same on every device
                  torch.Generator(data.train_x.device).manual_seed(cfg.seed + 1_000_003))  # augmentation
    result = FitResult(steps_per_epoch=steps_per_epoch)
    first_epoch, step, elapsed = 1, 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for g, state in zip(generators, resume["generators"]):
            g.set_state(state)
        result.records = [EpochRecord(**r) for r in resume["records"]]
        first_epoch, step, elapsed = resume["epoch"] + 1, resume["step"], resume["seconds"]
    bn = has_running_stats(model)
    batch_norm_anywhere = any(is_batch_norm(m) for m in model.modules())
    step_model = compiled(cfg, model)
    start = time.perf_counter() - elapsed
    for epoch in range(first_epoch, cfg.epochs + 1):
        progress.epoch_start(epoch, steps_per_epoch)
        t0 = time.perf_counter()
        ep = train_one_epoch(model, data, cfg, optimizer, schedule, step, generators, progress, step_model)
        train_seconds = time.perf_counter() - t0
        finite = torch.isfinite(ep.losses)
        if not finite.all():
            result.status = "diverged"
            result.diverged_step = step + int((~finite).nonzero()[0]) + 1
            result.records.append(_nan_record(epoch, result.diverged_step, schedule.lr(result.diverged_step),
                                              time.perf_counter() - start))
            break
        step += ep.steps
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)
        nan = float("nan")
        extra = cfg.eval.every_epoch or epoch == cfg.epochs
        record = EpochRecord(
            epoch=epoch, step=step, lr=schedule.lr(step),
            train_loss=ep.losses.mean().item(), train_acc=100.0 * ep.correct / (ep.steps * cfg.batch_size),
            test_loss=test_loss, test_acc=test_acc,
            test_acc_batch_stats=(evaluate_batch_stats(model, data.test_x, data.test_y,
                                                       cfg.norm_batch_size or cfg.batch_size, cfg.eval_batch_size)
                                  if extra and batch_norm_anywhere and cfg.eval.batch_stats else nan),
            test_acc_precise=evaluate_precise(model, data, cfg) if extra and bn and cfg.eval.precise_bn else nan,
            seconds=time.perf_counter() - start, samples_per_s=ep.steps * cfg.batch_size / train_seconds)
        result.records.append(record)
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch, "step": step, "seconds": record.seconds,
                          "records": [asdict(r) for r in result.records], "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "generators": [g.get_state() for g in generators]})
        progress.epoch_end(record)
    if result.status == "completed":
        result.shifts = evaluate_shifts(model, data, cfg)
    return result
