"""The optimizer's per-parameter loop vs its multi-tensor ("foreach") form, side by side in one process.

PyTorch picks the multi-tensor form of SGD and Adam by default only for CUDA tensors; on CPU each
parameter gets its own few kernels, launched from Python. At small batches a training step is
mostly such launches, so the optimizer's share of it is large. For each config this trains two copies
of the same model (same weights, data and steps) in the bare loop of benchmarks/throughput.py, one
with each form, alternating the measurements; it reports the median time per step, their ratio, and
whether the two copies end bitwise identical (they must: the forms do the same arithmetic).

    .venv/bin/python benchmarks/optimizer_impl.py [--budget 0.4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from normbench.config import compose
from normbench.models import build_model
from normbench.runner import norm_factory
from throughput import bare_epoch, make_data  # this folder is on sys.path when the script runs

GRID = [("mlp", norm, batch, "sgd") for norm in ("bn", "ln", "none") for batch in (2, 32)] + [
    ("cnn", "bn", 2, "sgd"), ("cnn", "gn", 32, "sgd"), ("mlp", "bn", 2, "adam"), ("mlp", "ln", 32, "adamw")]


def optimizer(cfg, model, foreach: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=o.momentum, weight_decay=1e-4, foreach=foreach)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return opt(model.parameters(), lr=1e-3, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
               foreach=foreach)


def bench(model_name: str, norm: str, batch: int, optim: str, budget: float, repeats: int) -> dict:
    cfg = compose([f"model={model_name}", f"norm={norm}", f"batch_size={batch}", f"optim={optim}", "data=synthetic"])
    torch.set_num_threads(1)  # the thread count normbench gives these small steps; least disturbed
    base = build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), 0)
    nets = {form: copy.deepcopy(base) for form in (False, True)}
    opts = {form: optimizer(cfg, nets[form], form) for form in nets}
    gens = {form: torch.Generator().manual_seed(0) for form in nets}
    probe = make_data(cfg, 5, torch.device("cpu"))
    start = time.perf_counter()
    bare_epoch(copy.deepcopy(base), probe, batch, optimizer(cfg, copy.deepcopy(base), False), torch.Generator())
    steps = max(10, min(2000, int(budget * 5 / (time.perf_counter() - start))))
    data = make_data(cfg, steps, torch.device("cpu"))
    times = {form: [] for form in nets}
    for _ in range(repeats + 1):  # the first round warms up both
        for form in nets:
            start = time.perf_counter()
            bare_epoch(nets[form], data, batch, opts[form], gens[form])
            times[form].append((time.perf_counter() - start) / steps)
    loop, multi = (statistics.median(times[form][1:]) for form in (False, True))
    same = all(torch.equal(a, b) for a, b in zip(nets[False].state_dict().values(), nets[True].state_dict().values()))
    return {"config": f"{model_name} {norm} batch {batch} {optim}", "loop": loop, "multi": multi, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    table = Table("config", "per-parameter (us/step)", "foreach (us/step)", "ratio", "bitwise identical")
    for cell in GRID:
        r = bench(*cell, args.budget, args.repeats)
        table.add_row(r["config"], f"{1e6 * r['loop']:.0f}", f"{1e6 * r['multi']:.0f}",
                      f"{r['multi'] / r['loop']:.3f}", "yes" if r["same"] else "NO")
    Console().print(f"torch {torch.__version__}, 1 thread; ratio < 1: foreach is faster")
    Console().print(table)


if __name__ == "__main__":
    main()
