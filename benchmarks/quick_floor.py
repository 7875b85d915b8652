"""The floor under a preset's time: its SGD steps in a bare PyTorch loop, and nothing else.

Expands the preset's sweep as `normbench sweep` does, groups its runs by model, norm and batch size,
and times each group's training step in the bare hand-written loop of benchmarks/throughput.py (same
model and optimizer, random data of the preset's image shape, the thread count normbench would give the
run on a quiet machine). Steps per run are the preset's: epochs x (train_size // batch_size). The floor
is the sum over runs of steps x seconds per step: what the preset's training costs before any
evaluation, data loading, process start, report, or normbench's own loop. A preset cannot run in less
than its floor without taking fewer steps.

    .venv/bin/python benchmarks/quick_floor.py                         # experiment=quick
    .venv/bin/python benchmarks/quick_floor.py --experiment claims/bn_batch --budget 0.5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from rich.console import Console
from rich.table import Table

from normbench import threads
from normbench.config import compose
from normbench.models import build_model, forward_work
from normbench.runner import norm_factory
from normbench.sweep.planning import expand
from normbench.train import make_optimizer
from throughput import bare_epoch, make_data  # this folder is on sys.path when the script runs

SHAPE = (1, 28, 28)  # MNIST and Fashion-MNIST; the presets measured here use them


def step_seconds(cfg, budget: float, repeats: int) -> tuple[float, int]:
    """Median seconds per bare training step of this config, and the threads it ran with."""
    model = build_model(cfg.model, SHAPE, 10, norm_factory(cfg), cfg.seed)
    macs = forward_work(model, SHAPE)[1]
    # cfg.threads as the run would take it; "busy" is left out: a quiet machine is the floor
    n_threads = cfg.threads if cfg.threads is not None else (
        1 if cfg.batch_size * macs < threads.SMALL_STEP_MACS else threads.cores())
    torch.set_num_threads(n_threads)
    opt = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(0)
    probe = make_data(cfg, 5, torch.device("cpu"), SHAPE, test=1)
    bare_epoch(model, probe, cfg.batch_size, opt, gen)  # warm-up
    start = time.perf_counter()
    bare_epoch(model, probe, cfg.batch_size, opt, gen)
    per_step = (time.perf_counter() - start) / 5
    steps = max(10, min(3000, int(budget / max(per_step, 1e-6))))
    data = make_data(cfg, steps, torch.device("cpu"), SHAPE, test=1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        bare_epoch(model, data, cfg.batch_size, opt, gen)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), n_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="quick")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    jobs = expand([f"experiment={args.experiment}"])
    groups: Counter = Counter()
    configs = {}
    for job in jobs:
        cfg = compose([f"experiment={args.experiment}", *job])
        key = (cfg.model.name, cfg.norm.name, cfg.batch_size)
        groups[key] += 1
        configs.setdefault(key, cfg)
    table = Table(title=f"experiment={args.experiment}: {len(jobs)} runs, bare PyTorch loop on cpu")
    for col in ("model", "norm", "batch", "runs", "steps/run", "threads", "ms/step", "seconds"):
        table.add_column(col, justify="right")
    total, by_model, total_steps = 0.0, Counter(), 0
    for key, cfg in sorted(configs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        steps = cfg.epochs * (cfg.data.train_size // cfg.batch_size)
        seconds, n_threads = step_seconds(cfg, args.budget, args.repeats)
        spent = groups[key] * steps * seconds
        total += spent
        by_model[key[0]] += spent
        total_steps += groups[key] * steps
        table.add_row(*map(str, key), str(groups[key]), f"{steps:,}", str(n_threads), f"{1e3 * seconds:.2f}",
                      f"{spent:.1f}")
    console = Console()
    console.print(table)
    parts = ", ".join(f"{m} {s:.0f} s" for m, s in by_model.items())
    console.print(f"floor: {total:.0f} s of training for {total_steps:,} SGD steps ({parts})")


if __name__ == "__main__":
    main()
