"""normbench's training loop vs a minimal hand-written PyTorch loop, side by side in one process.

For each model x norm x batch size, both loops train the same model (same initial weights), on the
same in-memory data, with the same optimizer, for the same steps. Measurements alternate between
the two loops and keep the median, so drift in machine load hits both alike.

    python benchmarks/throughput.py                 # default grid, a few minutes on 2 CPU cores
    python benchmarks/throughput.py --full          # mlp, cnn, resnet20, rnn x every norm x batch 1..256
    python benchmarks/throughput.py --device cuda --csv benchmarks/cuda.csv

Columns: samples/s of each loop and their ratio; overhead, normbench's extra time per step (us);
data, the share of a step spent making batches as each model is usually fed: slicing, plus random
crops and flips for the conv nets (as on CIFAR); slicing alone for the MLP and RNN (as on MNIST).
The share of a run spent in evaluation is measured on real runs by benchmarks/eval_share.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from normbench.config import compose
from normbench.data import Data, train_batches
from normbench.errors import UserError
from normbench.models import build_model
from normbench.runner import norm_factory
from normbench.train import Progress
from normbench.train import LrSchedule, make_optimizer, resolve_device, train_one_epoch

MODELS = ("mlp", "cnn", "resnet20", "rnn")
NORMS = ["bn", "ln", "gn", "in", "none"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(cfg, steps: int, device: torch.device, shape=(1, 28, 28), test: int = 1000) -> Data:
    """Random images in memory: exactly `steps` batches a epoch, so one epoch is one measurement."""
    g = torch.Generator().manual_seed(0)
    n = steps * cfg.batch_size
    x = torch.randn(n, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    tx = torch.randn(test, *shape, generator=g).to(device)
    ty = torch.randint(0, 10, (test,), generator=g).to(device)
    return Data(x, y, tx, ty, 10, augment=cfg.data.augment, flip=False)


def bare_epoch(model, data: Data, batch_size: int, optimizer, generator) -> None:
    """The reference: what anyone would write by hand."""
    model.train()
    perm = torch.randperm(len(data.train_y), generator=generator).to(data.train_x.device)
    for start in range(0, len(perm) - batch_size + 1, batch_size):
        idx = perm[start: start + batch_size]
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def normbench_epoch(model, data: Data, cfg, optimizer, generators) -> None:
    train_one_epoch(model, data, cfg, optimizer, LrSchedule(cfg, optimizer, len(data.train_y) // cfg.batch_size),
                    0, generators, Progress())


def data_epoch(data: Data, cfg, generators) -> None:
    for x, y in train_batches(data, cfg.batch_size, *generators):
        pass


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bench_cell(model_name: str, norm: str, batch: int, device: torch.device, budget: float, repeats: int):
    choice = "gn8" if (model_name, norm) == ("resnet20", "gn") else norm  # 16-channel stage: 8 groups
    cfg = compose([f"model={model_name}", f"norm={choice}", f"batch_size={batch}", "data=synthetic"])
    model = build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), cfg.seed).to(device)
    probe = make_data(cfg, 5, device)
    gens = (torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(1))
    # Size the epoch so one measurement takes about `budget` seconds.
    opt = make_optimizer(cfg, model)
    per_step = timed(lambda: normbench_epoch(model, probe, cfg, opt, gens), device) / 5
    steps = max(10, min(2000, int(budget / max(per_step, 1e-6))))
    data = make_data(cfg, steps, device)

    ours_model, bare_model = copy.deepcopy(model), copy.deepcopy(model)
    ours_opt, bare_opt = make_optimizer(cfg, ours_model), make_optimizer(cfg, bare_model)
    conv = model_name in ("cnn", "resnet20")
    augmented = dataclasses.replace(data, augment=True, flip=True) if conv else data
    ours, bare, dat = [], [], []
    normbench_epoch(ours_model, data, cfg, ours_opt, gens)  # warm-up: first calls pay one-time costs
    bare_epoch(bare_model, data, batch, bare_opt, gens[0])
    for _ in range(repeats):  # alternate, so load changes hit both loops
        ours.append(timed(lambda: normbench_epoch(ours_model, data, cfg, ours_opt, gens), device))
        bare.append(timed(lambda: bare_epoch(bare_model, data, batch, bare_opt, gens[0]), device))
        dat.append(timed(lambda: data_epoch(augmented, cfg, gens), device))
    t_ours, t_bare, t_data = (statistics.median(v) for v in (ours, bare, dat))
    samples = steps * batch
    return {"model": model_name, "norm": norm, "batch_size": batch, "steps": steps,
            "normbench_samples_per_s": samples / t_ours, "bare_samples_per_s": samples / t_bare,
            "ratio": t_bare / t_ours, "overhead_us_per_step": 1e6 * (t_ours - t_bare) / steps,
            "data_share": t_data / t_ours}


def rnn_vs_torch(device: torch.device, batch: int = 64) -> pd.DataFrame:
    """The in-cell-norm LSTM/GRU (each norm) vs nn.LSTM / nn.GRU, side by side: benchmarks/rnn_cells.py."""
    from rnn_cells import run  # this folder is on sys.path when the script runs

    return run(str(device), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every model x norm x batch size 1..256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--csv", type=Path, default=None, help="where to write the table (default: print only)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    console = Console()
    if args.full:
        grid = [(m, n, b) for m in MODELS for n in NORMS for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    else:
        grid = [(m, n, b) for m in ("mlp", "cnn") for n in ("bn", "gn", "none") for b in (2, 16, 128)]
        grid += [("resnet20", "bn", b) for b in (2, 128)] + [("rnn", "ln", b) for b in (4, 64)]
    rows = []
    with console.status("benchmarking") as status:
        for model, norm, batch in grid:
            status.update(f"{model} {norm} batch {batch}")
            try:
                rows.append(bench_cell(model, norm, batch, device, args.budget, args.repeats))
            except UserError as e:  # an invalid pair: in on mlp/rnn, bn at batch 1 on flat features
                console.print(f"skipped {model} {norm} batch {batch}: {e}")
    frame = pd.DataFrame(rows)
    table = Table(title=f"normbench loop vs bare PyTorch loop on {device} ({torch.get_num_threads()} threads)")
    for col in ("model", "norm", "batch", "normbench/s", "bare/s", "ratio", "overhead us", "data %"):
        table.add_column(col, justify="right")
    for r in frame.itertuples():
        table.add_row(r.model, r.norm, str(r.batch_size), f"{r.normbench_samples_per_s:,.0f}",
                      f"{r.bare_samples_per_s:,.0f}", f"{r.ratio:.2f}", f"{r.overhead_us_per_step:.0f}",
                      f"{100 * r.data_share:.1f}")
    console.print(table)
    rnn = pd.DataFrame(rnn_vs_torch(device))
    console.print(rnn.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
        rnn.to_csv(args.csv.with_name(args.csv.stem + "-rnn.csv"), index=False)
        console.print(f"written: {args.csv}")


if __name__ == "__main__":
    main()
