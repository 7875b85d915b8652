"""Run folders: where they are, writing them, and reading them back as untrusted input."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from normbench.config import Config, dict_hash, legacy_run_id, run_id, to_dict
from normbench.errors import ResultsError, UserError
from normbench.results.files import (TEMP_SUFFIX, atomic_write, inside, numbered_aside, read_regular,
                                     remove_stale_temp_files)
from normbench.results.locks import Busy, is_locked, run_lock

if TYPE_CHECKING:
    import pandas as pd  # imported where a table is read or written: planning a sweep needs none

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "test_acc_batch_stats", "test_acc_precise", "seconds", "samples_per_s"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CHECKPOINT = "checkpoint.pt"


def results_root(cfg: Config) -> Path:
    """The resolved results_dir: it may itself be a symlink (to scratch space, say); nothing below it may."""
    return Path(cfg.results_dir).expanduser().resolve()


def experiment_dir(cfg: Config) -> Path:
    """<results_dir>/<name>; neither the name nor a symlink can lead out of the results dir."""
    if not NAME_PATTERN.match(cfg.name):
        raise UserError(f"name {cfg.name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
    root = results_root(cfg)
    return inside(root, root / cfg.name)


def run_dir(cfg: Config, rid: str | None = None) -> Path:
    """<results_dir>/<name>/<run id>, resolved inside the results dir; `rid`: the run id, when already known.
    A run folder that is itself a symlink is refused: it leads to another folder (another run's, even),
    whose result training would overwrite; its target is left alone."""
    path = experiment_dir(cfg) / (rid or run_id(cfg))
    resolved = inside(results_root(cfg), path)
    if path.is_symlink():
        raise UserError(f"{path} is a symlink to {resolved}: normbench trains a run only in a folder of its own, "
                        "never through a link (another run's result could be overwritten); remove the symlink "
                        "(its target is left as it is)")
    return resolved


def check_run_folder(folder: Path) -> None:
    """A run's folder is a folder, or not there yet: anything else in its place is the user's to move."""
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise UserError(f"cannot write results to {folder}: something that is not a folder is in the run "
                        "folder's place; move it away")
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"cannot read the run folder {folder}: Permission denied (its own permissions)")


def adopt_legacy(cfg: Config, folder: Path, holding_lock: bool = False) -> bool:
    """Move a finished run of this config from its normbench 0.2 folder name (`legacy_run_id`) to
    `folder`, when `folder` does not exist yet: the result is kept, not trained again. One rename, so
    the run is under exactly one of the two names at any moment. `holding_lock`: the caller holds the
    run's lock (else a run being trained under the new name is left alone). Returns whether it moved one."""
    old = legacy_summary(cfg, folder)
    if old is None:
        return False
    if not holding_lock and is_locked(folder):  # the new name is being trained right now: leave both alone
        return False
    try:
        old[0].rename(folder)
    except FileNotFoundError:  # another process adopted it first
        return folder.exists()
    except OSError:  # the new folder appeared meanwhile (not empty): keep the old one where it is
        return False
    try:  # its summary names the run by its old id: now it is this folder's
        write_summary(folder, {**old[1], "run_id": folder.name})
    except ResultsError:
        pass  # then it reads as another run's, and is kept aside and trained again: nothing is lost
    return True


def legacy_summary(cfg: Config, folder: Path) -> tuple[Path, dict] | None:
    """(folder, summary) of a finished run of this config under its normbench 0.2 name, if `folder`
    does not exist and there is one to adopt (see `adopt_legacy`)."""
    old_id = legacy_run_id(cfg, folder.name)
    if old_id is None or folder.exists():
        return None
    old = inside(results_root(cfg), folder.parent / old_id)
    summary = read_summary(old)
    if summary is None or summary.get("status") not in FINISHED or summary.get("config_hash") != dict_hash(to_dict(cfg)):
        return None
    return old, summary


def write_config(folder: Path, cfg: Config) -> None:
    atomic_write(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_metrics(folder: Path, records: list) -> None:
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(r) for r in records], columns=METRIC_COLUMNS)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write(folder / "metrics.csv", buffer.getvalue())


def write_summary(folder: Path, summary: dict) -> None:
    atomic_write(folder / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")


def read_summary(folder: Path) -> dict | None:
    """The run's summary, or None when it is missing, unreadable or not a JSON object."""
    try:
        summary = json.loads(read_regular(folder / "summary.json").decode())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return summary if isinstance(summary, dict) else None


def read_metrics(folder: Path) -> pd.DataFrame:
    """metrics.csv as `pd.read_csv` reads it. A file as normbench writes it (its header, numbers only) is
    parsed directly, which is several times faster for the report of thousands of runs; anything else
    goes through `pd.read_csv`, so a damaged file is read, or refused, just as before."""
    import pandas as pd

    text = read_regular(folder / "metrics.csv").decode()
    frame = _plain_metrics(text)
    return frame if frame is not None else pd.read_csv(io.StringIO(text))


_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf|-inf|")  # "": a missing value (NaN)


def _plain_metrics(text: str):
    """The frame of a metrics.csv with normbench's header and at least one row of plain numbers, typed as
    pandas types them (int64 for a column of integers, else float64); None for any other file."""
    import numpy as np
    import pandas as pd

    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) < 2 or lines[0].split(",") != METRIC_COLUMNS:
        return None
    rows = [line.split(",") for line in lines[1:]]
    if any(len(row) != len(METRIC_COLUMNS) for row in rows):
        return None
    columns = {}
    for name, values in zip(METRIC_COLUMNS, zip(*rows)):
        integers = [bool(_INTEGER.fullmatch(v)) for v in values]
        if any(i and len(v.lstrip("-")) > 18 for i, v in zip(integers, values)):
            return None  # beyond int64: pandas keeps such a column as text
        if all(integers):
            columns[name] = np.array([int(v) for v in values], dtype=np.int64)
        elif all(_DECIMAL.fullmatch(v) for v in values):
            columns[name] = np.array([float(v) if v else np.nan for v in values], dtype=np.float64)
        else:
            return None
    return pd.DataFrame(columns)


@functools.cache
def versions() -> dict[str, str]:
    import torch

    from normbench import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _torchvision_version(), "normbench": __version__}


def _torchvision_version() -> str:
    """torchvision.__version__ (with its local tag, +cu130), read from its version.py: importing torchvision
    imports its models and torch._dynamo, 1.7 s here, which a run on data that needs no torchvision
    (synthetic, a plugin's) would pay for this string alone. Imported only where the file says nothing."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        found = re.search(r"""^__version__\s*=\s*['"]([^'"\n]+)['"]""", text, re.MULTILINE)
        if found:
            return found.group(1)
    import torchvision

    return torchvision.__version__


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
    if summary["status"] not in (*FINISHED, "running"):
        return f"summary.json has an unknown status {str(summary['status'])[:40]!r}"
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
    if summary.get("status") == "completed":
        acc = (final or {}).get("test_acc")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc):
            return "summary.json says completed but has no final test accuracy (edited by hand?)"
    shifts = summary.get("shifts", {})
    if not (isinstance(shifts, dict) and all(isinstance(v, dict) and all(isinstance(x, _NUMBER_OR_NONE)
                                                                         for x in v.values())
                                             for v in shifts.values())):
        return "summary.json has malformed 'shifts'"
    for key in ("epochs", "steps", "wall_seconds", "best_test_acc", "effective_lr"):
        if not isinstance(summary.get(key), _NUMBER_OR_NONE) or isinstance(summary.get(key), bool):
            return f"summary.json has a malformed {key!r}"
    accuracies = {**{f"final.{k}": v for k, v in (final or {}).items()}, "best_test_acc": summary.get("best_test_acc"),
                  **{f"shifts.{s}.{k}": v for s, values in shifts.items() for k, v in values.items()}}
    for key, value in accuracies.items():  # percentages; NaN where a run diverged
        if ("acc" in key.rsplit(".", 1)[-1] and isinstance(value, (int, float)) and not math.isnan(value)
                and not 0 <= value <= 100):
            return f"summary.json has an accuracy outside 0-100% ({key} = {value:.6g}; edited by hand?)"
    return None


def sound(summary: dict | None, folder: Path, expected_hash: str) -> bool:
    """Whether `summary`, read from `folder`, is a trustworthy summary of the config hashing to `expected_hash`."""
    return (summary is not None and summary.get("config_hash") == expected_hash
            and summary_problem(summary, folder) is None)


DAMAGED = re.compile(r"^\.(.+)\.damaged-\d+$")  # .<run_id>.damaged-N: a damaged result kept aside
ASIDE = re.compile(r"^\.(.+)\.(attempt|replaced)$")  # runner._aside: a --force replacement under way or interrupted


def damaged_result(folder: Path) -> str | None:
    """Why the summary.json in `folder` cannot be trusted (unreadable, or refused by `summary_problem`), or
    None: no summary there (a new run, or one that never wrote one), or a sound one."""
    try:
        if not (folder / "summary.json").exists():
            return None
    except OSError:
        return None
    summary = read_summary(folder)
    return "no readable summary.json" if summary is None else summary_problem(summary, folder)


def keep_damaged_aside(folder: Path) -> Path:
    """Move a run folder whose result cannot be trusted out of the way, never deleting it: to
    ``.<run_id>.damaged-N`` beside it, which nothing reads as a result (and `scan` warns about)."""
    aside = numbered_aside(folder, f".{folder.name}.damaged-{{}}")
    try:
        folder.rename(aside)
    except OSError as e:
        raise UserError(f"could not move the damaged {folder} aside: {e.strerror or e}") from e  # not trained
    return aside


def clean_finished(folder: Path, summary: dict) -> None:
    """Remove what a kill left beside a finished result: temp files, and a checkpoint the run did not keep.

    Only when no process holds the run's lock, so nothing being written is touched, and only in a real
    folder of its experiment: a symlinked run folder is read, never written through.
    """
    try:
        if summary.get("status") not in FINISHED or not (folder / CHECKPOINT).exists() and not any(
                folder.glob(f".*{TEMP_SUFFIX}")):
            return
        if folder.is_symlink() or folder.resolve() != folder.parent.resolve() / folder.name:
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
    names = {p.name for p in entries}
    for p in entries:
        if damaged := DAMAGED.match(p.name):
            warnings.append(f"{p}: the damaged result of run {damaged.group(1)}, kept aside when "
                            "the run was trained again; remove it once you no longer need it")
            continue
        if (aside := ASIDE.match(p.name)) and (aside.group(2) == "attempt" or aside.group(1) not in names):
            rid = aside.group(1)
            if aside.group(2) == "attempt":
                what = f"a new attempt (--force, --retry-failed) at run {rid}, under way or interrupted"
            else:
                what = (f"the result of run {rid}, set aside by a replacement (--force, --retry-failed) that was "
                        "interrupted; left out of this report")
            warnings.append(f"{p}: {what}: the next `normbench run` or sweep of that config finishes it")
            continue
        try:
            if p.is_dir() and not p.name.startswith("."):
                folders.append(p)
        except OSError:
            warnings.append(f"skipped {p}: cannot read it")
    return folders


def scan(experiment: Path) -> tuple[list[dict], dict[str, pd.DataFrame], list[str]]:
    """Read every run folder of an experiment: (summaries, metrics per run id, warnings).

    Runs still going or interrupted (status running) are left out. A folder whose summary is missing,
    unreadable or inconsistent is skipped with a warning naming it; a finished run whose metrics.csv is
    damaged stays, without its training curve, with a warning. Leftovers of a kill beside a finished run
    (a checkpoint, temp files) are removed on the way.
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
        metrics, damage = _curve(folder, summary)
        if damage:  # the result is its summary's: the run stays in every table, without its training curve
            warnings.append(f"{folder}: {damage}; its training curve is left out (its final result is used)")
        clean_finished(folder, summary)
        summaries.append(summary)
        try:
            if folder.is_symlink():  # read (a skipped one's warning already names it), never written through
                warnings.append(f"{folder} is a symlink to {folder.resolve()}: its run is read, and nothing is "
                                "written there")
        except OSError:
            pass
        if metrics is not None:
            curves[summary["run_id"]] = metrics
    return summaries, curves, warnings


def _curve(folder: Path, summary: dict) -> tuple[pd.DataFrame | None, str | None]:
    """A finished run's metrics.csv, or None and why it cannot be used."""
    import pandas as pd

    if summary["status"] == "failed":
        return pd.DataFrame(columns=METRIC_COLUMNS), None
    try:
        metrics = read_metrics(folder)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"metrics.csv unreadable ({_short(e)})"
    if list(metrics.columns) != METRIC_COLUMNS:
        return None, f"metrics.csv has {len(metrics.columns)} columns, not normbench's {len(METRIC_COLUMNS)}"
    if len(metrics) and not all(pd.api.types.is_numeric_dtype(kind) for kind in metrics.dtypes):
        return None, "metrics.csv holds values that are not numbers"
    return metrics, None


def _short(e: Exception, limit: int = 200) -> str:
    """The reason of an error in one short line ('No such file or directory', not errno and path)."""
    text = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
    return text if len(text) <= limit else text[:limit] + "..."


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
        state = torch.load(io.BytesIO(read_regular(path)), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint means: start the run again
        return None
    return state if isinstance(state, dict) else None


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
