"""Sweeps at scale: planning 1,000 and 10,000 jobs (--dry-run), and the report of 10,000 run folders.

    python benchmarks/planning.py                  # dry-run of 1,000 and 10,000 jobs, report of 10,000 runs
    python benchmarks/planning.py --runs 2000      # a smaller report, e.g. on a loaded machine

Each command runs as its own process; its wall time and its peak resident memory (from os.wait4, the
child's own rusage) are printed. The grid is norm x batch_size x lr x seed on the synthetic data (no
files needed): 4 x 5 x 2 x 25 = 1,000 or x 250 = 10,000 jobs. For the report, finished run folders are
fabricated in a temporary folder (planned by the sweep planner, so ids, hashes and configs are real;
metrics are made up, two epochs each). The machine's load average is printed with the numbers, since
on a shared machine it moves them. Targets (issue 15): dry-run of 10,000 under 60 s and 1.5 GB, report
of 10,000 under 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["data=synthetic", "model=mlp", "norm=bn,ln,gn,none", "batch_size=2,4,8,16,32", "lr=0.05,0.1", "epochs=2"]


def grid(seeds: int, results_dir: Path) -> list[str]:
    return [*GRID, f"seed=range({seeds})", f"results_dir={results_dir}"]


def measured(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one command run as a child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            output.seek(0)
            sys.exit(f"{' '.join(command[:6])} ... failed ({code}): {output.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, code


def fabricate_runs(results_dir: Path, seeds: int) -> Path:
    """Finished run folders for the grid with `seeds` seeds (a summary, metrics of 2 epochs, the config),
    as normbench writes them; returns the experiment folder."""
    from normbench import results
    from normbench.config import config_hash, effective_lr, to_dict
    from normbench.sweep import plan

    rng = random.Random(0)
    columns = results.METRIC_COLUMNS
    for p in plan(grid(seeds, results_dir), dry_run=True):
        cfg, folder = p.cfg, results.run_dir(p.cfg, p.run_id)
        folder.mkdir(parents=True)
        records = []
        for epoch in (1, 2):
            acc = 80 + 10 * rng.random()
            records.append({"epoch": epoch, "step": epoch * 100, "lr": cfg.lr, "train_loss": 1 / epoch,
                            "train_acc": acc, "test_loss": 1.1 / epoch, "test_acc": acc - 1,
                            "test_acc_batch_stats": acc - 2, "test_acc_precise": acc - 1.5, "seconds": 1.0,
                            "samples_per_s": 5000.0})
        (folder / "metrics.csv").write_text(",".join(columns) + "\n" + "".join(
            ",".join(str(r[c]) for c in columns) + "\n" for r in records))
        results.write_config(folder, cfg)
        summary = {"run_id": p.run_id, "config_hash": config_hash(cfg), "status": "completed", "error": None,
                   "traceback": None, "diverged_step": None, "epochs": 2, "epochs_completed": 2,
                   "steps_per_epoch": 100, "steps": 200, "effective_lr": effective_lr(cfg), "final": records[-1],
                   "best_test_acc": max(r["test_acc"] for r in records), "wall_seconds": 2.0,
                   "num_parameters": 1000, "device": "cpu", "threads": 1, "config": to_dict(cfg)}
        (folder / "summary.json").write_text(json.dumps(summary))
    return results_dir / "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="run folders for the report (a multiple of 40)")
    args = parser.parse_args()
    normbench = [sys.executable, "-m", "normbench"]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'command':<44} {'seconds':>8} {'peak MB':>8}")
    with tempfile.TemporaryDirectory(prefix="normbench-planning-") as tmp:
        for seeds in (25, 250):
            jobs = 40 * seeds
            seconds, mb, _ = measured([*normbench, "sweep", "--dry-run", *grid(seeds, Path(tmp) / "empty")])
            print(f"{f'sweep --dry-run, {jobs:,} jobs':<44} {seconds:>8.1f} {mb:>8.0f}", flush=True)
        t0 = time.perf_counter()
        experiment = fabricate_runs(Path(tmp) / "done", args.runs // 40)
        print(f"(fabricated {args.runs:,} run folders in {time.perf_counter() - t0:.0f} s)", flush=True)
        seconds, mb, _ = measured([*normbench, "report", str(experiment)])
        print(f"{f'report, {args.runs:,} run folders':<44} {seconds:>8.1f} {mb:>8.0f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
