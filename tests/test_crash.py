"""A sweep killed with SIGKILL at several moments, then run again, gives the uninterrupted sweep's results."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from normbench import results

SWEEP = ["data=synthetic", "data.num_train=1024", "data.num_test=64", "model=mlp", "model.width=32",
         "norm=bn,ln", "batch_size=4,32", "seed=0", "epochs=3", "eval.precise_bn_samples=128"]
TIMING = {"wall_seconds", "samples_per_s", "wall_seconds_mean", "seconds", "config.results_dir"}  # + location


def sweep(results_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NORMBENCH_WORKER_START_SECONDS": "0"}  # tiny runs: workers even where they do not pay
    return subprocess.Popen([sys.executable, "-m", "normbench", "sweep", *SWEEP, f"results_dir={results_dir}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def statuses(experiment: Path) -> dict[str, str]:
    out = {}
    for folder in experiment.glob("*-s0-*"):
        summary = results.read_summary(folder)
        out[folder.name] = summary["status"] if summary else "none"
    return out


def kill_when(results_dir: Path, condition, *extra: str, timeout: float = 120) -> list[int]:
    """SIGKILL the sweep at the moment `condition` holds; return the pids of its children (workers) then."""
    proc = sweep(results_dir, *extra)
    deadline = time.monotonic() + timeout
    experiment = results_dir / "default"
    while time.monotonic() < deadline and proc.poll() is None:
        if experiment.exists() and condition(experiment):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the sweep ended before the moment to kill it"
    children = child_pids(proc.pid)
    proc.kill()  # SIGKILL: no handler runs, no finally block
    proc.wait()
    return children


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after the name: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def first_epoch_running(experiment: Path) -> bool:
    return any(s == "running" and not (experiment / rid / "metrics.csv").exists()
               for rid, s in statuses(experiment).items())


def checkpoint_written(experiment: Path) -> bool:
    return any((experiment / rid / results.CHECKPOINT).exists() for rid, s in statuses(experiment).items()
               if s == "running")


def between_runs(experiment: Path) -> bool:
    done = list(statuses(experiment).values())
    return done.count("completed") >= 2


def frame(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if c in TIMING]).sort_values("run_id" if "run_id" in df
                                                                               else list(df.columns[:4]))


def test_sigkill_at_several_moments_then_rerun_equals_uninterrupted(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert sweep(reference).wait() == 0

    for moment in (first_epoch_running, checkpoint_written, between_runs):
        kill_when(killed, moment)
    assert sweep(killed).wait() == 0

    ref, got = reference / "default", killed / "default"
    assert set(statuses(got).values()) == {"completed"} and len(statuses(got)) == 4
    runs = pd.read_csv(got / "runs.csv")
    assert runs.run_id.is_unique and len(runs) == 4
    summary = pd.read_csv(got / "summary.csv")
    assert not summary.duplicated(["model", "norm", "batch_size"]).any()
    for table in ("runs.csv", "summary.csv"):
        pd.testing.assert_frame_equal(frame(got / table).reset_index(drop=True),
                                      frame(ref / table).reset_index(drop=True))
    for run in statuses(ref):
        a = results.read_metrics(ref / run).drop(columns=["seconds", "samples_per_s"])
        b = results.read_metrics(got / run).drop(columns=["seconds", "samples_per_s"])
        pd.testing.assert_frame_equal(a, b)
        assert not (got / run / results.CHECKPOINT).exists()
    assert not list(got.rglob(".*.tmp"))  # no half-written files left behind
    assert json.loads((got / "sweeps.json").read_text())[-1]["trained"] >= 1


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
def test_sigkill_of_a_parallel_sweep_leaves_no_worker_running_and_a_rerun_finishes_it(tmp_path):
    workers = kill_when(tmp_path, first_epoch_running, "--jobs", "2")
    assert workers, "the sweep had no worker processes"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "orphaned workers went on training"
    assert sweep(tmp_path, "--jobs", "2").wait() == 0
    assert set(statuses(tmp_path / "default").values()) == {"completed"}
    assert len(statuses(tmp_path / "default")) == 4
    assert not list((tmp_path / "default").rglob(".*.tmp"))
