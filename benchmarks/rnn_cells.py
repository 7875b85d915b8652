"""The in-cell-norm LSTM/GRU vs nn.LSTM / nn.GRU: milliseconds per forward + backward, side by side.

    python benchmarks/rnn_cells.py                  # batch 64, hidden 128, 28 steps, 2 threads, CPU
    python benchmarks/rnn_cells.py --csv benchmarks/results/cpu-rnn.csv
    python benchmarks/rnn_cells.py --cells lstm --norms ln gn --repeats 31

Every model is built first; then each repeat times, in turn, every cell's `nn.LSTM` / `nn.GRU`
and, for every norm, normbench's cell (on the C step kernels where they are built: the first line
printed says), the same cell on PyTorch's kernels alone (what it runs without a C compiler), and the
same cell forced through its per-step loop (the reference the fast paths are tested against, and
what every cell with a norm ran before them).
A repeat's ratio divides a cell's time by the time of PyTorch's cell in the same repeat, so drift
in the machine's load hits both sides of it alike; the table gives the median of those ratios over
the repeats (and the median milliseconds). The load average is printed before and after: on a
shared machine only ratios measured side by side compare, and a busy machine slows the
multithreaded kernels of both sides by tens of times.
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
from normbench.kernels import build
from normbench.models import build_model
from normbench.runner import norm_factory

CELLS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
NORMS = ("none", "bn", "ln", "gn")


def _timed(fn, inner: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def _cell(cell: str, norm: str, x: torch.Tensor, hidden: int) -> torch.nn.Module:
    cfg = compose(["model=rnn", f"model.cell={cell}", f"model.hidden_size={hidden}", f"norm={norm}",
                   "data=synthetic"])
    return build_model(cfg.model, (1, x.shape[0], x.shape[2]), 10, norm_factory(cfg), 0).cell.to(x.device)


def run(device: str = "cpu", batch: int = 64, hidden: int = 128, steps: int = 28, repeats: int = 15,
        inner: int = 2, cells=tuple(CELLS), norms=NORMS) -> pd.DataFrame:
    """One row per cell x norm: median ms of each side and the median of the per-repeat ratios."""
    x = torch.randn(steps, batch, 28, device=device)  # (T, N, features): a batch of row-by-row MNIST
    runs = {}  # (cell, norm, side) -> forward + backward
    for cell in cells:
        ref = CELLS[cell](x.shape[2], hidden).to(device)
        runs[cell, None, "torch_nn"] = lambda ref=ref: ref(x)[0][-1].sum().backward()
        for norm in norms:
            ours, loop = _cell(cell, norm, x, hidden), _cell(cell, norm, x, hidden)
            loop.use_loop = True
            runs[cell, norm, "normbench"] = lambda m=ours: m(x).sum().backward()
            runs[cell, norm, "pytorch"] = _without_c(lambda m=ours: m(x).sum().backward())
            runs[cell, norm, "loop"] = lambda m=loop: m(x).sum().backward()
    sync = (lambda: torch.cuda.synchronize(device)) if x.device.type == "cuda" else (lambda: None)
    for fn in runs.values():  # warm-up: first calls pay one-time costs
        fn()
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(_timed(fn, inner, sync))
    rows = []
    for cell in cells:
        ref = times[cell, None, "torch_nn"]
        for norm in norms:
            ours, torch_only, loop = (times[cell, norm, side] for side in ("normbench", "pytorch", "loop"))
            rows.append({"cell": cell, "norm": norm, "batch_size": batch,
                         "normbench_ms": 1e3 * statistics.median(ours),
                         "pytorch_kernels_ms": 1e3 * statistics.median(torch_only),
                         "loop_ms": 1e3 * statistics.median(loop), "torch_nn_ms": 1e3 * statistics.median(ref),
                         "slowdown_vs_torch_nn": statistics.median(a / b for a, b in zip(ours, ref)),
                         "pytorch_kernels_slowdown_vs_torch_nn": statistics.median(
                             a / b for a, b in zip(torch_only, ref)),
                         "loop_slowdown_vs_torch_nn": statistics.median(a / b for a, b in zip(loop, ref)),
                         "kernels": build.status() if device == "cpu" else "pytorch", "repeats": repeats})
    return pd.DataFrame(rows)


def _without_c(fn):
    """`fn` run with the C kernels out of reach, as on a machine without a compiler."""
    def call():
        saved, build.library = build.library, lambda: None
        try:
            fn()
        finally:
            build.library = saved
    return call


def ratio_table(table: pd.DataFrame) -> str:
    """Markdown: slowdown against torch.nn per cell x norm; on PyTorch's kernels alone, and through the
    step loop, in brackets."""
    norms = list(dict.fromkeys(table["norm"]))
    lines = ["| cell | " + " | ".join(norms) + " |", "|---" * (len(norms) + 1) + "|"]
    for cell, rows in table.groupby("cell", sort=False):
        by_norm = {r.norm: r for r in rows.itertuples()}
        cells = [f"{by_norm[n].slowdown_vs_torch_nn:.2f}×" + ("" if n == "none" else
                 f" ({by_norm[n].pytorch_kernels_slowdown_vs_torch_nn:.2f}×, "
                 f"{by_norm[n].loop_slowdown_vs_torch_nn:.2f}×)") for n in norms]
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    parser.add_argument("--csv", type=Path, default=None, help="where to write the table (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())  # noqa: E731
    print(f"kernels: {build.status() if args.device == 'cpu' else 'pytorch'}")
    print(f"load before: {load()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", flush=True)
    table = run(args.device, args.batch, repeats=args.repeats, cells=args.cells, norms=args.norms)
    print(f"load after: {load()}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nslowdown vs torch.nn, median of per-repeat ratios (on PyTorch's kernels alone, and through the step "
          "loop, in brackets):")
    print(ratio_table(table))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"written: {args.csv}")


if __name__ == "__main__":
    main()
