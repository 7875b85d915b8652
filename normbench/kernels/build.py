"""Building and loading normbench's C kernels: `lstm_step.c` (an LSTM step with norms inside, and
the group norm of the input projections) and `ghost_bn.c` (ghost batch norm).

They are compiled with the machine's C compiler (`$CC`, else `cc`) the first time a CPU run needs
them (1–3 s), into `$XDG_CACHE_HOME/normbench/kernels` (else `~/.cache/normbench/kernels`),
as one library named by a hash of the sources, the compiler, its flags and the CPU (built for the
machine's CPU, -march=native, so that a cluster's nodes of different kinds each build their own), and
loaded through ctypes. Two processes building at once each rename a complete library into place, a
cached file that does not load is built again, and what a killed build left is removed by the next
one after an hour. Without a compiler, where the build fails, or with
NORMBENCH_NATIVE=0, `library()` is None and the callers take their PyTorch formulations: the same
results to rounding, slower. `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("lstm_step.c", "ghost_bn.c"))
HEADERS = (Path(__file__).with_name("common.h"),)
# -fno-semantic-interposition lets the exported functions' helpers inline (3x on the group norm's backward);
# -fno-trapping-math lets the gate loops vectorize; nothing here reorders sums or assumes no NaN
FLAGS = ("-O3", "-fPIC", "-fno-semantic-interposition", "-std=c99", "-fno-math-errno", "-fno-trapping-math")
TYPES = {torch.float32: "float", torch.float64: "double"}
_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
_SIGNATURES = {  # argument types of each exported function, suffixed _float and _double in the library
    "lstm_forward": [_L, _L, *[_P] * 9, _L, _I, _D, *[_P] * 5, _L, _I, _D, *[_P] * 4],
    "lstm_backward": [_L, _L, *[_P] * 13, _L, _I, *[_P] * 5, _L, _I, *[_P] * 5],
    "running_update": [_L, _L, _L, *[_P] * 6],
    "group_norm_forward": [_L, _L, _L, _D, *[_P] * 7],
    "group_norm_backward": [_L, _L, _L, *[_P] * 9],
    "ghost_bn_forward": [_L, _L, _L, _L, _D, *[_P] * 10],
    "ghost_bn_backward": [_L, _L, _L, _L, *[_P] * 9],
}
_why_not = "not tried yet"
STALE_BUILD_S = 3600  # each compiler call may take up to 300 s; a killed build's folder is removed after this


def cache_dir() -> Path:
    """Where built kernels are kept: $XDG_CACHE_HOME/normbench/kernels, else ~/.cache/normbench/kernels."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normbench" / "kernels"


def _cpu() -> str:
    """What -march=native compiles for: a library built on one kind of node of a cluster sharing its home
    folder must not load on another kind."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _clear_stale_builds(folder: Path) -> None:
    """Remove the temporary folders of builds that were killed (SIGKILL, a node going down) before
    they could clean up: any older than STALE_BUILD_S. A live build's folder is seconds old."""
    cutoff = time.time() - STALE_BUILD_S
    for tmp in folder.glob(".build-*"):
        try:
            if tmp.is_dir() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # gone already, or not ours to remove


def _build(compiler: list[str], flags: list[str], target: Path) -> None:
    """Compile each source once per precision and link them all into `target`, written atomically:
    two processes building at once each rename a complete library into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_builds(target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = []
        for source in SOURCES:
            for real in TYPES.values():
                objects.append(str(Path(tmp) / f"{source.stem}-{real}.o"))
                subprocess.run([*compiler, *flags, "-c", f"-DREAL={real}", str(source), "-o", objects[-1]],
                               check=True, capture_output=True, timeout=300)
        out = Path(tmp) / target.name
        subprocess.run([*compiler, "-shared", *objects, "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=300)
        os.replace(out, target)


def _open(target: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' arguments; OSError or AttributeError when the
    file is damaged or not ours."""
    lib = ctypes.CDLL(str(target))
    for real in TYPES.values():
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{real}")
            fn.argtypes, fn.restype = args, None
    return lib


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The library from the cache, built first where it is missing or does not load: for this CPU, or
    portable code where the compiler refuses -march=native."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    failure: Exception | None = None
    for flags in ([*FLAGS, "-march=native"], list(FLAGS)):
        texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
        key = hashlib.sha256("\0".join([*texts, *compiler, version, *flags, sys.platform, platform.machine(),
                                        _cpu()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"normbench-{key}.so"
        if target.is_file():
            try:
                return _open(target)
            except (OSError, AttributeError):
                pass  # damaged (or not this build's): build it again over it
        try:
            _build(compiler, flags, target)
        except subprocess.CalledProcessError as err:
            failure = err
            continue
        return _open(target)
    raise failure


def _off() -> bool:
    return os.environ.get("NORMBENCH_NATIVE", "").strip().lower() in ("0", "false", "no", "off")


def takes(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the kernels can take this tensor and these parameters (None: absent): CPU, float32 or
    float64 alike, and the kernels built."""
    return (x.device.type == "cpu" and x.dtype in TYPES and all(p is None or p.dtype == x.dtype for p in params)
            and library() is not None)


@functools.cache
def kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The built function `name` for `dtype` (after `takes` said yes): a lookup, not a getattr, per call."""
    return getattr(library(), f"{name}_{TYPES[dtype]}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (and `status()` says why) where they cannot be."""
    global _why_not
    if _off():
        _why_not = f"NORMBENCH_NATIVE={os.environ['NORMBENCH_NATIVE']}"
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    if not compiler or shutil.which(compiler[0]) is None:
        _why_not = f"no C compiler: {'$CC' if os.environ.get('CC') else 'cc'} is not on PATH"
        return None
    try:
        return _load(compiler)
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        detail = getattr(err, "stderr", None) or str(err) or type(err).__name__
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        first = detail.strip().splitlines()[0] if detail.strip() else type(err).__name__
        _why_not = f"building them failed ({first})"
        return None


def status() -> str:
    """Which kernels CPU runs take where normbench has C kernels, and why."""
    return "C kernels" if library() is not None else f"PyTorch kernels only: {_why_not}"
