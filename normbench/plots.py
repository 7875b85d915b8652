"""Figures from the analysis tables (matplotlib, no I/O: callers save them).

A point whose condition lost seeds (diverged, failed, missing) is circled in red and labelled
with the counts ('2/3 diverged'); a condition with no completed seed gets a red triangle and its
label at the bottom of the panel, where its line has no point.

Each figure has one legend, outside the panels (constrained layout makes room for it), so it never
covers data; a norm, an evaluation or a batch size has the same colour in every panel. Batch sizes
take a sequential colormap (viridis, dark = small), epochs are whole numbers, and log-scaled losses
are labelled in plain decimals (0.5, 2), not 2×10⁰.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator  # noqa: E402

from normbench.analysis import condition_columns, lost_seeds  # noqa: E402
from normbench.analysis.tables import value_text  # noqa: E402

PANEL_KEYS = ("data", "model")


def _panels(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = [k for k in summary.columns if k in PANEL_KEYS or k.startswith("config.")]
    out = []
    for key, g in summary.groupby(keys, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        title = " / ".join(str(v) for k, v in zip(keys, key) if not k.startswith("config."))
        title += "".join(f", {k.split('.', 1)[1]}={v}" for k, v in zip(keys, key) if k.startswith("config."))
        out.append((title, g))
    return out


def _grid(n: int, width: float = 5.0, height: float = 3.6):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _legend(fig, axes, title: str, order: list[str] | None = None) -> None:
    """One legend for the figure, right of the panels: every label once, in `order` or as first plotted."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = sorted(entries, key=order.index) if order else list(entries)
    fig.legend([entries[k] for k in labels], labels, title=title, loc="outside right upper", fontsize=8)


def _colors(names) -> dict:
    """A colour per name, the same in every panel (matplotlib's default cycle, in sorted order)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(sorted(set(map(str, names))))}


def _batch_axis(ax, sizes) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([str(int(s)) for s in sorted(sizes)])
    ax.set_xlabel("batch size (log2 scale)")
    ax.grid(True, alpha=0.3)


def _accuracy_panel(ax, sizes, title: str) -> None:
    _batch_axis(ax, sizes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)


def _line(ax, x, mean, half, label, color=None) -> str:
    """One mean line with its interval band; returns the line's colour."""
    (line,) = ax.plot(x, mean, marker="o", label=label, color=color)
    mean = np.asarray(mean, dtype=float)
    half = np.nan_to_num(np.asarray(half, dtype=float))
    ax.fill_between(x, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100), color=line.get_color(),
                    alpha=0.2)  # clipped to the accuracy bounds
    return line.get_color()


def _mark_lost(ax, rows: pd.DataFrame, color) -> None:
    """Circle and label the points of conditions whose seeds did not all complete (summary rows)."""
    for _, row in rows.iterrows():
        text = lost_seeds(row)
        if not text:
            continue
        if np.isfinite(row.test_acc_mean):
            ax.plot(row.batch_size, row.test_acc_mean, marker="o", markersize=11, color="red",
                    markerfacecolor="none", markeredgewidth=1.5, linestyle="none")
            ax.annotate(text, (row.batch_size, row.test_acc_mean), xytext=(6, -12), textcoords="offset points",
                        fontsize=7, color="red")
        else:  # nothing to plot: mark the batch size at the bottom of the panel
            ax.plot(row.batch_size, 0.02, marker="^", color=color, markeredgecolor="red", linestyle="none",
                    transform=ax.get_xaxis_transform())
            ax.annotate(text, (row.batch_size, 0.02), xycoords=ax.get_xaxis_transform(), xytext=(6, 0),
                        textcoords="offset points", fontsize=7, color="red", va="bottom")


def accuracy_vs_batch(summary: pd.DataFrame, title: str):
    """Test accuracy vs batch size, one line per norm with its 95% interval, one panel per data/model."""
    panels = _panels(summary)
    fig, axes = _grid(len(panels))
    color_of = _colors(summary.norm)
    for ax, (name, g) in zip(axes, panels):
        for norm, n in g.groupby("norm"):
            n = n.sort_values("batch_size")
            color = _line(ax, n.batch_size, n.test_acc_mean, n.test_acc_ci95, norm, color_of[str(norm)])
            _mark_lost(ax, n, color)
        _accuracy_panel(ax, g.batch_size.unique(), name)
    _legend(fig, axes, "norm")
    fig.suptitle(f"{title}: test accuracy vs batch size\n(mean and 95% interval over seeds; red: seeds lost)")
    return fig


def bn_eval_modes(summary: pd.DataFrame, title: str):
    """BN's three evaluations vs batch size: running averages, batch statistics, recomputed statistics."""
    bn = summary[summary.norm.astype(str).str.startswith("bn") & summary.test_acc_precise_mean.notna()]
    if bn.empty:
        return None
    panels = [(f"{name} / {norm}", n) for name, g in _panels(bn) for norm, n in g.groupby("norm")]
    fig, axes = _grid(len(panels))
    modes = [("test_acc", "running averages (eval mode)"), ("test_acc_batch_stats", "the batch's own statistics"),
             ("test_acc_precise", "recomputed population statistics")]
    color_of = _colors(label for _, label in modes)
    for ax, (name, g) in zip(axes, panels):
        g = g.sort_values("batch_size")
        for column, label in modes:
            color = _line(ax, g.batch_size, g[f"{column}_mean"], g[f"{column}_ci95"], label, color_of[label])
            if column == "test_acc":
                _mark_lost(ax, g, color)
        _accuracy_panel(ax, g.batch_size.unique(), name)
    _legend(fig, axes, "BN evaluated with")
    fig.suptitle(f"{title}: batch norm evaluated three ways")
    return fig


def _plain(value: float, _position=None) -> str:
    """A tick label in plain decimals: 0.05, 0.5, 2, 10."""
    return f"{value:g}"


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, written as plain decimals (2, not 2×10⁰)."""

    def __call__(self, x, pos=None) -> str:
        return _plain(x) if super().__call__(x, pos) else ""


def _loss_axis(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_ylabel("train loss (log scale)")


def training_curves(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], title: str):
    """Train loss per epoch (mean over seeds), one line per batch size, one panel per data/model/norm."""
    done = runs[(runs.status == "completed") & runs.run_id.isin(list(curves))]  # a damaged metrics.csv: no curve
    if done.empty:
        return None
    keys = ["data", "model", *[c for c in condition_columns(done) if c.startswith("config.")], "norm"]
    panels = list(done.groupby(keys, dropna=False))  # a setting some runs leave unset: a panel of its own
    fig, axes = _grid(len(panels), width=4.2, height=3.0)
    batches = sorted(done.batch_size.unique())
    color_of = dict(zip(batches, plt.cm.viridis(np.linspace(0, 0.9, len(batches)))))  # dark: small batch
    for ax, (key, g) in zip(axes, panels):
        epochs = set()
        for batch, b in g.groupby("batch_size"):
            frames = [curves[r][["epoch", "train_loss"]] for r in b.run_id if r in curves]
            mean = pd.concat(frames).groupby("epoch").train_loss.mean()
            ax.plot(mean.index, mean.values, marker=".", color=color_of[batch], label=f"B={batch}")
            epochs.update(int(e) for e in mean.index)
        ax.set_title(" / ".join(str(v) if not k.startswith("config.") else f"{k.split('.', 1)[1]}={value_text(v)}"
                                for k, v in zip(keys, key)), fontsize=9)
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(sorted(epochs))  # one tick per epoch (a single epoch too, where a locator makes 0.95...)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _loss_axis(ax)
        ax.grid(True, alpha=0.3)
    _legend(fig, axes, "batch size", [f"B={b}" for b in batches])
    fig.suptitle(f"{title}: training loss by batch size (mean over seeds)")
    return fig


def metric_vs_factor(runs: pd.DataFrame, factor: str, metric: str, title: str):
    """A metric against any swept setting (x: its levels), one line per norm with its 95% interval over seeds,
    one panel per combination of the other varied settings. None when the factor has fewer than two levels."""
    from normbench.analysis.effects import levels
    from normbench.analysis.stats import mean_ci

    done = runs[(runs.status == "completed") & runs[factor].notna()]
    found = levels(done, factor)
    if len(found) < 2:
        return None
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in found)
    position = {str(v): (float(v) if numeric else i) for i, v in enumerate(found)}
    keys = [k for k in ["data", "model", "batch_size", *[c for c in condition_columns(done) if c.startswith("config.")]]
            if k != factor and done[k].astype(str).nunique() > 1 or k in ("data", "model")]
    panels = list(done.groupby(keys, dropna=False))
    fig, axes = _grid(len(panels))
    line = "config.norm.name" if factor.startswith("config.norm.") else "norm"  # 'bn', not 'bn(position=...)'
    color_of = _colors(done[line])
    for ax, (key, g) in zip(axes, panels):
        for norm, n in g.groupby(line):
            points = [(position[str(v)], *mean_ci(pd.to_numeric(r[metric], errors="coerce"))[:2])
                      for v, r in n.groupby(n[factor].astype(str), sort=False) if str(v) in position]
            points.sort()
            if points:
                x, mean, half = zip(*points)
                _line(ax, x, mean, half, str(norm), color_of[str(norm)])
        ax.set_title(" / ".join(f"{k.removeprefix('config.')}={value_text(v)}" if k not in ("data", "model") else str(v)
                                for k, v in zip(keys, key if isinstance(key, tuple) else (key,))), fontsize=9)
        if numeric and min(position.values()) > 0 and max(position.values()) / min(position.values()) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(position.values()))
        ax.set_xticklabels([v.removesuffix(".0") for v in position])
        ax.set_xlabel(factor.removeprefix("config."))
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    _legend(fig, axes, "norm")
    fig.suptitle(f"{title}: {metric} vs {factor.removeprefix('config.')}\n(mean and 95% interval over seeds)")
    return fig
