"""Sweep progress read from the run folders, so the display is right whichever process trains the runs."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from normbench import results
from normbench.config import run_id
from normbench.sweep.planning import RETRIED, Planned, to_train


class FolderWatcher(threading.Thread):
    """Counts finished runs from their folders and passes {run id: summary or None}, and the run ids being
    trained now (`training()`, from the worker pool), to `on_change`."""

    def __init__(self, planned: list[Planned], on_change, interval: float = 1.0, training=None,
                 retry_failed: bool = False):
        super().__init__(daemon=True)
        self.folders, self.old = {}, {}
        for p in planned:
            if p.cfg is not None:
                rid = p.run_id or run_id(p.cfg)
                self.folders[rid] = results.run_dir(p.cfg, rid)
                if retry_failed and p.state in RETRIED:  # its old result stays until the new one replaces it
                    self.old[rid] = results.read_summary(self.folders[rid])
        self.seen: dict[str, dict] = {}  # finished runs: their summaries are not read again
        self.on_change, self.interval = on_change, interval
        self.training = training or (lambda: [])
        self.stop_event = threading.Event()

    def poll(self) -> dict[str, dict | None]:
        for rid, folder in self.folders.items():
            if rid not in self.seen:
                summary = results.read_summary(folder)
                if (summary is not None and summary.get("status") in results.FINISHED and summary != self.old.get(rid)
                        and results.summary_problem(summary, folder) is None):  # (a damaged one is trained again)
                    self.seen[rid] = summary
        return {rid: self.seen.get(rid) for rid in self.folders}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.on_change(self.poll(), self.training())

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.on_change(self.poll(), [])


@contextmanager
def watching(planned: list[Planned], retry_failed: bool, display, training=None):
    """Show the sweep's progress on `display` (if any) from the run folders, whoever trains the runs;
    `training`: a function that names the runs being trained now (the worker pool's)."""
    if display is None or not to_train(planned, retry_failed):
        yield
        return
    watcher = FolderWatcher(planned, display.runs_changed, training=training, retry_failed=retry_failed)
    display.start_sweep(planned, retry_failed)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()
