"""Sweeps on Hydra's own multirun machinery, with resume.

`hydra.compose()` has no multirun; the entry that ``@hydra.main`` uses does. The
names imported from ``hydra._internal`` below, and the basic sweeper that the grids
sweeper plugin (``hydra_plugins/normbench_sweeper``) extends, are the only Hydra
internals normbench touches; ``tests/test_sweep.py`` checks them, so a Hydra upgrade
that moves them fails loudly there rather than quietly here.

A sweep runs in two passes over the same expansion:

1. plan: every job is composed, validated (data present, model/norm compatible)
   and matched against its run folder, always with Hydra's basic launcher, in
   this process. ``--dry-run`` stops here.
2. train: the configured launcher (basic, joblib, submitit, ...) runs every job;
   each job skips itself when its folder already holds a finished run.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from normbench import results
from normbench.config import CONFIG_MODULE, Config, clean_hydra_error, config_hash, run_id, search_path_overrides
from normbench.config import to_config
from normbench.errors import ResultsError, UserError
from normbench.train import Progress

def hydra_multirun(overrides: list[str], task_function, config_dir: str | Path | None = None) -> list:
    """Run `task_function` on every job of a Hydra sweep; return the jobs' return values in order."""
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    try:
        hydra = Hydra.create_main_hydra2(task_name="normbench", config_search_path=search_path)
        batches = hydra.multirun(config_name="config", task_function=task_function,
                                 overrides=list(overrides) + search_path_overrides(config_dir))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        raise UserError(clean_hydra_error(e)) from e
    finally:
        GlobalHydra.instance().clear()
    return [job.return_value for batch in batches for job in batch]


def run_state(cfg: Config) -> tuple[str, dict | None]:
    """The run folder's state: 'new', 'running' (unfinished or interrupted) or its finished status,
    with the summary it was read from (None when there is none for this config)."""
    summary = results.read_summary(results.run_dir(cfg))
    if summary is None or summary.get("config_hash") != config_hash(cfg):
        return "new", None
    status = summary.get("status")
    return (status if status in results.FINISHED else "running"), summary


def should_train(state: str, retry_failed: bool) -> bool:
    return state in ("new", "running") or (retry_failed and state in ("failed", "diverged"))


def to_train(planned: list[Planned], retry_failed: bool) -> list[Planned]:
    """The planned runs a sweep will train: valid, and not finished (or failed, with retry_failed)."""
    return [p for p in planned if p.state != "invalid" and should_train(p.state, retry_failed)]


@dataclass
class Planned:
    overrides: list[str]
    cfg: Config | None
    state: str  # new | running | completed | diverged | failed | invalid
    error: str | None = None

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


class _Plan:
    """Task function of the planning pass: compose, validate, look at the run folder. Trains nothing."""

    def __call__(self, dict_cfg) -> Planned:
        from normbench.runner import check  # deferred: the runner imports torch models and data

        overrides = list(HydraConfig.get().overrides.task)
        overrides = [o for o in overrides if not o.startswith("hydra")]
        try:
            cfg = to_config(dict_cfg)
            check(cfg)
        except UserError as e:
            return Planned(overrides, None, "invalid", str(e))
        state, summary = run_state(cfg)
        return Planned(overrides, cfg, state, (summary or {}).get("error") if state == "failed" else None)


# The display of the sweep running in this process, if any; jobs in other processes see None.
_display: Progress | None = None


@dataclass
class _Train:
    """Task function of the training pass; picklable, so any launcher can ship it to its workers."""

    retry_failed: bool = False
    threads: int | None = None
    spread_gpus: bool = False  # local parallel jobs: job k trains on GPU k mod (number of GPUs)

    def __call__(self, dict_cfg) -> dict:
        from normbench.runner import execute

        cfg = to_config(dict_cfg)
        if self.spread_gpus and cfg.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            cfg.device = f"cuda:{HydraConfig.get().job.num % torch.cuda.device_count()}"
        state, previous = run_state(cfg)
        outcome = {"run_id": run_id(cfg), "status": state, "error": None}
        if not should_train(state, self.retry_failed):
            outcome.update(skipped=True, error=(previous or {}).get("error"))
            return outcome
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            summary = execute(cfg, _display).summary
            outcome["status"] = summary["status"]
        except ResultsError as e:
            outcome.update(status="failed", error=str(e))
        except UserError as e:
            outcome.update(status="invalid", error=str(e))
        except Exception as e:  # noqa: BLE001 - a failed run is recorded, and the sweep goes on
            outcome.update(status="failed", error=f"{type(e).__name__}: {e}")
        return outcome


def plan(overrides: list[str], config_dir: str | Path | None = None) -> list[Planned]:
    """Expand a sweep and say, for every job, whether it is new, done, failed or invalid."""
    return hydra_multirun(list(overrides) + ["hydra/launcher=basic"], _Plan(), config_dir)


def launcher_overrides(jobs: int) -> list[str]:
    """--jobs N: N runs at once through hydra-joblib-launcher (processes; threads divided between them)."""
    if jobs <= 1:
        return []
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        raise UserError("--jobs needs hydra-joblib-launcher: pip install 'normbench[joblib]'")
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]


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
    def failures(self) -> list[tuple[str, str]]:
        """(what, why) for every job without a result: invalid configs and failed runs, earlier ones too."""
        bad = {p.label: p.error for p in self.planned if p.state == "invalid"}
        bad.update({run_id(p.cfg): p.error or "failed" for p in self.planned
                    if p.state == "failed" and not self.retry_failed})
        bad.update({o["run_id"]: o.get("error") or "failed" for o in self.outcomes if o["status"] == "failed"})
        return list(bad.items())

    @property
    def experiment_dirs(self) -> list[Path]:
        return sorted({results.experiment_dir(p.cfg) for p in self.planned if p.cfg is not None})


class _FolderWatcher(threading.Thread):
    """Counts finished runs from their folders, for a display that works whatever process trains them."""

    def __init__(self, planned: list[Planned], on_change, interval: float = 1.0):
        super().__init__(daemon=True)
        self.folders = {run_id(p.cfg): results.run_dir(p.cfg) for p in planned if p.cfg is not None}
        self.on_change, self.interval = on_change, interval
        self.stop_event = threading.Event()

    def poll(self) -> dict[str, dict | None]:
        return {rid: results.read_summary(folder) for rid, folder in self.folders.items()}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.on_change(self.poll())

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.on_change(self.poll())


def run(overrides: list[str], config_dir: str | Path | None = None, *, jobs: int = 1, retry_failed: bool = False,
        display=None) -> SweepOutcome:
    """Plan the sweep, then train every job that is not finished yet. Failures are recorded, not raised."""
    global _display
    t0 = time.perf_counter()
    launch = launcher_overrides(jobs)
    planned = plan(overrides, config_dir)
    outcome = SweepOutcome(planned, retry_failed)
    if to_train(planned, retry_failed):
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        watcher = _FolderWatcher(planned, display.runs_changed) if display else None
        if display:
            display.start_sweep(planned, retry_failed)
            watcher.start()
        _display = display if jobs <= 1 else None
        try:
            task = _Train(retry_failed, threads, spread_gpus=jobs > 1)
            outcome.outcomes = hydra_multirun(list(overrides) + launch, task, config_dir)
        finally:
            _display = None
            if watcher:
                watcher.stop()
    outcome.seconds = time.perf_counter() - t0
    return outcome
