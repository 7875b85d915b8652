"""Rich progress while training: the epoch bar of one run, and a sweep's overall progress above it.

Off a terminal (CI, pipes, log files) progress becomes plain lines: one per epoch of a single run, one
per finished run of a sweep (and one per epoch of a sweep's long runs). A sweep's time left comes from
the planner's cost estimates, scaled by how long the finished runs took: runs differ in cost by
orders of magnitude (batch 2 takes 64 times the steps of batch 128), so counting runs would mislead.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, ProgressColumn, TextColumn
from rich.progress import TimeRemainingColumn
from rich.text import Text

from normbench import threads
from normbench.config import run_id
from normbench.display import console, duration, note
from normbench.results import FINISHED
from normbench.train import EpochRecord, Progress


LONG_RUN_SECONDS = 30.0  # off a terminal, a sweep prints the epochs of runs whose epochs take this long
PLAIN_EVERY_SECONDS = 60.0  # off a terminal, a long epoch of a single run prints its progress this often


class _EpochTimeLeft(ProgressColumn):
    """Rich's time left, on epoch bars only (a sweep's own estimate is in its text; a spinner has none)."""

    def __init__(self):
        super().__init__()
        self.inner = TimeRemainingColumn()

    def render(self, task) -> Text:
        return self.inner.render(task) if task.fields.get("epoch") else Text("")


class EpochProgress(Progress):
    """A Rich bar per epoch with the running loss and samples/s; plain lines when not on a terminal."""

    def __init__(self, epochs: int, batch_size: int, label: str = "", out: Console = console):
        self.epochs, self.batch_size, self.label, self.out = epochs, batch_size, label, out
        self.live = out.is_terminal
        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), _EpochTimeLeft(),
                           console=out, transient=True) if self.live else None
        self.task = None
        self.epoch, self.steps, self.said = 0, 0, 0.0

    def __enter__(self) -> EpochProgress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def epoch_start(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps, self.said = epoch, steps, time.monotonic()
        if self.bar:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"{self.label}epoch {epoch}/{self.epochs}", total=steps,
                                          info="loss -", epoch=True)

    def update(self, steps_done: int, loss: float) -> None:
        if self.bar and self.task is not None:
            elapsed = self.bar.tasks[-1].elapsed or 0.0
            speed = f"  {steps_done * self.batch_size / elapsed:,.0f} samples/s" if elapsed else ""
            self.bar.update(self.task, completed=steps_done, info=f"loss {loss:.4f}{speed}")
        elif not self.live and time.monotonic() - self.said >= PLAIN_EVERY_SECONDS:
            self.said = time.monotonic()  # a long epoch in a log file: a sign of life once a minute
            self.out.print(f"{self.label}epoch {self.epoch}/{self.epochs}: step {steps_done}/{self.steps}, "
                           f"loss {loss:.4f}")

    def resumed(self, epochs_done: int, epochs: int) -> None:
        if epochs_done >= epochs:  # killed after its last epoch, before its summary was written
            self.out.print(f"{self.label}finishing from its checkpoint after its last epoch ({epochs_done}/{epochs})")
        else:
            self.out.print(f"{self.label}resuming from its checkpoint at epoch {epochs_done + 1}/{epochs}")

    def unusable_checkpoint(self, epochs: int) -> None:
        self.out.print(f"{self.label}warning: its checkpoint is damaged or not this run's; training again from "
                       f"epoch 1/{epochs}")

    def epoch_end(self, r: EpochRecord) -> None:
        line = (f"{self.label}epoch {r.epoch}/{self.epochs}  train_loss {r.train_loss:.4f}  "
                f"train_acc {r.train_acc:.2f}%  test_acc {r.test_acc:.2f}%")
        if not math.isnan(r.test_acc_batch_stats):
            line += f"  (batch stats {r.test_acc_batch_stats:.2f}%"
            line += f", precise {r.test_acc_precise:.2f}%)" if not math.isnan(r.test_acc_precise) else ")"
        self.out.print(line + f"  {r.samples_per_s:,.0f} samples/s  {r.seconds:.1f}s")


IN_RUN_ID = ("model", "norm", "batch_size", "seed")  # what a run id already says (and norm.*: its label)


def _unnamed_settings(planned) -> dict[str, str]:
    """Run id -> the settings its sweep varies that its id does not name (norm_batch_size=2, lr=0.1, ...),
    so runs that differ only in those are told apart in the progress lines."""
    if not planned:
        return {}
    shared = set.intersection(*(set(p.overrides) for p in planned))
    out = {}
    for p in planned:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in p.overrides]
        varied = [o for o, k in zip(p.overrides, keys)
                  if o not in shared and k not in IN_RUN_ID and not k.startswith("norm.")]
        out[p.run_id or run_id(p.cfg)] = " ".join(varied)
    return out


class SweepDisplay(EpochProgress):
    """Overall sweep progress (runs done / total, failures, time left) above the runs in training.

    Everything is read from the run folders, so it is right whichever process trains the runs: with
    `--jobs N` each worker's current run has a line of its own. The epoch bar is drawn only for runs
    trained in this process.
    """

    def __init__(self, out: Console = console):
        super().__init__(epochs=0, batch_size=1, out=out)
        self.overall = None
        self.planning = None
        self.reported: set[str] = set()
        self.total = 0
        self.failed = 0
        self.costs: dict[str, float] = {}  # the planner's estimate for each run this sweep trains
        self.extra: dict[str, str] = {}  # the varied settings a run id does not name
        self.cost_done = self.cost_left = 0.0
        self.started = time.monotonic()
        self.active: dict[str, int] = {}  # runs in training -> their bar

    def note(self, text: str) -> None:
        note(text, self.out)

    def planned(self, job) -> None:
        """One more job composed and checked: a count while the sweep is planned (on a terminal only)."""
        if self.bar:
            if self.planning is None:
                self.planning = self.bar.add_task("planning", total=None, info="")
            self.bar.advance(self.planning)

    def start_sweep(self, planned, retry_failed: bool) -> None:
        from normbench.sweep import to_train

        if self.bar and self.planning is not None:
            self.bar.remove_task(self.planning)
            self.planning = None
        valid = [p for p in planned if p.cfg is not None and p.state != "duplicate"]
        todo = to_train(planned, retry_failed)
        self.total = len(valid)
        self.costs = {self._rid(p): p.cost for p in todo}
        self.cost_left = sum(self.costs.values())  # kept up to date run by run: O(1) per finished run
        self.extra = _unnamed_settings(valid)
        self.reported = {self._rid(p) for p in valid} - set(self.costs)
        self.started = time.monotonic()
        over = threads.over_cores_note(p.cfg.threads for p in valid)
        if over:
            self.note(over)
        invalid = sum(1 for p in planned if p.state == "invalid")
        if invalid:
            self.note(f"{invalid} of the sweep's {len(planned)} jobs cannot run and are not trained; the end of the "
                      "sweep lists them with the reason (--dry-run lists them before any training)")
        if self.bar:
            self.overall = self.bar.add_task("sweep", total=self.total, info="")
            self.bar.update(self.overall, completed=len(self.reported))
        else:
            self.out.print(f"sweep: {self.total} run{'' if self.total == 1 else 's'}, {len(self.reported)} already done")

    @staticmethod
    def _rid(p) -> str:
        return p.run_id or run_id(p.cfg)

    def time_left(self) -> float | None:
        """Seconds left: the cost still to train at the rate (cost per second of wall time) of this sweep
        so far; None until a run has finished, or when the planner gave no costs."""
        left = self.cost_left
        elapsed = time.monotonic() - self.started
        if self.cost_done <= 0 or elapsed <= 0 or left < 0:
            return None
        return left * elapsed / self.cost_done

    def _info(self) -> str:
        parts = [f"{self.failed} failed"] if self.failed else []
        left = self.time_left()
        if len(self.reported) < self.total:
            parts.append(f"about {duration(left)} left" if left is not None else "time left: after the first run")
        return "  ".join(parts)

    def runs_changed(self, status: dict[str, dict | None], training: list[str] = ()) -> None:
        """`status`: each run's finished summary, or None; `training`: the runs being trained right now."""
        for rid, summary in sorted(status.items()):
            state = (summary or {}).get("status")
            if rid in self.reported or state not in FINISHED:
                continue
            self.reported.add(rid)
            self.cost_done += self.costs.get(rid, 0.0)
            self.cost_left -= self.costs.get(rid, 0.0)
            self.failed += state == "failed"
            acc = ((summary.get("final") or {}).get("test_acc"))
            note = f"test_acc {acc:.2f}%" if acc is not None else (summary.get("error") or "")
            left = self.time_left()
            tail = f"  ({duration(left)} left)" if left is not None and len(self.reported) < self.total else ""
            what = f"{rid} ({self.extra[rid]})" if self.extra.get(rid) else rid
            self.out.print(f"[{len(self.reported)}/{self.total}] {what}: {state} {note}{tail}")
        if self.bar and self.overall is not None:
            self.bar.update(self.overall, completed=len(self.reported), info=self._info())
            self._show_training([rid for rid in training if rid not in self.reported])

    def _show_training(self, training: list[str]) -> None:
        """One line per run in training in another process (a worker's); this process's own run has its
        epoch bar instead."""
        own = self.label.strip()
        shown = [rid for rid in training if rid != own]
        for rid in set(self.active) - set(shown):
            self.bar.remove_task(self.active.pop(rid))
        for rid in shown:
            if rid not in self.active:
                self.active[rid] = self.bar.add_task(f"  training {rid}", total=None, info="")

    def run_start(self, name: str, epochs: int, batch_size: int) -> None:
        self.epochs, self.batch_size, self.label = epochs, batch_size, f"{name} "

    def epoch_end(self, record: EpochRecord) -> None:
        """A sweep prints one line per finished run (runs_changed); off a terminal, long runs also say
        each epoch, so a log shows progress."""
        if not self.live and record.seconds / max(record.epoch, 1) >= LONG_RUN_SECONDS:
            super().epoch_end(record)
