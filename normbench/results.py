"""All file I/O of run results: run folders, atomic writes, locks, reading them back.

A run folder ``<results_dir>/<experiment>/<run_id>/`` holds:

* ``config.yaml``: the resolved config;
* ``metrics.csv``: one row per epoch (columns: `METRIC_COLUMNS`);
* ``summary.json``: status (running / completed / diverged / failed), final metrics,
  timing, versions, git sha and config hash.

The rules every write follows:

* **Atomic.** Every file is written to a temp file in the same folder, flushed, renamed over
  the target and the rename made durable (the folder is fsynced), so a reader sees the old
  file or the new one, never half of one. ``summary.json`` says ``completed`` only after
  everything else is on disk. Temp files end in `TEMP_SUFFIX`, so cleaning up after a killed
  write removes normbench's own files and nothing else.
* **Inside results_dir.** Experiment and run folders are resolved (symlinks followed) and must
  stay inside the resolved ``results_dir``; a folder that leads elsewhere is refused.
* **One trainer per run.** A run being trained holds an OS file lock
  (``<experiment>/.locks/<run_id>.lock``); the OS releases it when the process dies, however it dies.
* **The user's permissions.** Files get the mode the umask gives, as ``open()`` would.

Everything read back is untrusted: a damaged file is skipped with a warning, never a crash.
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
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from normbench.config import Config, dict_hash, run_id, to_dict
from normbench.errors import ResultsError, UserError

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "test_acc_batch_stats", "test_acc_precise", "seconds", "samples_per_s"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TEMP_SUFFIX = ".normbench-tmp"
LOCKS = ".locks"


def file_mode() -> int:
    """The mode open() would give a new file under the current umask (read without changing it, on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes that never finished (`atomic_write` in a process that was killed).

    The files they were to replace are intact, so nothing is lost. Only normbench's own temp files
    (`TEMP_SUFFIX`) are removed. Call it only where no other process is writing: in a run folder whose
    lock is held, in an experiment folder when its report is written.
    """
    try:
        for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
    except OSError:
        pass  # an unreadable folder: nothing of ours to clean


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power cut can undo the rename."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the data itself is on disk
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: all or nothing, and durable.

    On a full disk or a permission error the old file (if any) stays as it was. A symlink at `path`
    is replaced, never written through.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600: a teammate could not read a shared results dir
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise ResultsError(f"could not write {path}: {e.strerror or e}; files already there are unchanged") from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def results_root(cfg: Config) -> Path:
    """The resolved results_dir: it may itself be a symlink (to scratch space, say); nothing below it may."""
    return Path(cfg.results_dir).expanduser().resolve()


def inside(root: Path, path: Path) -> Path:
    """`path` with symlinks resolved, refused unless it stays inside `root` (already resolved)."""
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserError(f"{path} leads to {resolved}, outside results_dir {root}; "
                        "normbench writes only inside results_dir (remove the symlink)")
    return resolved


def experiment_dir(cfg: Config) -> Path:
    """<results_dir>/<name>; neither the name nor a symlink can lead out of the results dir."""
    if not NAME_PATTERN.match(cfg.name):
        raise UserError(f"name {cfg.name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
    root = results_root(cfg)
    return inside(root, root / cfg.name)


def run_dir(cfg: Config) -> Path:
    return inside(results_root(cfg), experiment_dir(cfg) / run_id(cfg))


def check_writable(path: Path, create: bool = True) -> None:
    """Fail before training, not after, when results cannot be written. With `create` false (planning,
    --dry-run) nothing is created: the nearest folder that exists must be writable."""
    try:
        if not create:
            existing = next(p for p in (path, *path.parents) if p.exists())
            if not existing.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            return
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe.", delete=True)  # not a TEMP_SUFFIX: a
        # report being written elsewhere cleans those up, and must not take this one from under us
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write results to {path}: {e.strerror or e}") from e


class Busy(UserError):
    """The run is being trained by another process right now."""

    def __init__(self, folder: Path):
        super().__init__(f"{folder} is being trained by another process; its result will appear there")


@contextmanager
def run_lock(folder: Path, wait: bool = False):
    """Hold the lock of the run in `folder` (an OS file lock, freed by the OS if this process dies).

    Raises `Busy` when another process holds it and `wait` is false.
    """
    with _lock(folder.parent / LOCKS / f"{folder.name}.lock", wait, lambda: Busy(folder)):
        yield


@contextmanager
def report_lock(experiment: Path):
    """Held while an experiment's report is written: two sweeps finishing together write it in turn."""
    with _lock(experiment / LOCKS / "report.lock", True, None):
        yield


@contextmanager
def _lock(path: Path, wait: bool, busy):
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"cannot write results to {path.parent.parent}: {e.strerror or e}") from e
    lock = FileLock(path, mode=file_mode())
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise busy() from None
    except OSError as e:
        raise ResultsError(f"cannot lock {path}: {e.strerror or e}") from e
    try:
        yield
    finally:
        lock.release()


def is_locked(folder: Path) -> bool:
    """Whether another process is training the run in `folder` now. Creates nothing."""
    if not (folder.parent / LOCKS / f"{folder.name}.lock").exists():
        return False
    try:
        with run_lock(folder):
            return False
    except Busy:
        return True
    except ResultsError:
        return False


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
    """The run's summary, or None when it is missing, unreadable or not a JSON object."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


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
_NUMBER_OR_NONE = (int, float, type(None))


def summary_problem(summary: dict, folder: Path) -> str | None:
    """Why a summary read from `folder` cannot be trusted as a result, or None when it can."""
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        return f"summary.json lacks {', '.join(missing)}"
    if not isinstance(summary["config"], dict) or not summary["config"]:
        return "summary.json has no config"
    if summary["run_id"] != folder.name:
        return f"summary.json belongs to run {summary['run_id']}"
    try:
        rehashed = dict_hash(summary["config"])
    except (AttributeError, TypeError, ValueError):
        rehashed = None
    if rehashed != summary["config_hash"] or not str(folder.name).endswith(f"-{rehashed}"):
        return "its config does not match its config_hash (edited by hand?)"
    final = summary.get("final")
    if final is not None and not (isinstance(final, dict) and all(isinstance(v, _NUMBER_OR_NONE)
                                                                  for v in final.values())):
        return "summary.json has a malformed 'final'"
    shifts = summary.get("shifts", {})
    if not (isinstance(shifts, dict) and all(isinstance(v, dict) and all(isinstance(x, _NUMBER_OR_NONE)
                                                                         for x in v.values())
                                             for v in shifts.values())):
        return "summary.json has malformed 'shifts'"
    for key in ("epochs", "steps", "wall_seconds", "best_test_acc", "effective_lr"):
        if not isinstance(summary.get(key), _NUMBER_OR_NONE) or isinstance(summary.get(key), bool):
            return f"summary.json has a malformed {key!r}"
    return None


def clean_finished(folder: Path, summary: dict) -> None:
    """Remove what a kill left beside a finished result: temp files, and a checkpoint the run did not keep.

    Only when no process holds the run's lock, so nothing being written is touched.
    """
    try:
        if summary.get("status") not in FINISHED or not (folder / CHECKPOINT).exists() and not any(
                folder.glob(f".*{TEMP_SUFFIX}")):
            return
        with run_lock(folder):
            remove_stale_temp_files(folder)
            if not (summary.get("config") or {}).get("keep_checkpoint"):
                remove_checkpoint(folder)
    except (Busy, OSError, UserError):
        pass  # being trained, or not ours to write: leave it


def _run_folders(experiment: Path, warnings: list[str]) -> list[Path]:
    try:
        entries = sorted(experiment.iterdir())
    except OSError as e:
        warnings.append(f"skipped {experiment}: cannot read it ({e.strerror or e})")
        return []
    folders = []
    for p in entries:
        try:
            if p.is_dir() and not p.name.startswith("."):
                folders.append(p)
        except OSError:
            warnings.append(f"skipped {p}: cannot read it")
    return folders


def scan(experiment: Path) -> tuple[list[dict], dict[str, pd.DataFrame], list[str]]:
    """Read every run folder of an experiment: (summaries, metrics per run id, warnings).

    Runs still going or interrupted (status running) are left out. A folder whose files are missing,
    unreadable or inconsistent is skipped with a warning naming it. Leftovers of a kill beside a finished
    run (a checkpoint, temp files) are removed on the way.
    """
    summaries, curves, warnings = [], {}, []
    for folder in _run_folders(experiment, warnings):
        try:
            if not (folder / "summary.json").exists() and (folder / "config.yaml").exists():
                continue  # started, never wrote a summary: not a result
        except OSError:
            pass
        summary = read_summary(folder)
        if summary is None:
            warnings.append(f"skipped {folder}: no readable summary.json")
            continue
        problem = summary_problem(summary, folder)
        if problem:
            warnings.append(f"skipped {folder}: {problem}")
            continue
        if summary["status"] not in FINISHED:
            continue
        try:
            metrics = read_metrics(folder) if summary["status"] != "failed" else pd.DataFrame(columns=METRIC_COLUMNS)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            warnings.append(f"skipped {folder}: metrics.csv unreadable ({e})")
            continue
        if list(metrics.columns) != METRIC_COLUMNS:
            warnings.append(f"skipped {folder}: metrics.csv has columns {list(metrics.columns)}")
            continue
        if len(metrics) and not all(pd.api.types.is_numeric_dtype(metrics[c]) for c in METRIC_COLUMNS):
            warnings.append(f"skipped {folder}: metrics.csv holds values that are not numbers")
            continue
        clean_finished(folder, summary)
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


def read_sweeps(experiment: Path, warnings: list[str] | None = None) -> list[dict]:
    """The sweeps recorded in <experiment>/sweeps.json; a damaged file gives a warning and no entries."""
    path = experiment / "sweeps.json"
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        if warnings is not None:
            warnings.append(f"ignored {path}: unreadable ({type(e).__name__})")
        return []
    good = [e for e in entries if isinstance(e, dict) and isinstance(e.get("command"), str)] \
        if isinstance(entries, list) else []
    if warnings is not None and (not isinstance(entries, list) or len(good) != len(entries)):
        warnings.append(f"ignored {path}: {'not a list' if not isinstance(entries, list) else 'malformed entries'}")
    return good


def record_sweep(experiment: Path, entry: dict) -> None:
    """Append one sweep invocation (command, timing, counts) to <experiment>/sweeps.json.

    A file that cannot be read back is kept aside (``sweeps.json.damaged-N``), never silently replaced.
    """
    with report_lock(experiment):  # two sweeps finishing together: both entries are kept
        _append_sweep(experiment, entry)


def _append_sweep(experiment: Path, entry: dict) -> None:
    path = experiment / "sweeps.json"
    warnings: list[str] = []
    earlier = read_sweeps(experiment, warnings)
    if warnings and path.exists():
        n = 1
        while path.with_name(f"sweeps.json.damaged-{n}").exists():
            n += 1
        try:
            path.rename(path.with_name(f"sweeps.json.damaged-{n}"))
        except OSError as e:
            raise ResultsError(f"could not keep the damaged {path} aside: {e.strerror or e}") from e
    atomic_write(path, json.dumps(earlier + [entry], indent=2) + "\n")


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint means: start the run again
        return None
    return state if isinstance(state, dict) else None


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
