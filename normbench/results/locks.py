"""OS file locks: one process trains a run at a time; reports and sweeps.json are written in turn."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from normbench.errors import ResultsError, UserError
from normbench.results.files import file_mode

LOCKS = ".locks"


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
        raise ResultsError(f"cannot write results to {path.parent.parent}: cannot make its lock folder {path.parent}: "
                           f"{e.strerror or e}") from e
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
