"""Rich output for the terminal: the shared Console, the final metrics table, the planning count.

One Console is shared by everything that prints, so progress bars and messages do not tear. This
module imports no torch, so commands that train nothing start fast; the training progress bars are
in `normbench.progress`.
"""

from __future__ import annotations

import codecs
import math
import os
from contextlib import contextmanager

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import Progress as RichBar, SpinnerColumn, TextColumn
from rich.table import Table

PLAIN_WIDTH = 1000  # off a terminal: lines as long as their content, never cut at 80 columns


TRANSLITERATE = "normbench"  # the codec error handler that writes "±" as "+/-" where the output cannot encode it
_ASCII = {"±": "+/-", "×": "x", "…": "...", "—": "-", "–": "-", "→": "->", "≥": ">=", "≤": "<=", "√": "sqrt",
          "σ": "sigma", "μ": "mu", "β": "beta", "γ": "gamma", "η": "eta", "·": "*", "²": "^2", "−": "-", "‖": "||",
          "′": "'"}


def _transliterate(error: UnicodeEncodeError) -> tuple[str, int]:
    text = error.object[error.start:error.end]
    return "".join(_ASCII.get(c, "?") for c in text), error.end


codecs.register_error(TRANSLITERATE, _transliterate)


class _Console(Console):
    """A Console that, off a terminal (a pipe, a log file, CI), lays tables and sentences out at their
    natural width instead of Rich's default 80 columns, which split cells like "94.0 ± 2.6" over two
    lines. COLUMNS, when set, still wins. Where the output cannot encode a character ("±" under
    PYTHONIOENCODING=ascii or a C locale) every string is transliterated before it is measured and
    laid out ("+/-"), so table columns stay aligned."""

    def render_str(self, text: str, **kwargs):
        try:
            text.encode(self.encoding)
        except UnicodeEncodeError:
            text = text.encode(self.encoding, errors=TRANSLITERATE).decode(self.encoding)
        return super().render_str(text, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(PLAIN_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console(highlight=False)
stderr = _Console(highlight=False, stderr=True)  # errors, and notes where stdout must stay data (config's YAML)


def note(text: str | None, out: Console = console) -> None:
    """A yellow 'note:' line, when there is one (`text` is None when there is nothing to say)."""
    if text:
        out.print(f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True)


def duration(seconds: float) -> str:
    """A time for people: seconds (to the 10 s below 90 s), minutes, or hours."""
    if seconds < 90:
        return f"{max(1, round(seconds / 10) * 10):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def summary_table(summary: dict) -> Table:
    """The final metrics of one run."""
    from normbench.config.ids import norm_label  # deferred: the config package imports Hydra

    final = summary.get("final") or {}
    cfg = summary["config"]
    title = (f"{cfg['model']['name']} / {norm_label(cfg['norm'])} / {cfg['data']['name']}, "
             f"batch {cfg['batch_size']}, seed {cfg['seed']}: {summary['status']}")
    table = Table(title=title, show_header=True, header_style="bold", min_width=len(title) + 4)  # title on one line
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("test accuracy (eval mode)", _fmt(final.get("test_acc"), "%")),
        ("test accuracy, batch statistics", _fmt(final.get("test_acc_batch_stats"), "%")),
        ("test accuracy, recomputed statistics", _fmt(final.get("test_acc_precise"), "%")),
        ("test loss", _fmt(final.get("test_loss"))),
        ("train loss", _fmt(final.get("train_loss"))),
        ("train accuracy", _fmt(final.get("train_acc"), "%")),
        ("epochs / steps", f"{summary['epochs_completed']} / {summary['steps']}"),
        ("effective lr", f"{summary['effective_lr']:.4g}"),
        ("parameters", f"{summary['num_parameters']:,}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s on {summary['device']}"),
    ]
    if summary.get("diverged_step"):
        rows.append(("diverged at step", str(summary["diverged_step"])))
    for name, value in rows:
        table.add_row(name, value)
    return table


@contextmanager
def planning_count(out: Console = console):
    """A live count of the jobs planned so far, on a terminal; off a terminal nothing (no line per job).
    Yields the function to call once per planned job."""
    if not out.is_terminal:
        yield lambda job=None: None
        return
    with RichBar(SpinnerColumn(), TextColumn("planning: {task.completed} jobs"), console=out, transient=True) as bar:
        task = bar.add_task("planning", total=None)
        yield lambda job=None: bar.advance(task)
