"""Atomic, durable, umask-respecting writes, and where they may go (inside results_dir, never through a symlink)."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from normbench.errors import ResultsError, UserError

if TYPE_CHECKING:
    import pandas as pd

TEMP_SUFFIX = ".normbench-tmp"


def read_regular(path: Path) -> bytes:
    """A file's bytes, refused (OSError) unless it is a regular file: a FIFO in a result's place would block
    the reader for ever, a device never end. Opened without blocking, then checked, then read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        with open(fd, "rb", closefd=False) as stream:
            return stream.read()
    finally:
        os.close(fd)


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
        raise ResultsError(f"could not write {path}: {e.strerror or e}; the {path.name} there before, if any, is unchanged") from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def numbered_aside(path: Path, pattern: str) -> Path:
    """The first name `pattern`.format(N), N = 1, 2, ..., beside `path` that nothing has (a dangling link counts)."""
    n = 1
    while os.path.lexists(aside := path.with_name(pattern.format(n))):
        n += 1
    return aside


def inside(root: Path, path: Path) -> Path:
    """`path` with symlinks resolved, refused unless it stays inside `root` (already resolved)."""
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        if Path(os.path.abspath(path)) == resolved:  # no symlink on the way: the path itself is elsewhere
            raise UserError(f"{path} is outside results_dir {root}; normbench writes only inside results_dir")
        raise UserError(f"{path} leads to {resolved}, outside results_dir {root}; "
                        "normbench writes only inside results_dir (remove the symlink)")
    return resolved


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
