"""Planning a sweep: every job expanded, composed, validated and matched against its run folder.

Planning writes nothing (a finished run's leftovers are cleaned only when the plan is for training)
and runs no Hydra callback or launcher. It scales to sweeps of many thousand jobs:

* composition: each distinct combination of config-group choices is composed by Hydra once, and a
  job's other overrides are applied to a copy of it (`composing.JobComposer`);
* validation: every job's config is typed and range-checked (`normbench.config.validate`), as a
  single run's is;
* the checks that load data and build the model (`runner.check`) run once per distinct combination
  of the settings they read (`CheckCache`), so a grid over seeds and learning rates builds one
  model per model/norm/batch combination, and each dataset is read once.

`iter_plan` yields the jobs one by one, and `PlanningThread` runs it beside the training, so a long
sweep can train its first runs before planning ends.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

from normbench import results
from normbench.config import Config, config_hash, run_id
from normbench.config.ids import NOT_HASHED
from normbench.errors import UserError
from normbench.sweep.composing import JobComposer, finish
from normbench.sweep.hydra_glue import check_bookkeeping, compose_primary, expand_jobs

RETRIED = ("failed", "diverged")  # finished statuses that --retry-failed trains again


@dataclass
class Planned:
    overrides: list[str]
    cfg: Config | None
    state: str  # new | running | busy | completed | diverged | failed | invalid | duplicate (of an earlier job)
    error: str | None = None
    cost: float = 0.0  # estimated training cost, relative (runner.check): parallel sweeps start long runs first
    run_id: str | None = None  # of `cfg`, computed once (it hashes the whole config)

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


# Seconds of training per unit of the planner's cost (runner.check), plus a fixed cost per run (setup,
# evaluation), fitted by least squares on the 282 runs of the quick preset and the claims suite on this
# project's 2-core CPU (normbench 0.3). Another machine will differ: the estimate is what this one would take,
# to size a sweep and to decide whether worker processes pay, not a promise. Totals: quick 265 s of runs,
# estimated 353 s; claims 399 s, estimated 311 s. A run of a few seconds can take several times its estimate.
SECONDS_PER_COST = 1.03e-10
SECONDS_PER_RUN = 0.43
ESTIMATE_NOTE = ("the planner's estimate: within 1.4× of the quick and claims presets' totals here; "
                 "runs of a few seconds can take several times theirs")


def estimated_seconds(planned: list[Planned]) -> float:
    """The planner's estimate of the training time of `planned`, in seconds on a 2-core CPU."""
    return sum(p.cost for p in planned) * SECONDS_PER_COST + len(planned) * SECONDS_PER_RUN


def should_train(state: str, retry_failed: bool) -> bool:
    return state in ("new", "running", "busy", "damaged") or (retry_failed and state in RETRIED)


def to_train(planned: list[Planned], retry_failed: bool) -> list[Planned]:
    """The planned runs a sweep will train: valid, and not finished (or failed, with retry_failed)."""
    return [p for p in planned if p.state != "invalid" and should_train(p.state, retry_failed)]


def run_state(cfg: Config, clean: bool = True, rid: str | None = None) -> tuple[str, dict | None]:
    """The run folder's state: 'new', 'running' (unfinished or interrupted), 'damaged' (its summary cannot be
    trusted: it is kept aside and the run trained again), 'busy' (being trained by
    another process now) or its finished status, with the summary it was read from (None when there is
    none for this config). `rid`: the config's run id, when already known."""
    folder = results.run_dir(cfg, rid)
    results.check_run_folder(folder)
    if clean:
        results.adopt_legacy(cfg, folder)  # a finished run under its 0.2 name (gn8, bn_shared) moves here
    legacy = None if clean else results.legacy_summary(cfg, folder)  # --dry-run: report it, move nothing
    summary = legacy[1] if legacy else results.read_summary(folder)
    if not results.sound(summary, legacy[0] if legacy else folder, config_hash(cfg)):
        if results.is_locked(folder):
            return "busy", None
        # damaged: kept aside (runner.execute) and trained again
        return ("damaged" if not legacy and results.damaged_result(folder) else "new"), None
    status = summary.get("status")
    if status in results.FINISHED:
        if clean:  # leftovers of a kill beside a finished result; not on --dry-run, which writes nothing
            results.clean_finished(folder, summary)
        return status, summary
    return ("busy" if results.is_locked(folder) else "running"), summary


# Settings that runner.check does not read (it reads the data, model and norm configs, the batch size,
# the epochs and where results go): jobs that differ only in these share one check and its cost.
NOT_CHECKED = ("seed", "lr", "lr_scaling", "base_batch_size", "optim", "eval", "eval_batch_size", "device",
               "checkpoint", "keep_checkpoint", "perf", "norm_batch_size")


class CheckCache:
    """`runner.check` (data present, model and norm compatible, batch fits, results writable; cost) once
    per distinct combination of the settings it reads; its refusal or its cost is kept for the rest."""

    def __init__(self):
        self.outcomes: dict[str, float | str] = {}  # its cost, or why it is refused

    def __call__(self, cfg: Config) -> float:
        from normbench.runner import check  # deferred: the runner imports torch models and data

        key = repr([getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_CHECKED])
        if key not in self.outcomes:
            try:
                self.outcomes[key] = check(cfg)
            except UserError as e:
                self.outcomes[key] = str(e)
        outcome = self.outcomes[key]
        if isinstance(outcome, str):
            raise UserError(outcome)  # a fresh one: a re-raised exception would grow its traceback each time
        return outcome


def check_job(overrides: list[str], composed, clean: bool = True, check: Callable[[Config], float] | None = None
              ) -> Planned:
    """Validate (`composing.finish`) and cost one composed job and look at its run folder. Trains and writes
    nothing."""
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        cfg = finish(composed)
        cost = (check or CheckCache())(cfg)
        rid = run_id(cfg)
        state, summary = run_state(cfg, clean, rid)
    except UserError as e:
        return Planned(overrides, None, "invalid", str(e))
    return Planned(overrides, cfg, state, (summary or {}).get("error") if state == "failed" else None, cost, rid)


def duplicate(planned: Planned, of: Planned) -> Planned:
    """`planned` marked as the same run as the earlier job `of`: the settings that tell them apart are not
    part of the run id (a sweep over `threads`) or mean the same (norm_batch_size equal to batch_size is
    BN over the whole batch, as null is), so the run is trained once, for the earlier job."""
    mine = [o for o in planned.overrides if o not in of.overrides]
    theirs = [o for o in of.overrides if o not in planned.overrides]
    keys = sorted({o.lstrip("+~").split("=", 1)[0] for o in mine + theirs})
    unhashed = bool(keys) and all(k in NOT_HASHED for k in keys)
    why = (f"{' '.join(mine) or planned.label} is the same run as {' '.join(theirs) or of.label}"
           + (f" ({', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not part of the run id)" if unhashed
              else " (the same config once its values are resolved)" if keys else "")
           + ": trained once")
    return dataclasses.replace(planned, state="duplicate", error=why)


def duplicate_notes(planned: list[Planned]) -> list[str]:
    """One note per distinct way jobs repeat an earlier job's run, with how many jobs do, when more than one."""
    counts: dict[str, int] = {}
    for p in planned:
        if p.state == "duplicate":
            counts[str(p.error)] = counts.get(str(p.error), 0) + 1
    return [text + (f" ({n} jobs)" if n > 1 else "") for text, n in counts.items()]


def iter_plan(overrides: list[str], config_dir: str | Path | None = None, dry_run: bool = False,
              on_expanded: Callable[[int], None] | None = None) -> Iterator[Planned]:
    """Expand a sweep and yield, job by job, whether it is new, done, failed or invalid, or the same run as an
    earlier job (settings outside the run id, such as `threads`, are all that differ: trained once).

    A config that Hydra cannot compose (a typo, a value of the wrong type) stops the sweep with a
    `UserError`; a config that composes but cannot run is planned as invalid, and planning goes on.
    `on_expanded` is told the number of jobs before the first is planned.
    """
    from normbench.data import forget_failures

    hydra, primary = compose_primary(overrides, config_dir)
    forget_failures()
    try:
        check_bookkeeping(primary)
        results.check_writable(Path(str(primary.results_dir)).expanduser(), create=False)
        composer, check = JobComposer(hydra, primary), CheckCache()
        jobs = expand_jobs(hydra, primary)
        if on_expanded:
            on_expanded(len(jobs))
        first: dict[str, Planned] = {}  # run id -> the job that plans it
        for job in jobs:
            planned = check_job(job, composer.compose(job), clean=not dry_run, check=check)
            if planned.run_id is not None:
                if planned.run_id in first:
                    planned = duplicate(planned, first[planned.run_id])
                else:
                    first[planned.run_id] = planned
            yield planned
    finally:
        forget_failures()
        GlobalHydra.instance().clear()


class PlanningThread(threading.Thread):
    """`iter_plan` in a thread, so that a long sweep trains its first runs while the rest is planned.

    Iterating over it gives the planned jobs in order, as they come; `planned` holds those so far,
    `expanded` is set once the number of jobs (`total`) is known and `done` once planning has ended.
    A planning error is raised in the iterating thread before it takes the next job.
    """

    _END = object()

    def __init__(self, overrides: list[str], config_dir: str | Path | None = None,
                 on_planned: Callable[[Planned], None] | None = None):
        super().__init__(daemon=True, name="normbench-planning")
        self.on_planned = on_planned or (lambda p: None)
        self.jobs = iter_plan(overrides, config_dir, on_expanded=self._expanded)
        self.planned: list[Planned] = []
        self.total: int | None = None
        self.error: BaseException | None = None
        self.expanded, self.done, self.stopping = threading.Event(), threading.Event(), threading.Event()
        self._handed: queue.Queue = queue.Queue()

    def _expanded(self, total: int) -> None:
        self.total = total
        self.expanded.set()

    def run(self) -> None:
        try:
            for p in self.jobs:
                if self.stopping.is_set():
                    break
                self.planned.append(p)
                self.on_planned(p)
                self._handed.put(p)
        except BaseException as e:  # noqa: BLE001 - raised in the thread that takes the jobs
            self.error = e
        finally:
            self.jobs.close()  # iter_plan's cleanup (Hydra's global state) runs in this thread
            self.expanded.set()
            self.done.set()
            self._handed.put(self._END)

    def __iter__(self) -> Iterator[Planned]:
        while self.error is None and (p := self._handed.get()) is not self._END:
            yield p
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def plan(overrides: list[str], config_dir: str | Path | None = None,
         on_planned: Callable[[Planned], None] | None = None, dry_run: bool = False) -> list[Planned]:
    """Every job of the sweep planned (`iter_plan`); each goes to `on_planned` (if given) as soon as it is."""
    planned = []
    for p in iter_plan(overrides, config_dir, dry_run):
        planned.append(p)
        if on_planned:
            on_planned(p)
    return planned


def expand(overrides: list[str], config_dir: str | Path | None = None) -> list[list[str]]:
    """The overrides of every job of a sweep, without composing the jobs."""
    hydra, primary = compose_primary(overrides, config_dir)
    try:
        return expand_jobs(hydra, primary)
    finally:
        GlobalHydra.instance().clear()
