"""The in-cell-norm LSTM/GRU vs nn.LSTM / nn.GRU: milliseconds per forward + backward, side by side.

    python benchmarks/rnn_cells.py                  # batch 64, hidden 128, 28 steps, 2 threads, CPU
    python benchmarks/rnn_cells.py --csv benchmarks/results/cpu-rnn.csv

For each cell x norm, three things are timed in turn, repeat after repeat: normbench's cell, the
same cell forced through its per-step loop (the reference the fused paths are tested against,
and what every cell with a norm ran before them), and PyTorch's cell of the same size. Medians
over the repeats (and the ratio of the fastest repeats, which load disturbs least); alternating
means drift in machine load hits all three alike. The load average (os.getloadavg, 1 minute) is
printed beside each row: on a shared machine only ratios measured side by side compare, and a
busy machine slows the multithreaded kernels of both sides by tens of times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from normbench.config import compose
from normbench.models import build_model
from normbench.runner import norm_factory

CELLS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
NORMS = ("none", "bn", "ln", "gn")


def _timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(cell: str, norm: str, x: torch.Tensor, hidden: int, repeats: int, inner: int) -> dict:
    """Median seconds per forward + backward of normbench's cell, its step loop and torch.nn's."""
    cfg = compose(["model=rnn", f"model.cell={cell}", f"model.hidden_size={hidden}", f"norm={norm}",
                   "data=synthetic"])
    ours = build_model(cfg.model, (1, x.shape[0], x.shape[2]), 10, norm_factory(cfg), 0).cell.to(x.device)
    loop = build_model(cfg.model, (1, x.shape[0], x.shape[2]), 10, norm_factory(cfg), 0).cell.to(x.device)
    loop.use_loop = True
    ref = CELLS[cell](x.shape[2], hidden).to(x.device)
    runs = {"normbench": lambda: ours(x).sum().backward(), "loop": lambda: loop(x).sum().backward(),
            "torch_nn": lambda: ref(x)[0][-1].sum().backward()}
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: first calls pay one-time costs
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_timed(fn, inner))
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed repeat: load only ever adds time
    return {"cell": cell, "norm": norm, "batch_size": x.shape[1], "normbench_ms": ms["normbench"],
            "loop_ms": ms["loop"], "torch_nn_ms": ms["torch_nn"],
            "slowdown_vs_torch_nn": ms["normbench"] / ms["torch_nn"],
            "loop_slowdown_vs_torch_nn": ms["loop"] / ms["torch_nn"],
            "best_slowdown_vs_torch_nn": best["normbench"] / best["torch_nn"], "load_1min": os.getloadavg()[0]}


def run(device: str = "cpu", batch: int = 64, hidden: int = 128, steps: int = 28, repeats: int = 9,
        inner: int = 2, progress=lambda row: None) -> pd.DataFrame:
    x = torch.randn(steps, batch, 28, device=device)  # (T, N, features): a batch of row-by-row MNIST
    rows = []
    for cell in CELLS:
        for norm in NORMS:
            rows.append(measure(cell, norm, x, hidden, repeats, inner))
            progress(rows[-1])
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--csv", type=Path, default=None, help="where to write the table (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads)")
    table = run(args.device, args.batch, repeats=args.repeats,
                progress=lambda r: print(f"{r['cell']} {r['norm']}: {r['slowdown_vs_torch_nn']:.2f}x", flush=True))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"written: {args.csv}")


if __name__ == "__main__":
    main()
