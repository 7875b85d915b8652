"""All file I/O of run results: run folders, atomic writes, reading them back.

A run folder ``<results_dir>/<experiment>/<run_id>/`` holds:

* ``config.yaml``: the resolved config;
* ``metrics.csv``: one row per epoch (columns: `METRIC_COLUMNS`);
* ``summary.json``: status (running / completed / diverged / failed), final metrics,
  timing, versions, git sha and config hash.

Every file is written to a temporary file in the same folder, flushed and renamed
over the target, so a reader sees the old file or the new one, never half of one.
``summary.json`` says ``completed`` only after everything else is on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from normbench.config import Config, run_id, to_dict
from normbench.errors import ResultsError, UserError

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "test_acc_batch_stats", "test_acc_precise", "seconds", "samples_per_s"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes that never finished (`atomic_write` in a process that was killed).

    The files they were to replace are intact, so nothing is lost. Call it only where no other process
    is writing: in a run folder when its run starts, in an experiment folder when its report is written.
    """
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: all or nothing.

    On a full disk or a permission error the old file (if any) stays as it was.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise ResultsError(f"could not write {path}: {e.strerror or e}; files already there are unchanged") from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def experiment_dir(cfg: Config) -> Path:
    """<results_dir>/<name>; the name cannot climb out of the results dir."""
    if not NAME_PATTERN.match(cfg.name):
        raise UserError(f"name {cfg.name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
    return Path(cfg.results_dir).expanduser() / cfg.name


def run_dir(cfg: Config) -> Path:
    return experiment_dir(cfg) / run_id(cfg)


def check_writable(path: Path) -> None:
    """Fail before training, not after, when results cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write results to {path}: {e.strerror or e}") from e


def write_config(folder: Path, cfg: Config) -> None:
    atomic_write(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_metrics(folder: Path, records: list) -> None:
    frame = pd.DataFrame([dataclasses.asdict(r) for r in records], columns=METRIC_COLUMNS)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write(folder / "metrics.csv", buffer.getvalue())


def write_summary(folder: Path, summary: dict) -> None:
    atomic_write(folder / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")


def read_summary(folder: Path) -> dict | None:
    """The run's summary, or None when it is missing or unreadable."""
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def read_metrics(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv")


@functools.cache
def versions() -> dict[str, str]:
    import torch
    import torchvision

    from normbench import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "normbench": __version__}


@functools.cache
def git_sha() -> str | None:
    """The commit of the normbench source, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


REQUIRED_SUMMARY_KEYS = ("run_id", "status", "config_hash", "config")
FINISHED = ("completed", "diverged", "failed")  # statuses of a run that is over; "running" is not


def scan(experiment: Path) -> tuple[list[dict], dict[str, pd.DataFrame], list[str]]:
    """Read every run folder of an experiment: (summaries, metrics per run id, warnings).

    Runs still going or interrupted (status running) are left out. A folder whose
    files are missing, unreadable or inconsistent is skipped with a warning naming it.
    """
    summaries, curves, warnings = [], {}, []
    for folder in sorted(p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / "summary.json").exists() and (folder / "config.yaml").exists():
            continue  # started, never wrote a summary: not a result
        summary = read_summary(folder)
        if not isinstance(summary, dict):
            warnings.append(f"skipped {folder}: no readable summary.json")
            continue
        missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
        if missing or not isinstance(summary.get("config"), dict):
            warnings.append(f"skipped {folder}: summary.json lacks {', '.join(missing) or 'config'}")
            continue
        if summary["status"] not in FINISHED:
            continue
        if summary["run_id"] != folder.name:
            warnings.append(f"skipped {folder}: summary.json belongs to run {summary['run_id']}")
            continue
        try:
            metrics = read_metrics(folder) if summary["status"] != "failed" else pd.DataFrame(columns=METRIC_COLUMNS)
        except (OSError, ValueError) as e:
            warnings.append(f"skipped {folder}: metrics.csv unreadable ({e})")
            continue
        if list(metrics.columns) != METRIC_COLUMNS:
            warnings.append(f"skipped {folder}: metrics.csv has columns {list(metrics.columns)}")
            continue
        summaries.append(summary)
        curves[summary["run_id"]] = metrics
    return summaries, curves, warnings


def write_table(path: Path, frame: pd.DataFrame, index: bool = False) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=index)
    atomic_write(path, buffer.getvalue())


def write_figure(path_stem: Path, figure) -> list[Path]:
    """Save a matplotlib figure as PNG and SVG, atomically; returns the paths."""
    paths = []
    for ext in ("png", "svg"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=ext, dpi=120, bbox_inches="tight")
        path = path_stem.with_suffix(f".{ext}")
        atomic_write(path, buffer.getvalue())
        paths.append(path)
    return paths


def read_sweeps(experiment: Path) -> list[dict]:
    try:
        return json.loads((experiment / "sweeps.json").read_text())
    except (OSError, ValueError):
        return []


def record_sweep(experiment: Path, entry: dict) -> None:
    """Append one sweep invocation (command, timing, counts) to <experiment>/sweeps.json."""
    atomic_write(experiment / "sweeps.json", json.dumps(read_sweeps(experiment) + [entry], indent=2) + "\n")


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict) -> None:
    """The training state after an epoch (see train.fit), atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(folder / CHECKPOINT, buffer.getvalue())


def load_checkpoint(folder: Path) -> dict | None:
    """The last epoch's training state, or None. Loaded with weights_only: a checkpoint cannot run code."""
    import torch

    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint means: start the run again
        return None


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
