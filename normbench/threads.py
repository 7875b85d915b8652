"""How many CPU threads a run's torch operations use (`threads` in the config; null: chosen by the work).

torch's default, one thread per core, suits steps with much arithmetic. A small step (the MLP at batch
2: a few hundred thousand multiply-accumulates) gains almost nothing from a second thread on a quiet
machine, and on a busy one its threads wait for each other at every kernel: there it ran nine times
slower with two threads than with one. So with ``threads: null`` a run whose training step does less
than `SMALL_STEP_MACS` of arithmetic uses one thread, and any other run the process's whole share of the
cores (all of them; a sweep worker's share with ``--jobs``), unless the machine is busy when the run
starts: with other processes on the cores, one thread was faster for every model and batch size
measured (benchmarks/threads.py), so then every run gets one. Busy means a 1-minute load average above
the cores plus one half (this process's own runs count in it, so a quiet machine running a sweep stays
at or below the cores). ``threads: N`` sets it outright. The count a run used is recorded in its
summary. On a GPU the choice only affects the host side.

The thread count can change a result in its last bits (reductions split differently), like the device;
it is not part of the run id.
"""

from __future__ import annotations

import os

# Below this many multiply-accumulates per training step's forward pass (batch x per-sample work), one
# thread is used: measured by benchmarks/threads.py on a 2-core CPU (see the README's Performance).
SMALL_STEP_MACS = 8e6

_share: int | None = None  # set by a sweep worker: its share of the cores


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_share(n: int) -> None:
    """This process's share of the cores (a sweep worker's), the most a run in it will use."""
    global _share
    _share = max(1, int(n))


def share() -> int:
    return _share or cores()


def busy() -> bool:
    """Whether other work shares the cores now (1-minute load average above cores + 0.5)."""
    try:
        return os.getloadavg()[0] > cores() + 0.5
    except (AttributeError, OSError):  # no load average on this platform
        return False


def choose(threads: int | None, batch_size: int, macs_per_sample: int) -> int:
    """The thread count for a run: `threads` when set, else by its step's arithmetic and the machine's load."""
    if threads is not None:
        return threads
    return 1 if batch_size * macs_per_sample < SMALL_STEP_MACS or busy() else share()


def over_cores_note(requested) -> str | None:
    """A note when a run asks (`threads: N`) for more threads than this machine has cores, else None."""
    most = max((t for t in requested if t is not None), default=None)
    if most is None or most <= cores():
        return None
    return (f"threads={most} is more than this machine's {cores()} cores: its threads take turns at every "
            "kernel, which makes training slower, not faster (threads=null chooses by the work)")
