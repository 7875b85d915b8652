"""The Python API: the CLI's run, sweep, report and check as functions that return data and print nothing.

Overrides are a list of strings as on the command line (``["norm=gn", "batch_size=4"]``) or a dict
(``{"norm": "gn", "batch_size": 4}``; in a sweep a list value is swept: ``{"batch_size": [2, 4, 8]}``).
Errors you can fix raise `normbench.UserError` with the one line the CLI would print.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Overrides = Sequence[str] | Mapping[str, Any]


def _value(v, sweep: bool) -> str:
    if isinstance(v, (list, tuple, range)):
        items = [_value(x, False) for x in v]
        return ",".join(items) if sweep else "[" + ",".join(items) + "]"
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return str(v)


def as_overrides(overrides: Overrides | None, sweep: bool = False) -> list[str]:
    """A dict or a list of override strings, as override strings."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return overrides.split()
    if isinstance(overrides, Mapping):
        return [f"{k}={_value(v, sweep)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


@dataclass
class Run:
    """One run's result: `summary` (a Series: run_id, status, final test accuracy, ... and the config flattened
    as config.KEY) and `metrics` (a DataFrame: one row per epoch)."""

    folder: Path
    summary: Any  # pandas.Series
    metrics: Any  # pandas.DataFrame
    trained: bool = True  # false: the folder already held this finished run

    @property
    def test_acc(self) -> float | None:
        return self.summary.get("final.test_acc")


@dataclass
class Results:
    """An experiment folder's results: `runs` (one row per run), `summary` (one row per condition: mean, std
    and 95% interval over seeds), `pivot` (accuracy by batch size), `verdict` (panel -> sentences)."""

    folder: Path
    runs: Any
    summary: Any
    pivot: Any
    verdict: dict[str, list[str]]
    report: Path | None = None  # report.md, when written
    warnings: list[str] = field(default_factory=list)
    # sweep only: runs planned, trained now, and (what, why) of each run without a result
    planned: int = 0
    trained: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run(overrides: Overrides | None = None, *, config_dir: str | Path | None = None, force: bool = False,
        plugins: Sequence[str] = (), progress: bool = False) -> Run:
    """Train one run (or return the finished one, unless `force`) and return its summary and metrics.
    `progress=True` prints the epochs as ``normbench run`` does."""
    import pandas as pd

    from normbench import results
    from normbench.config import compose
    from normbench.plugins import load
    from normbench.runner import execute

    load(plugins)
    cfg = compose(as_overrides(overrides), config_dir)
    if progress:
        from normbench.progress import EpochProgress

        with EpochProgress(cfg.epochs, cfg.batch_size) as shown:
            result = execute(cfg, shown, replace=force)
    else:
        result = execute(cfg, replace=force)
    metrics = results.read_metrics(result.folder)
    return Run(result.folder, pd.Series(_flat(result.summary)), metrics, result.trained)


def _results(rep, path: Path | None = None, **sweep) -> Results:
    return Results(rep.experiment, rep.runs, rep.summary, rep.pivot, rep.verdict, path, list(rep.warnings), **sweep)


def sweep(overrides: Overrides | None = None, *, jobs: int = 1, config_dir: str | Path | None = None,
          retry_failed: bool = False, plugins: Sequence[str] = (), report: bool = True) -> Results:
    """Run a sweep (finished runs are skipped), write its report (unless `report=False`) and return its
    results; failures are in `.failures`, not raised. With jobs > 1, norms registered in this process (not
    from a file) cannot be trained by the worker processes: UserError."""
    from normbench import report as reports
    from normbench import sweep as sweeps
    from normbench.errors import UserError
    from normbench.plugins import load

    load(plugins)
    jobs, capped = sweeps.capped_jobs(jobs)
    outcome = sweeps.run(as_overrides(overrides, sweep=True), config_dir, jobs=jobs, retry_failed=retry_failed)
    counts = dict(planned=len(outcome.planned), trained=outcome.trained, failures=outcome.failures)
    # what the command line prints as notes: --jobs capped, or fewer workers than asked because they would not pay
    notes = [capped] + ([sweeps.paying_jobs(outcome.planned, jobs, retry_failed)[1]] if jobs > 1 else [])
    # and jobs that are one run (settings outside the run id differ), one note per kind
    notes += sweeps.planning.duplicate_notes(outcome.planned)
    built = []
    try:
        built = reports.after_sweep(outcome, "normbench.sweep(...)") if report else \
            [(reports.build(folder), None) for folder in outcome.experiment_dirs]
    except UserError:
        if not outcome.failures:
            raise
    notes = [n for n in notes if n]
    if not built:
        return Results(Path(), None, None, None, {}, None, notes, **counts)
    rep, path = built[0]
    result = _results(rep, path, **counts)
    result.warnings[:0] = notes
    return result


def load(folder: str | Path, *, plugins: Sequence[str] = ()) -> Results:
    """An experiment folder (results/NAME): its runs table, summary with intervals, pivot and verdict. Writes nothing."""
    from normbench import report
    from normbench.errors import UserError
    from normbench.plugins import load as load_plugins

    load_plugins(plugins)
    if not isinstance(folder, (str, Path)):
        raise UserError(f"load takes the path of an experiment folder (results/NAME), got {folder!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no folder at {folder}" if not folder.exists() else f"{folder} is not a folder")
    return _results(report.build(folder))


def check(overrides: Overrides | None = None, *, config_dir: str | Path | None = None, plugins: Sequence[str] = ()):
    """The conformance battery of ``norm=NAME`` or ``model=NAME`` (as ``normbench check``): a DataFrame with a
    row per kind of features or model, a column per check."""
    from normbench import conformance
    from normbench.plugins import load

    load(plugins)
    return conformance.frame(conformance.check(as_overrides(overrides), config_dir))
