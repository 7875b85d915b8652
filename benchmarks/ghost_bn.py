"""Cost of ghost batch norm against plain BN at the same SGD batch, measured side by side.

Times one training step (forward, backward, SGD update) of the MLP and the CNN at batch 64 on
random data: plain BN (norm_batch_size null), ghost BN at several norm_batch_size values, and
PyTorch's own nn.BatchNorm (what normbench built before ghost BN existed: the cost of the
switch when off). The variants run in alternation, repeated, and the report gives the median
time per step and its ratio to plain BN. Each timing takes about `--seconds` (the steps are
counted from plain BN's warm-up), so the MLP's 2 ms steps are timed as well as the CNN's 75 ms.

    .venv/bin/python benchmarks/ghost_bn.py [--repeats 7] [--seconds 0.5] [--threads 1] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normbench.config import compose
from normbench.models import build_model
from normbench.norms import BatchNorm1d, BatchNorm2d, norm_batches
from normbench.runner import norm_factory

BATCH = 64


def build(model: str) -> nn.Module:
    cfg = compose(["data=synthetic", f"model={model}", "norm=bn"])
    return build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), 0)


def torch_bn(net: nn.Module) -> nn.Module:
    """The same net with every BN as PyTorch's own class (same state)."""
    for m in net.modules():
        if isinstance(m, (BatchNorm1d, BatchNorm2d)):
            m.__class__ = nn.BatchNorm1d if isinstance(m, BatchNorm1d) else nn.BatchNorm2d
    return net


def time_steps(net: nn.Module, nbs: int | None, x, y, steps: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    with norm_batches(net, nbs):
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="about how long each timing takes")
    parser.add_argument("--threads", type=int, default=1, help="1: least disturbed by other processes")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    print("| model | variant | ms/step (median) | ratio to plain BN |\n|---|---|---|---|")
    for model in args.models.split(","):
        variants = {"plain BN": (build(model), None), "torch nn.BatchNorm": (torch_bn(build(model)), None)}
        variants |= {f"ghost NBS={n}": (build(model), n) for n in (2, 8, 32)}
        times = {name: [] for name in variants}
        steps = max(3, round(args.seconds / time_steps(*variants["plain BN"], x, y, 5)))
        for _ in range(args.repeats):  # alternate, so drifts in machine speed hit every variant alike
            for name, (net, nbs) in variants.items():
                time_steps(net, nbs, x, y, 3)  # warm-up
                times[name].append(time_steps(net, nbs, x, y, steps))
        base = statistics.median(times["plain BN"])
        for name, t in times.items():
            print(f"| {model} | {name} | {1e3 * statistics.median(t):.2f} | {statistics.median(t) / base:.3f} |")


if __name__ == "__main__":
    main()
