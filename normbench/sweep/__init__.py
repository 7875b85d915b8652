"""Sweeps on Hydra's own multirun machinery, with resume.

A sweep runs in two passes over the same expansion:

1. plan (`planning`): every job of the grid is composed, validated (data present, model/norm
   compatible) and matched against its run folder, in this process, without any launcher:
   planning writes nothing and runs no Hydra callback. ``--dry-run`` stops here.
2. train: on this machine, normbench trains the configs the plan composed, one after another
   (`training`), or ``--jobs N`` at a time in worker processes (`workers`: longest first, CPU threads
   split between them, one GPU each where there are several). The workers start training while the
   main process plans; a sequential sweep of more than `OVERLAP_JOBS` jobs too (`planning.
   PlanningThread`). With another Hydra launcher (``hydra/launcher=slurm``, ...), that launcher runs
   every job once the plan is complete. A job skips itself when its folder already holds a finished
   run, and a run being trained holds a lock, so two sweeps over one folder never train a run twice.

Progress is read from the run folders (`watching`). Hydra is reached through `hydra_glue` alone.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from normbench import results
from normbench.config import run_id
from normbench.errors import UserError
from normbench.sweep.hydra_glue import (check_launcher, compose_primary, configured_launcher, hydra_multirun,
                                        launcher_of)
from normbench.sweep.planning import (RETRIED, CheckCache, Planned, PlanningThread, check_job, estimated_seconds,
                                      expand, iter_plan, plan, run_state, should_train, to_train)
from normbench.sweep.training import HydraTask, train_all, train_job
from normbench.sweep.watching import watching
from normbench.sweep.workers import Workers, cpu_cores

__all__ = ["RETRIED", "CheckCache", "Planned", "SweepOutcome", "Workers", "capped_jobs", "check_job",
           "check_launcher", "compose_primary", "configured_launcher", "cpu_cores", "expand", "hydra_multirun",
           "iter_plan", "launcher_of", "plan", "run", "run_state", "should_train", "to_train", "train_all",
           "train_job", "train_planned"]


@dataclass
class SweepOutcome:
    planned: list[Planned]
    retry_failed: bool = False
    outcomes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained(self) -> int:
        """Runs this sweep trained, the failed ones (`failed_now`) included; invalid ones are not."""
        return sum(1 for o in self.outcomes if not o.get("skipped") and o["status"] != "invalid")

    @property
    def failed_now(self) -> int:
        """Runs this sweep set out to train whose training failed."""
        return sum(1 for o in self.outcomes if not o.get("skipped") and o["status"] == "failed")

    @property
    def finished_elsewhere(self) -> int:
        """Runs another process finished while this sweep waited to train them."""
        return sum(1 for o in self.outcomes if o.get("skipped") and o["status"] in results.FINISHED)

    @property
    def already_done(self) -> int:
        """Runs finished before this sweep trained anything: at planning, or by another sweep meanwhile."""
        done = ("completed",) if self.retry_failed else ("completed", "diverged")
        return sum(1 for p in self.planned if p.state in done) + sum(
            1 for o in self.outcomes if o.get("skipped") and o["status"] in results.FINISHED)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(what, why) for every job without a result: invalid configs and failed runs, earlier ones too."""
        bad = {p.label: p.error for p in self.planned if p.state == "invalid"}
        bad.update({run_id(p.cfg): p.error or "failed" for p in self.planned
                    if p.state == "failed" and not self.retry_failed})
        bad.update({o["run_id"]: o.get("error") or o["status"] for o in self.outcomes
                    if o["status"] in ("failed", "invalid")})
        return list(bad.items())

    @property
    def experiment_dirs(self) -> list[Path]:
        return sorted({results.experiment_dir(p.cfg) for p in self.planned if p.cfg is not None})


WORKER_MEMORY_GB = 0.8  # what one --jobs worker holds (torch, a decoded dataset, a small model), measured


def _available_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def capped_jobs(jobs: int) -> tuple[int, str | None]:
    """`jobs`, capped by the cores and by the memory available for workers; a note says why when capped."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UserError(f"--jobs must be a whole number, at least 1, got {jobs!r}")
    limits = {"cores": cpu_cores()}
    memory = _available_memory_gb()
    if memory is not None:
        limits["GB of memory available"] = max(1, int(memory / WORKER_MEMORY_GB))
    why, cap = min(((w, n) for w, n in limits.items()), key=lambda wn: wn[1])
    if jobs <= cap:
        return jobs, None
    amount = f"{memory:.1f} GB of memory available, {WORKER_MEMORY_GB} GB a worker" if why != "cores" else \
        f"{cap} cores"
    return cap, f"--jobs {jobs} capped at {cap}: this machine has {amount}"


OVERLAP_JOBS = 200  # a sequential sweep of more jobs trains while it is planned; a smaller one plans first


def _sequential(overrides, config_dir, retry_failed: bool, display, shown) -> SweepOutcome:
    """Train on this machine, one run after another. A sweep of at most OVERLAP_JOBS jobs is planned
    completely first, so an error anywhere in it stops the sweep before any training; a larger one trains
    each run as soon as it is planned (an error found later stops the sweep after the run in training),
    and shows the whole sweep's progress once its plan is complete."""
    planner = PlanningThread(overrides, config_dir, shown)
    planner.start()
    try:
        planner.expanded.wait()
        if planner.total is None or planner.total <= OVERLAP_JOBS:
            planner.join()
        outcome = SweepOutcome(planner.planned, retry_failed)
        with ExitStack() as stack:
            watched = []

            def watch() -> None:
                if not watched:
                    watched.append(stack.enter_context(watching(planner.planned, retry_failed, display)))

            def todo():
                for p in planner:
                    if planner.done.is_set():
                        watch()
                    if p.state != "invalid" and should_train(p.state, retry_failed):
                        yield p
                watch()

            outcome.outcomes = train_all(todo(), retry_failed, display)
        return outcome
    finally:
        planner.stop()


def _join(workers: Workers, retry_failed: bool) -> list[dict]:
    """The workers' outcomes; runs another sweep was training are waited for and taken up here."""
    outcomes = workers.join()
    for i, o in enumerate(outcomes):
        if o["status"] == "busy":
            outcomes[i] = train_job(workers.offered[i].cfg, retry_failed, wait=True)
    return outcomes


# What one extra worker process costs before its first run: importing torch and loading the data
# (a 4-run sweep of tiny runs took 21 s with --jobs 2 against 13 s sequentially; this project's 2-core CPU).
# NORMBENCH_WORKER_START_SECONDS sets it for another machine; 0 always starts the --jobs workers.
WORKER_START_SECONDS = 6.0


def worker_start_seconds() -> float:
    """What starting one --jobs worker costs, in seconds: NORMBENCH_WORKER_START_SECONDS (unset or empty: ours)."""
    text = os.environ.get("NORMBENCH_WORKER_START_SECONDS")
    if text is None or not text.strip():
        return WORKER_START_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise UserError(f"NORMBENCH_WORKER_START_SECONDS must be a number of seconds >= 0, got {text!r}")
    return value


def paying_jobs(planned: list[Planned], jobs: int, retry_failed: bool) -> tuple[int, str | None]:
    """How many workers the planned training pays for: each extra worker must save more time (its share
    of the estimated training time) than it costs to start. With a note when that is fewer than asked."""
    todo = to_train(planned, retry_failed)
    start = worker_start_seconds()  # read first: a bad NORMBENCH_WORKER_START_SECONDS is an error either way
    if not todo:
        return 1, None  # nothing to train: no worker to pay for, and nothing to say about it
    seconds = estimated_seconds(todo)
    n = jobs
    while n > 1 and seconds * (1 - 1 / n) < start * (n - 1):
        n -= 1
    if n == jobs:
        return jobs, None
    how = "sequentially" if n == 1 else f"with --jobs {n}"
    return n, (f"--jobs {jobs}: about {max(1, round(seconds))} s of training is too little to pay for starting "
               f"{jobs - n} more worker process{'es' if jobs - n > 1 else ''} (about {start:.0f} s "
               f"each), so it trains {how}")


def train_planned(planned: list[Planned], jobs: int = 1, retry_failed: bool = False, display=None) -> SweepOutcome:
    """Train a complete plan on this machine: sequentially, or with as many of `jobs` workers as its estimated
    training time pays for. (`run` does this for a small sweep; the claims suite for the union of its plans.)"""
    jobs, note = paying_jobs(planned, jobs, retry_failed)
    if note and display is not None:
        display.note(note)
    outcome = SweepOutcome(planned, retry_failed)
    with ExitStack() as stack:
        workers = stack.enter_context(Workers(jobs, retry_failed)) if jobs > 1 else None
        with watching(planned, retry_failed, display, training=workers.training if workers else None):
            if workers is None:
                outcome.outcomes = train_all(to_train(planned, retry_failed), retry_failed, display)
            else:
                for p in planned:
                    workers.offer(p)
                outcome.outcomes = _join(workers, retry_failed)
    return outcome


def check_jobs(jobs: int, launcher: str) -> None:
    """--jobs starts processes on this machine: refused with another Hydra launcher."""
    if jobs > 1 and launcher != "basic":
        raise UserError(f"--jobs runs processes on this machine; with hydra/launcher={launcher}, set that "
                        "launcher's own parallelism instead (e.g. hydra.launcher.array_parallelism)")


def jobs_note(planned: list[Planned], jobs: int, retry_failed: bool) -> str | None:
    """For --dry-run: what `run` would say about --jobs for this plan (a bad NORMBENCH_WORKER_START_SECONDS
    is refused as `run` refuses it)."""
    if jobs <= 1 or len(planned) > OVERLAP_JOBS:
        return None  # a large sweep starts its workers while it plans: they pay for themselves
    return paying_jobs(planned, jobs, retry_failed)[1]


def run(overrides: list[str], config_dir: str | Path | None = None, *, jobs: int = 1, retry_failed: bool = False,
        display=None) -> SweepOutcome:
    """Plan the sweep, then train every job that is not finished yet. Failures are recorded, not raised.

    On this machine the configs the plan composed are trained directly, `jobs` at a time; another
    Hydra launcher (``hydra/launcher=slurm``, ...) is given the sweep's overrides and runs the jobs itself.
    """
    t0 = time.perf_counter()
    launcher = configured_launcher(overrides, config_dir)
    check_jobs(jobs, launcher)
    check_launcher(launcher)
    shown = display.planned if display is not None else (lambda p: None)
    if launcher == "basic" and jobs > 1 and len(expand(overrides, config_dir)) <= OVERLAP_JOBS:
        # small: planned in seconds, then workers only if they pay
        outcome = train_planned(plan(overrides, config_dir, shown), jobs, retry_failed, display)
    elif launcher == "basic" and jobs > 1:
        with Workers(jobs, retry_failed) as workers:
            def on_planned(p: Planned) -> None:
                shown(p)
                workers.offer(p)  # training starts while the rest is planned

            planned = plan(overrides, config_dir, on_planned)
            outcome = SweepOutcome(planned, retry_failed)
            with watching(planned, retry_failed, display, training=workers.training):
                outcome.outcomes = _join(workers, retry_failed)
    elif launcher == "basic":
        outcome = _sequential(overrides, config_dir, retry_failed, display, shown)
    else:
        planned = plan(overrides, config_dir, shown)
        outcome = SweepOutcome(planned, retry_failed)
        if to_train(planned, retry_failed):
            with watching(planned, retry_failed, display):
                outcome.outcomes = hydra_multirun(overrides, HydraTask(retry_failed), config_dir)
    outcome.seconds = time.perf_counter() - t0
    return outcome
