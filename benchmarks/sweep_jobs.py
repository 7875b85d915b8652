"""Wall time of a whole sweep, sequential vs --jobs N, measured side by side in one run.

    python benchmarks/sweep_jobs.py --data-root ../shared/data/mnist-t10k-split            # quick, jobs 1 vs 2
    python benchmarks/sweep_jobs.py --data-root PATH --jobs 4 --repeats 3 -- model=mlp    # extra overrides

Each repeat runs `normbench sweep experiment=quick ...` once sequentially and once with --jobs N, in
alternating order, each into a fresh results folder, and times the whole command (startup, planning,
training, report). It also reads the CPU time the hypervisor took away (steal, from /proc/stat), since
on a shared virtual machine that noise can exceed the effect being measured. The ratio printed is of
the medians. Results go to benchmarks/results/sweep_jobs.csv.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent


def steal_seconds() -> float:
    """CPU seconds stolen by the hypervisor so far, all CPUs (0 where /proc/stat has no such column)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / 100 if len(fields) > 8 else 0.0


def timed_sweep(jobs: int, data_root: str, extra: list[str], experiment: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as out:
        command = [sys.executable, "-m", "normbench", "sweep", f"experiment={experiment}", f"data.root={data_root}",
                   f"results_dir={out}", "--jobs", str(jobs), *extra]
        steal, t0 = steal_seconds(), time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds, stolen = time.perf_counter() - t0, steal_seconds() - steal
    if done.returncode != 0:
        sys.exit(f"sweep failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"jobs": jobs, "seconds": round(seconds, 1), "steal_s": round(stolen, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding the dataset (MNIST/raw/...)")
    parser.add_argument("--experiment", default="quick")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "sweep_jobs.csv")
    parser.add_argument("overrides", nargs="*", help="extra sweep overrides")
    args = parser.parse_args()

    rows = []
    for r in range(args.repeats):
        for jobs in ((1, args.jobs) if r % 2 == 0 else (args.jobs, 1)):
            row = {"repeat": r, **timed_sweep(jobs, args.data_root, args.overrides, args.experiment)}
            print(f"repeat {r}: --jobs {jobs}: {row['seconds']:.1f} s (steal {row['steal_s']:.1f} CPU s)", flush=True)
            rows.append(row)
    frame = pd.DataFrame(rows)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False)
    sequential = statistics.median(frame[frame.jobs == 1].seconds)
    parallel = statistics.median(frame[frame.jobs == args.jobs].seconds)
    print(f"\n{args.experiment}: sequential {sequential:.1f} s, --jobs {args.jobs} {parallel:.1f} s (medians of "
          f"{args.repeats}): {sequential / parallel:.2f}x faster")


if __name__ == "__main__":
    main()
