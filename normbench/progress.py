"""Rich progress while training: the epoch bar of one run, and a sweep's overall progress above it.

Off a terminal (CI, pipes, log files) progress becomes one plain line per epoch, or per finished run.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, TextColumn, TimeRemainingColumn

from normbench.config import run_id
from normbench.display import console
from normbench.results import FINISHED
from normbench.train import EpochRecord, Progress


class EpochProgress(Progress):
    """A Rich bar per epoch with the running loss and samples/s; plain lines when not on a terminal."""

    def __init__(self, epochs: int, batch_size: int, label: str = "", out: Console = console):
        self.epochs, self.batch_size, self.label, self.out = epochs, batch_size, label, out
        self.live = out.is_terminal
        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]}  {task.fields[speed]}"), TimeRemainingColumn(),
                           console=out, transient=True) if self.live else None
        self.task = None

    def __enter__(self) -> EpochProgress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def epoch_start(self, epoch: int, steps: int) -> None:
        if self.bar:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"{self.label}epoch {epoch}/{self.epochs}", total=steps,
                                          loss="-", speed="")

    def update(self, steps_done: int, loss: float) -> None:
        if self.bar and self.task is not None:
            elapsed = self.bar.tasks[-1].elapsed or 0.0
            speed = f"{steps_done * self.batch_size / elapsed:,.0f} samples/s" if elapsed else ""
            self.bar.update(self.task, completed=steps_done, loss=f"{loss:.4f}", speed=speed)

    def resumed(self, epochs_done: int, epochs: int) -> None:
        self.out.print(f"{self.label}resuming from its checkpoint at epoch {epochs_done + 1}/{epochs}")

    def epoch_end(self, r: EpochRecord) -> None:
        line = (f"{self.label}epoch {r.epoch}/{self.epochs}  train_loss {r.train_loss:.4f}  "
                f"train_acc {r.train_acc:.2f}%  test_acc {r.test_acc:.2f}%")
        if not math.isnan(r.test_acc_batch_stats):
            line += f"  (batch stats {r.test_acc_batch_stats:.2f}%"
            line += f", precise {r.test_acc_precise:.2f}%)" if not math.isnan(r.test_acc_precise) else ")"
        self.out.print(line + f"  {r.samples_per_s:,.0f} samples/s  {r.seconds:.1f}s")


class SweepDisplay(EpochProgress):
    """Overall sweep progress (runs done / total, failures, ETA) above the current run's epoch bar.

    The overall count is read from the run folders, so it is right whichever process trains the runs;
    the epoch bar is drawn only for runs trained in this process.
    """

    def __init__(self, out: Console = console):
        super().__init__(epochs=0, batch_size=1, out=out)
        self.overall = None
        self.planning = None
        self.reported: set[str] = set()
        self.total = 0

    def planned(self, job) -> None:
        """One more job composed and checked: a count while Hydra plans the sweep (on a terminal only)."""
        if self.bar:
            if self.planning is None:
                self.planning = self.bar.add_task("planning", total=None, loss="", speed="")
            self.bar.advance(self.planning)

    def start_sweep(self, planned, retry_failed: bool) -> None:
        from normbench.sweep import to_train

        if self.bar and self.planning is not None:
            self.bar.remove_task(self.planning)
            self.planning = None

        valid = [p for p in planned if p.cfg is not None]
        self.total = len(valid)
        self.reported = {run_id(p.cfg) for p in valid} - {run_id(p.cfg) for p in to_train(planned, retry_failed)}
        self.failed = 0
        if self.bar:
            self.overall = self.bar.add_task("sweep", total=self.total, loss="", speed="")
            self.bar.update(self.overall, completed=len(self.reported))
        else:
            self.out.print(f"sweep: {self.total} runs, {len(self.reported)} already done")

    def runs_changed(self, status: dict[str, dict | None]) -> None:
        for rid, summary in sorted(status.items()):
            state = (summary or {}).get("status")
            if rid in self.reported or state not in FINISHED:
                continue
            self.reported.add(rid)
            self.failed += state == "failed"
            acc = ((summary.get("final") or {}).get("test_acc"))
            note = f"test_acc {acc:.2f}%" if acc is not None else (summary.get("error") or "")
            if self.bar:
                self.bar.update(self.overall, completed=len(self.reported),
                                loss=f"{self.failed} failed" if self.failed else "", speed="")
            self.out.print(f"[{len(self.reported)}/{self.total}] {rid}: {state} {note}")

    def run_start(self, name: str, epochs: int, batch_size: int) -> None:
        self.epochs, self.batch_size, self.label = epochs, batch_size, f"{name} "

    def epoch_end(self, record: EpochRecord) -> None:
        pass  # a sweep prints one line per finished run (runs_changed), not one per epoch
