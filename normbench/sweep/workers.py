"""``--jobs N``: worker processes on this machine that train planned runs as they are offered.

Each worker gets cores // N torch threads (no oversubscription), keeps its decoded datasets between
runs and, on a machine with several GPUs, keeps to GPU (its number mod the GPU count). Workers start
by "spawn": a fork of a process that has run torch's thread pools can deadlock.
"""

from __future__ import annotations

import functools
import heapq
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from normbench.config import Config, run_id
from normbench.errors import UserError
from normbench.sweep.planning import Planned, to_train
from normbench.sweep.training import train_job

_worker_slot = 0  # in a worker process: its number, 0 .. jobs - 1


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, so taskset and cgroup cpusets count)."""
    from normbench.threads import cores

    return cores()


def _worker_start(slots, threads: int, parent: int) -> None:
    """Worker process setup: its slot number, its share of the CPU threads (the most a run in it uses;
    small runs use one, see normbench.threads), and an exit when the sweep dies."""
    import torch

    from normbench import plugins
    from normbench import threads as thread_choice

    plugins.load()  # the sweep's plugins, named in NORMBENCH_PLUGINS, before any config is unpickled
    global _worker_slot
    _worker_slot = slots.get()
    thread_choice.set_share(threads)
    torch.set_num_threads(threads)

    def exit_with_parent() -> None:  # a SIGKILLed sweep leaves no orphan training behind
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_train(cfg: Config, retry_failed: bool) -> dict:
    import torch

    gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
    if gpus > 1:
        cfg.device = f"cuda:{_worker_slot % gpus}"  # each worker keeps to its own GPU
    return train_job(cfg, retry_failed)


class Workers:
    """`jobs` worker processes that train planned runs as they are offered, longest estimated first.

    Runs can be offered while the sweep is still being planned, so planning and training overlap.
    Exactly `jobs` runs are in flight: each free worker takes the costliest run offered so far.
    """

    def __init__(self, jobs: int, retry_failed: bool = False, train: Callable[[Config, bool], dict] | None = None):
        self.jobs, self.retry_failed, self.train = jobs, retry_failed, train or _worker_train
        self.others = set(multiprocessing.active_children())  # child processes that are not our workers
        self.pool = self._start_pool()
        self.offered: list[Planned] = []
        self.waiting: list[tuple[float, int]] = []  # heap of (-cost, offer index)
        self.outcomes: dict[int, dict] = {}
        self.in_flight = 0
        self.in_training: dict[int, str] = {}  # offer index -> run id, for the runs in the workers now
        self.closed = False
        self.changed = threading.Condition()
        self.dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self.dispatcher.start()

    def _start_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        slots = ctx.Queue()
        for k in range(self.jobs):
            slots.put(k)
        return ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_worker_start,
                                   initargs=(slots, max(1, cpu_cores() // self.jobs), os.getpid()))

    def offer(self, p: Planned) -> None:
        """Queue a planned run for training, if it needs training."""
        if not to_train([p], self.retry_failed):
            return
        from normbench.plugins import unshareable

        local = unshareable(p.cfg)
        if local:
            raise UserError(f"{', '.join(local)} was registered in this process (a notebook), so worker processes "
                            "cannot load it: use jobs=1, or put it in a .py file and load that with --plugin "
                            "(normbench.load_plugins)")
        with self.changed:
            heapq.heappush(self.waiting, (-p.cost, len(self.offered)))
            self.offered.append(p)
            self.changed.notify_all()

    def _dispatch(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: (self.waiting and self.in_flight < self.jobs) or
                                      (self.closed and not self.waiting))
                if not self.waiting:
                    return
                _, i = heapq.heappop(self.waiting)
                self.in_flight += 1
                p = self.offered[i]
                self.in_training[i] = p.run_id or run_id(p.cfg)
            try:
                future = self.pool.submit(self.train, self.offered[i].cfg, self.retry_failed)
            except BrokenProcessPool:  # a worker died (its runs are marked failed): carry on with fresh workers
                self.pool.shutdown(wait=False)
                self.pool = self._start_pool()
                future = self.pool.submit(self.train, self.offered[i].cfg, self.retry_failed)
            except RuntimeError:  # shut down: the sweep is stopping
                future = Future()
                future.cancel()
            future.add_done_callback(functools.partial(self._finished, i))

    def _finished(self, i: int, future) -> None:
        try:
            outcome = future.result()
        except CancelledError:
            outcome = {"run_id": run_id(self.offered[i].cfg), "status": "new", "error": None, "skipped": True}
        except BaseException as e:  # noqa: BLE001 - a worker that died (out of memory, killed, Ctrl-C) fails its run
            outcome = {"run_id": run_id(self.offered[i].cfg), "status": "failed",
                       "error": f"its worker process died ({type(e).__name__}); run the sweep again to resume it"}
        with self.changed:
            self.outcomes[i] = outcome
            self.in_training.pop(i, None)
            self.in_flight -= 1
            self.changed.notify_all()

    def training(self) -> list[str]:
        """The run ids the workers are training now (at most `jobs`)."""
        with self.changed:
            return list(self.in_training.values())

    def join(self) -> list[dict]:
        """Wait for every offered run; their outcomes in the order they were offered."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
            self.changed.wait_for(lambda: len(self.outcomes) == len(self.offered))
        return [self.outcomes[i] for i in range(len(self.offered))]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:  # every run is done: the idle workers exit on their own while the report is written
            self.pool.shutdown(wait=False)
            return
        # Ctrl-C or a planning error: stop now; the runs resume from their checkpoints next time
        with self.changed:
            self.waiting.clear()
            self.closed = True
            self.changed.notify_all()
        for child in set(multiprocessing.active_children()) - self.others:
            child.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
