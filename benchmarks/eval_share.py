"""How much of each run's time goes to evaluation, read from a finished experiment's run folders.

    python benchmarks/eval_share.py results/quick

Training time per epoch is samples / samples_per_s (both in metrics.csv); the rest of a run's
wall time is evaluation (eval mode, batch statistics, recomputed statistics) plus checkpoint and
CSV writes, so the share printed is an upper bound on evaluation's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from normbench import results


def shares(experiment: Path) -> pd.DataFrame:
    summaries, curves, _ = results.scan(experiment)
    rows = []
    for s in summaries:
        m = curves[s["run_id"]]
        samples = s["steps_per_epoch"] * s["config"]["batch_size"]
        train = float((samples / m.samples_per_s).sum())
        rows.append({"model": s["config"]["model"]["name"], "norm": s["config"]["norm"]["name"],
                     "batch_size": s["config"]["batch_size"], "wall_s": s["wall_seconds"], "train_s": train})
    return pd.DataFrame(rows)


def main() -> None:
    frame = shares(Path(sys.argv[1] if len(sys.argv) > 1 else "results/quick"))
    by = frame.groupby(["model", "norm", "batch_size"])[["wall_s", "train_s"]].sum()
    by["not_training_%"] = 100 * (1 - by.train_s / by.wall_s)
    print(by.round(2).to_string())
    total = 100 * (1 - frame.train_s.sum() / frame.wall_s.sum())
    print(f"\nall runs: {frame.wall_s.sum():.0f} s of runs, {total:.1f}% of it not training "
          "(evaluation, checkpoints, CSV writes)")


if __name__ == "__main__":
    main()
