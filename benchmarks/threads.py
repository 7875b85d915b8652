"""Threads per run on a quiet and on a busy CPU: what `threads: null` (chosen by the work) buys.

Part 1 times training steps of the MLP and the CNN at several batch sizes with 1 thread and with
every core, first on a quiet machine, then while one other CPU-bound process (a torch matmul loop
using every core, as another training job would) shares it. Part 2 runs one small sweep four ways:
quiet and busy, each with `threads=null` (normbench's choice) and with one thread per core (torch's
default, what normbench did before). Ratios within a part come from one run of this script.

    .venv/bin/python benchmarks/threads.py [--data-root ../shared/data/mnist-t10k-split] [--skip-sweep] [--skip-steps]

Run it on an otherwise idle machine: the "quiet" rows assume nothing else runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from normbench import threads
from normbench.config import compose
from normbench.models import build_model, forward_work
from normbench.runner import norm_factory

ROOT = Path(__file__).resolve().parent.parent
HOG = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


@contextmanager
def competitor(active: bool):
    """One other CPU-bound process on every core while the block runs."""
    if not active:
        yield
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads.cores())}
    hog = subprocess.Popen([sys.executable, "-c", HOG], env=env)
    time.sleep(2.0)  # let it start
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def step_rate(model: str, batch: int, n_threads: int, seconds: float) -> float:
    """Training samples per second of one model at one batch size and thread count."""
    torch.set_num_threads(n_threads)
    cfg = compose(["data=synthetic", f"model={model}", "norm=bn"])
    net = build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def part1(seconds: float) -> None:
    every = threads.cores()
    print(f"## Training steps: samples/s with 1 thread and with {every} (one per core)\n")
    print(f"| machine | model | batch | MACs/step | 1 thread | {every} threads | {every} vs 1 | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [("mlp", b) for b in (2, 8, 32, 128)] + [("cnn", b) for b in (2, 8, 32)]
    for busy in (False, True):
        with competitor(busy):
            for model, batch in cases:
                cfg = compose(["data=synthetic", f"model={model}", "norm=bn"])
                macs = forward_work(build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), 0), (1, 28, 28))[1]
                one = statistics.median(step_rate(model, batch, 1, seconds) for _ in range(3))
                all_ = statistics.median(step_rate(model, batch, every, seconds) for _ in range(3))
                auto = threads.choose(None, batch, macs)
                print(f"| {'busy' if busy else 'quiet'} | {model} | {batch} | {batch * macs / 1e6:.1f}M | {one:,.0f} "
                      f"| {all_:,.0f} | {all_ / one:.2f} | {auto} |", flush=True)


def part2(data_root: str) -> None:
    grid = ["data=mnist", f"data.root={data_root}", "model=mlp,cnn", "norm=bn", "batch_size=4,32", "epochs=1",
            "data.train_size=2000", "data.test_size=500", "eval.precise_bn=false"]
    print("\n## One sweep (mlp, cnn x batch 4, 32; 1 epoch of 2000 images): wall seconds\n")
    print("| machine | threads=null (auto) | threads=" + str(threads.cores()) + " (torch default) |")
    print("|---|---|---|")
    for busy in (False, True):
        row = []
        for setting in ("null", str(threads.cores())):
            with tempfile.TemporaryDirectory() as tmp, competitor(busy):
                start = time.perf_counter()
                subprocess.run([str(ROOT / ".venv/bin/normbench"), "sweep", *grid, f"threads={setting}",
                                f"results_dir={tmp}"], check=True, capture_output=True)
                row.append(time.perf_counter() - start)
        print(f"| {'busy' if busy else 'quiet'} | {row[0]:.1f} | {row[1]:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/mnist-t10k-split"))
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {threads.cores()} cores, load {os.getloadavg()[0]:.2f} at the start\n")
    if not args.skip_steps:
        part1(args.seconds)
    if not args.skip_sweep:
        part2(args.data_root)


if __name__ == "__main__":
    main()
