"""<experiment>/sweeps.json: every sweep run into a folder, appended in turn, never silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

from normbench.errors import ResultsError
from normbench.results.files import atomic_write, numbered_aside, read_regular
from normbench.results.locks import report_lock


def read_sweeps(experiment: Path, warnings: list[str] | None = None) -> list[dict]:
    """The sweeps recorded in <experiment>/sweeps.json; a damaged file gives a warning and no entries."""
    path = experiment / "sweeps.json"
    try:
        entries = json.loads(read_regular(path).decode())
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


def record_sweep(experiment: Path, entry: dict) -> str | None:
    """Append one sweep invocation (command, timing, counts) to <experiment>/sweeps.json.

    A file that cannot be read back is kept aside (``sweeps.json.damaged-N``), never silently replaced:
    the warning that says so is returned.
    """
    with report_lock(experiment):  # two sweeps finishing together: both entries are kept
        return _append_sweep(experiment, entry)


def _append_sweep(experiment: Path, entry: dict) -> str | None:
    path = experiment / "sweeps.json"
    warnings: list[str] = []
    earlier = read_sweeps(experiment, warnings)
    kept = None
    if warnings and path.exists():
        aside = numbered_aside(path, "sweeps.json.damaged-{}")
        try:
            path.rename(aside)
        except OSError as e:
            raise ResultsError(f"could not keep the damaged {path} aside: {e.strerror or e}") from e
        kept = f"{warnings[0]}; kept aside as {aside.name}, and a new sweeps.json started"
    atomic_write(path, json.dumps(earlier + [entry], indent=2) + "\n")
    return kept
