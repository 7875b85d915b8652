"""Sweeps on Hydra's own multirun machinery, with resume.

`hydra.compose()` has no multirun; the entry that ``@hydra.main`` uses does. The
names imported from ``hydra._internal`` below, and the basic sweeper that the grids
sweeper plugin (``hydra_plugins/normbench_sweeper``) extends, are the only Hydra
internals normbench touches; ``tests/test_sweep.py`` checks them, so a Hydra upgrade
that moves them fails loudly there rather than quietly here.

A sweep runs in two passes over the same expansion:

1. plan: the grids sweeper expands the jobs, and every job is composed by Hydra's
   config loader, validated (data present, model/norm compatible) and matched
   against its run folder, in this process, without any launcher: planning writes
   nothing and runs no Hydra callback. ``--dry-run`` stops here. With ``--jobs N``
   each planned job goes to the workers at once, so training starts while planning
   goes on.
2. train: on this machine, normbench trains the configs the plan composed, one
   after another or ``--jobs N`` at a time in worker processes (longest first, CPU
   threads split between them, one GPU each where there are several). With
   another Hydra launcher (``hydra/launcher=slurm``, ...), that launcher runs every
   job. Either way a job skips itself when its folder already holds a finished run,
   and a run being trained holds a lock, so two sweeps over one folder never train
   a run twice: each skips what the other is training and comes back to it at the end.
"""

from __future__ import annotations

import functools
import heapq
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from normbench import results
from normbench.config import CONFIG_MODULE, Config, clean_hydra_error, config_hash, run_id, search_path_overrides
from normbench.config import to_config
from normbench.errors import ResultsError, UserError
from normbench.train import Progress

def _hydra() -> Hydra:
    """A fresh Hydra on the packaged configs (a user config dir comes in through the overrides)."""
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    return Hydra.create_main_hydra2(task_name="normbench", config_search_path=search_path)


def hydra_multirun(overrides: list[str], task_function, config_dir: str | Path | None = None) -> list:
    """Run `task_function` on every job of a Hydra sweep; return the jobs' return values in order."""
    try:
        batches = _hydra().multirun(config_name="config", task_function=task_function,
                                    overrides=list(overrides) + search_path_overrides(config_dir, overrides))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        raise UserError(clean_hydra_error(e)) from e
    finally:
        GlobalHydra.instance().clear()
    return [job.return_value for batch in batches for job in batch]


def compose_primary(overrides: list[str], config_dir: str | Path | None = None):
    """The sweep's primary config (multirun mode) and the Hydra that composed it."""
    hydra = _hydra()
    try:
        return hydra, hydra.compose_config("config", list(overrides) + search_path_overrides(config_dir, overrides),
                                           run_mode=RunMode.MULTIRUN)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        GlobalHydra.instance().clear()
        raise UserError(clean_hydra_error(e)) from e


def launcher_of(primary) -> str:
    """The Hydra launcher the sweep asks for (command line, preset or user config): 'basic' unless set."""
    return primary.hydra.runtime.choices.get("hydra/launcher") or "basic"


def configured_launcher(overrides: list[str], config_dir: str | Path | None = None) -> str:
    try:
        return launcher_of(compose_primary(overrides, config_dir)[1])
    finally:
        GlobalHydra.instance().clear()


def _check_bookkeeping(primary) -> None:
    """Hydra's own folders (used by other launchers) stay inside results_dir, like every result."""
    try:
        root = Path(primary.results_dir).expanduser().resolve()
        for key in ("sweep", "run"):
            where = primary.hydra[key].dir
            if where is not None:
                results.inside(root, Path(where).expanduser())
    except UserError as e:
        raise UserError(f"hydra.sweep.dir / hydra.run.dir must stay inside results_dir: {e}") from None
    except OmegaConfBaseException as e:
        raise UserError(clean_hydra_error(e)) from e


def _expand(hydra, primary) -> list[list[str]]:
    """Every job's overrides, as the grids sweeper expands them (Hydra's basic sweeper is the same without grids)."""
    from hydra_plugins.normbench_sweeper.grids_sweeper import expand_jobs

    sweeper = primary.hydra.sweeper
    target = str(sweeper.get("_target_", ""))
    if not target.endswith((".GridsSweeper", ".BasicSweeper")):
        raise UserError(f"normbench plans sweeps with its grids sweeper (or Hydra's basic one), not {target}")
    batch = sweeper.get("max_batch_size")
    if batch is not None and batch < 1 and batch != -1:
        raise UserError(f"hydra.sweeper.max_batch_size must be >= 1, or -1 or null (all), got {batch}")
    arguments = [o for o in primary.hydra.overrides.task]
    try:
        return expand_jobs(hydra.config_loader, sweeper.get("params"), sweeper.get("grids"), arguments)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(clean_hydra_error(e)) from e


def run_state(cfg: Config, clean: bool = True) -> tuple[str, dict | None]:
    """The run folder's state: 'new', 'running' (unfinished or interrupted), 'busy' (being trained by
    another process now) or its finished status, with the summary it was read from (None when there is
    none for this config)."""
    folder = results.run_dir(cfg)
    summary = results.read_summary(folder)
    if summary is None or summary.get("config_hash") != config_hash(cfg):
        return ("busy" if results.is_locked(folder) else "new"), None
    status = summary.get("status")
    if status in results.FINISHED:
        if clean:  # leftovers of a kill beside a finished result; not on --dry-run, which writes nothing
            results.clean_finished(folder, summary)
        return status, summary
    return ("busy" if results.is_locked(folder) else "running"), summary


RETRIED = ("failed", "diverged")  # finished statuses that --retry-failed trains again


def should_train(state: str, retry_failed: bool) -> bool:
    return state in ("new", "running", "busy") or (retry_failed and state in RETRIED)


def to_train(planned: list[Planned], retry_failed: bool) -> list[Planned]:
    """The planned runs a sweep will train: valid, and not finished (or failed, with retry_failed)."""
    return [p for p in planned if p.state != "invalid" and should_train(p.state, retry_failed)]


@dataclass
class Planned:
    overrides: list[str]
    cfg: Config | None
    state: str  # new | running | busy | completed | diverged | failed | invalid
    error: str | None = None
    cost: float = 0.0  # estimated training cost, relative (runner.check): parallel sweeps start long runs first

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def check_job(overrides: list[str], dict_cfg, clean: bool = True) -> Planned:
    """Compose, validate and cost one job and look at its run folder. Trains and writes nothing."""
    from normbench.runner import check  # deferred: the runner imports torch models and data

    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        cfg = to_config(dict_cfg)
        cost = check(cfg)
        state, summary = run_state(cfg, clean)
    except UserError as e:
        return Planned(overrides, None, "invalid", str(e))
    return Planned(overrides, cfg, state, (summary or {}).get("error") if state == "failed" else None, cost)


def plan(overrides: list[str], config_dir: str | Path | None = None,
         on_planned: Callable[[Planned], None] | None = None, dry_run: bool = False) -> list[Planned]:
    """Expand a sweep and say, for every job, whether it is new, done, failed or invalid.

    Each planned job goes to `on_planned` (if given) as soon as it is planned.
    """
    from normbench.data import forget_failures

    hydra, primary = compose_primary(overrides, config_dir)
    forget_failures()
    try:
        _check_bookkeeping(primary)
        results.check_writable(Path(str(primary.results_dir)).expanduser(), create=False)
        planned = []
        for job in _expand(hydra, primary):
            try:
                dict_cfg = hydra.config_loader.load_sweep_config(primary, list(job))
                with open_dict(dict_cfg):
                    del dict_cfg["hydra"]  # as Hydra does before it calls a task function
            except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
                raise UserError(clean_hydra_error(e)) from e
            planned.append(check_job(list(job), dict_cfg, clean=not dry_run))
            if on_planned:
                on_planned(planned[-1])
        return planned
    finally:
        forget_failures()
        GlobalHydra.instance().clear()


def expand(overrides: list[str], config_dir: str | Path | None = None) -> list[list[str]]:
    """The overrides of every job of a sweep, without composing the jobs."""
    hydra, primary = compose_primary(overrides, config_dir)
    try:
        return _expand(hydra, primary)
    finally:
        GlobalHydra.instance().clear()


def train_job(cfg: Config, retry_failed: bool = False, display: Progress | None = None, wait: bool = False) -> dict:
    """Train one planned job unless its folder already holds a finished run; a failed run is recorded in the
    outcome, not raised. Whether to train is decided again under the run's lock: another sweep over the
    same folder may have finished the run meanwhile, or be training it now (then the outcome's status is
    "busy", unless `wait`, which waits for that sweep and trains the run only if it is still unfinished)."""
    from normbench.runner import execute  # deferred: the runner imports torch models and data

    outcome = {"run_id": run_id(cfg), "status": "new", "error": None}
    try:
        if wait:
            with results.run_lock(results.run_dir(cfg), wait=True):
                pass  # the other process is done with it (or died): its state decides below
        result = execute(cfg, display, replace=RETRIED if retry_failed else False)
        outcome["status"] = result.summary["status"]
        if not result.trained:
            outcome.update(skipped=True, error=result.summary.get("error"))
    except results.Busy:
        outcome.update(status="busy", skipped=True)
    except ResultsError as e:
        outcome.update(status="failed", error=str(e))
    except UserError as e:
        outcome.update(status="invalid", error=str(e))
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, and the sweep goes on
        outcome.update(status="failed", error=f"{type(e).__name__}: {e}")
    return outcome


def train_all(todo: list[Planned], retry_failed: bool, display: Progress | None = None,
              train: Callable[..., dict] = train_job) -> list[dict]:
    """Train the planned runs one after another; runs another sweep is training are taken up last."""
    outcomes = [train(p.cfg, retry_failed, display) for p in todo]
    for i, o in enumerate(outcomes):
        if o["status"] == "busy":
            outcomes[i] = train(todo[i].cfg, retry_failed, display, wait=True)
    return outcomes


@dataclass
class _Train:
    """Task function of the training pass under another Hydra launcher (SLURM, ...); picklable, so the
    launcher can ship it to its workers."""

    retry_failed: bool = False

    def __call__(self, dict_cfg) -> dict:
        return train_job(to_config(dict_cfg), self.retry_failed)


# ---- --jobs N: worker processes on this machine ---------------------------------------------------------

_worker_slot = 0  # in a worker process: its number, 0 .. jobs - 1


def _worker_start(slots, threads: int, parent: int) -> None:
    """Worker process setup: its slot number, its share of the CPU threads, and an exit when the sweep dies."""
    global _worker_slot
    _worker_slot = slots.get()
    torch.set_num_threads(threads)

    def exit_with_parent() -> None:  # a SIGKILLed sweep leaves no orphan training behind
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_train(cfg: Config, retry_failed: bool) -> dict:
    gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
    if gpus > 1:
        cfg.device = f"cuda:{_worker_slot % gpus}"  # each worker keeps to its own GPU
    return train_job(cfg, retry_failed)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, so taskset and cgroup cpusets count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """`jobs` worker processes that train planned runs as they are offered, longest estimated first.

    Runs can be offered while the sweep is still being planned, so planning and training overlap.
    Exactly `jobs` runs are in flight: each free worker takes the costliest run offered so far. Each
    worker gets cores // jobs torch threads (no oversubscription), keeps its decoded datasets between
    runs and, on a machine with several GPUs, keeps to GPU (its number mod the GPU count). Workers
    start by "spawn": a fork of a process that has run torch's thread pools can deadlock.
    """

    def __init__(self, jobs: int, retry_failed: bool = False, train: Callable[[Config, bool], dict] | None = None):
        self.jobs, self.retry_failed, self.train = jobs, retry_failed, train or _worker_train
        self.others = set(multiprocessing.active_children())  # child processes that are not our workers
        self.pool = self._start_pool()
        self.offered: list[Planned] = []
        self.waiting: list[tuple[float, int]] = []  # heap of (-cost, offer index)
        self.outcomes: dict[int, dict] = {}
        self.in_flight = 0
        self.closed = False
        self.changed = threading.Condition()
        self.dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self.dispatcher.start()

    def _start_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        slots = ctx.Queue()
        for k in range(self.jobs):
            slots.put(k)
        return ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_worker_start,
                                   initargs=(slots, max(1, cpu_cores() // self.jobs), os.getpid()))

    def offer(self, p: Planned) -> None:
        """Queue a planned run for training, if it needs training."""
        if not to_train([p], self.retry_failed):
            return
        with self.changed:
            heapq.heappush(self.waiting, (-p.cost, len(self.offered)))
            self.offered.append(p)
            self.changed.notify_all()

    def _dispatch(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: (self.waiting and self.in_flight < self.jobs) or
                                      (self.closed and not self.waiting))
                if not self.waiting:
                    return
                _, i = heapq.heappop(self.waiting)
                self.in_flight += 1
            try:
                future = self.pool.submit(self.train, self.offered[i].cfg, self.retry_failed)
            except BrokenProcessPool:  # a worker died (its runs are marked failed): carry on with fresh workers
                self.pool.shutdown(wait=False)
                self.pool = self._start_pool()
                future = self.pool.submit(self.train, self.offered[i].cfg, self.retry_failed)
            except RuntimeError:  # shut down: the sweep is stopping
                future = Future()
                future.cancel()
            future.add_done_callback(functools.partial(self._finished, i))

    def _finished(self, i: int, future) -> None:
        try:
            outcome = future.result()
        except CancelledError:
            outcome = {"run_id": run_id(self.offered[i].cfg), "status": "new", "error": None, "skipped": True}
        except Exception as e:  # noqa: BLE001 - a worker that died (out of memory, killed) fails its run
            outcome = {"run_id": run_id(self.offered[i].cfg), "status": "failed",
                       "error": f"its worker process died ({type(e).__name__}); run the sweep again to resume it"}
        with self.changed:
            self.outcomes[i] = outcome
            self.in_flight -= 1
            self.changed.notify_all()

    def join(self) -> list[dict]:
        """Wait for every offered run; their outcomes in the order they were offered."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
            self.changed.wait_for(lambda: len(self.outcomes) == len(self.offered))
        return [self.outcomes[i] for i in range(len(self.offered))]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:  # every run is done: the idle workers exit on their own while the report is written
            self.pool.shutdown(wait=False)
            return
        # Ctrl-C or a planning error: stop now; the runs resume from their checkpoints next time
        with self.changed:
            self.waiting.clear()
            self.closed = True
            self.changed.notify_all()
        for child in set(multiprocessing.active_children()) - self.others:
            child.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SweepOutcome:
    planned: list[Planned]
    retry_failed: bool = False
    outcomes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained(self) -> int:
        return sum(1 for o in self.outcomes if not o.get("skipped") and o["status"] != "invalid")

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


class _FolderWatcher(threading.Thread):
    """Counts finished runs from their folders, for a display that works whatever process trains them."""

    def __init__(self, planned: list[Planned], on_change, interval: float = 1.0):
        super().__init__(daemon=True)
        self.folders = {run_id(p.cfg): results.run_dir(p.cfg) for p in planned if p.cfg is not None}
        self.seen: dict[str, dict] = {}  # finished runs: their summaries are not read again
        self.on_change, self.interval = on_change, interval
        self.stop_event = threading.Event()

    def poll(self) -> dict[str, dict | None]:
        for rid, folder in self.folders.items():
            if rid not in self.seen:
                summary = results.read_summary(folder)
                if summary is not None and summary.get("status") in results.FINISHED:
                    self.seen[rid] = summary
        return {rid: self.seen.get(rid) for rid in self.folders}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.on_change(self.poll())

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.on_change(self.poll())


@contextmanager
def _watching(planned: list[Planned], retry_failed: bool, display):
    """Show the sweep's progress on `display` (if any) from the run folders, whoever trains the runs."""
    if display is None or not to_train(planned, retry_failed):
        yield
        return
    watcher = _FolderWatcher(planned, display.runs_changed)
    display.start_sweep(planned, retry_failed)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


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


def run(overrides: list[str], config_dir: str | Path | None = None, *, jobs: int = 1, retry_failed: bool = False,
        display=None) -> SweepOutcome:
    """Plan the sweep, then train every job that is not finished yet. Failures are recorded, not raised.

    On this machine the configs the plan composed are trained directly, `jobs` at a time; another Hydra
    launcher (``hydra/launcher=slurm``, ...) is given the sweep's overrides and runs the jobs itself.
    """
    t0 = time.perf_counter()
    launcher = configured_launcher(overrides, config_dir)
    if jobs > 1 and launcher != "basic":
        raise UserError(f"--jobs runs processes on this machine; with hydra/launcher={launcher}, set that "
                        "launcher's own parallelism instead (e.g. hydra.launcher.array_parallelism)")
    check_launcher(launcher)
    shown = display.planned if display is not None else (lambda p: None)
    if launcher == "basic" and jobs > 1:
        with Workers(jobs, retry_failed) as workers:
            def on_planned(p: Planned) -> None:
                shown(p)
                workers.offer(p)  # training starts while the rest is planned

            planned = plan(overrides, config_dir, on_planned)
            outcome = SweepOutcome(planned, retry_failed)
            with _watching(planned, retry_failed, display):
                outcome.outcomes = workers.join()
                for i, o in enumerate(outcome.outcomes):  # runs another sweep was training: wait for them
                    if o["status"] == "busy":
                        outcome.outcomes[i] = train_job(workers.offered[i].cfg, retry_failed, wait=True)
    else:
        planned = plan(overrides, config_dir, shown)
        outcome = SweepOutcome(planned, retry_failed)
        todo = to_train(planned, retry_failed)
        if todo:
            with _watching(planned, retry_failed, display):
                if launcher == "basic":
                    outcome.outcomes = train_all(todo, retry_failed, display)
                else:
                    outcome.outcomes = hydra_multirun(overrides, _Train(retry_failed), config_dir)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def check_launcher(launcher: str) -> None:
    """A launcher whose scheduler is not on this machine fails here, in one line, not deep in the plugin."""
    import shutil

    if "slurm" in launcher and shutil.which("sbatch") is None:
        raise UserError(f"hydra/launcher={launcher} submits to SLURM, but this machine has no 'sbatch' "
                        "on its PATH: run the sweep from a SLURM login node, or without hydra/launcher")
