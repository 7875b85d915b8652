"""Wall time of the commands that train nothing, each started as a fresh process, as a user types it.

    python benchmarks/startup.py              # 5 repeats of each command, the median printed
    python benchmarks/startup.py --repeats 9

Commands: --version, list, config, sweep --dry-run of a 4-run grid, and report of a folder of 40
finished runs (fabricated by benchmarks/planning.py's fabricate_runs, so no training is needed).
Targets (issue 15): --version and list under 0.5 s, config under 1 s. Repeats run in turn (command A,
B, C, ..., then again), so a burst of load on a shared machine spreads over all of them; the load
average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from planning import fabricate_runs

TARGETS = {"--version": 0.5, "list": 0.5, "config": 1.0}


def commands(tmp: Path) -> dict[str, list[str]]:
    experiment = fabricate_runs(tmp / "done", 1)  # 40 finished runs
    return {
        "--version": ["--version"],
        "list": ["list"],
        "config": ["config", "data=synthetic", "norm=gn", "batch_size=4"],
        "sweep --dry-run (4 runs)": ["sweep", "--dry-run", "data=synthetic", "norm=bn,ln", "seed=0,1",
                                     f"results_dir={tmp / 'empty'}"],
        "report (40 runs)": ["report", str(experiment)],
    }


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "normbench", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"normbench {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-1000:]}{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="normbench-startup-") as tmp:
        runs = commands(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in runs}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, argv in runs.items():
                times[name].append(timed(argv))
    print(f"load average (1 min) at start: {load:.2f}, at end: {os.getloadavg()[0]:.2f}; {args.repeats} repeats")
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'target s':>9}")
    for name, seconds in times.items():
        target = TARGETS.get(name)
        median = statistics.median(seconds)
        mark = "" if target is None else f"{target:>9.1f}" + ("  ok" if median < target else "  over")
        print(f"{name:<28} {median:>9.2f} {min(seconds):>7.2f} {mark}")


if __name__ == "__main__":
    main()
