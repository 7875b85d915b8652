"""The training loop: `train_one_epoch`, and `fit`, which trains, evaluates after each epoch and
returns one record per epoch.

The evaluations themselves (eval mode, batch norm with each test batch's own statistics, and
PreciseBN) are in `normbench.evaluation`. Nothing here writes files. Per step there is no
host-device sync: losses and correct counts accumulate on the device and are read at most a few
times a second.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import Config, effective_lr
from normbench.data import Data, batches_per_epoch, epoch_order, get_batch
from normbench.evaluation import evaluate, evaluate_batch_stats, evaluate_precise, has_running_stats, is_batch_norm
from normbench.norms import is_norm, norm_batches
from normbench.probes import Probes
from normbench.probes import build as build_probes
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
    probe_rows: dict = field(default_factory=dict)  # probes.*: {probe: [row, ...]}; empty with every probe off
    probe_seconds: dict = field(default_factory=dict)  # {probe: seconds it took}, not counted in samples_per_s


class Progress:
    """What `fit` reports to; the CLI's Rich display implements it. This one shows nothing."""

    def run_start(self, name: str, epochs: int, batch_size: int) -> None: ...

    def resumed(self, epochs_done: int, epochs: int) -> None: ...

    def unusable_checkpoint(self, epochs: int) -> None: ...  # one was there, damaged or another run's

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
                    progress: Progress, step_model: nn.Module | None = None,
                    probes: Probes | None = None) -> EpochResult:
    """One pass over the training set, starting at global step `step`.

    Per step this adds one kernel to a bare loop (the argmax for train accuracy) and no
    read-back; losses are read a few times a second, which also stops a diverged epoch early.
    `probes` (None when every probe is off) look at a step before it runs and leave it unchanged.
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
            if probes is not None:
                probes.at_step(step + len(losses), model, x, y, optimizer, precision)
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
    probes = build_probes(cfg, model, data)
    if probes is not None and resume is not None:
        probes.load(resume.get("probes"))
    bn = has_running_stats(model)
    batch_norm_anywhere = any(is_batch_norm(m) for m in model.modules())
    step_model = compiled(cfg, model)
    start = time.perf_counter() - elapsed
    for epoch in range(first_epoch, cfg.epochs + 1):
        progress.epoch_start(epoch, steps_per_epoch)
        t0, probed = time.perf_counter(), probes.total_seconds if probes else 0.0
        ep = train_one_epoch(model, data, cfg, optimizer, schedule, step, generators, progress, step_model, probes)
        train_seconds = time.perf_counter() - t0 - ((probes.total_seconds - probed) if probes else 0.0)
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
                          "optimizer": optimizer.state_dict(), "generators": [g.get_state() for g in generators],
                          **({"probes": probes.state()} if probes else {})})
        progress.epoch_end(record)
    if result.status == "completed":
        result.shifts = evaluate_shifts(model, data, cfg)
    if probes is not None:
        result.probe_rows, result.probe_seconds = probes.rows, probes.seconds
    return result
