"""The report's figures, drawn from hand-made tables: ticks people can read, legends off the data, batch colours."""

from __future__ import annotations

import re

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from normbench import plots

BATCHES = [2, 4, 8, 16, 32, 64, 128]
NORMS = ["bn", "gn", "ln", "none", "in", "rms", "frn", "brn"]


def fake_summary() -> pd.DataFrame:
    """Eight norms as flat lines from 10% to 95% at every batch size: data in every corner of the panel."""
    rows = []
    for i, norm in enumerate(NORMS):
        for b in BATCHES:
            acc = 10.0 + i * 85.0 / (len(NORMS) - 1)
            rows.append({"data": "mnist", "model": "mlp", "norm": norm, "batch_size": b, "n": 3, "n_planned": 3,
                         "n_diverged": 0, "n_failed": 0, "n_missing": 0, "test_acc_mean": acc, "test_acc_ci95": 1.0,
                         "test_acc_batch_stats_mean": acc - 5, "test_acc_batch_stats_ci95": 1.0,
                         "test_acc_precise_mean": acc + 2 if norm.startswith("bn") else np.nan,
                         "test_acc_precise_ci95": 1.0})
    return pd.DataFrame(rows)


def fake_curves(epochs: int = 3) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Losses from 2.3 down to about 1.5 (less than a decade: matplotlib labels minor log ticks)."""
    runs, curves = [], {}
    for norm in ("bn", "ln"):
        for b in BATCHES[:4]:
            rid = f"mlp-{norm}-b{b}"
            runs.append({"run_id": rid, "status": "completed", "data": "mnist", "model": "mlp", "norm": norm,
                         "batch_size": b})
            epoch = np.arange(1, epochs + 1)
            curves[rid] = pd.DataFrame({"epoch": epoch, "train_loss": 2.3 - 0.7 * epoch / epochs - 0.01 * b})
    return pd.DataFrame(runs), curves


def drawn(fig):
    fig.canvas.draw()
    return fig


def tick_texts(ax, axis: str) -> list[str]:
    """The labels of the ticks inside the axis' view, minor ones too."""
    axis_obj = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = [t for t in axis_obj.get_major_ticks() + axis_obj.get_minor_ticks()]
    return [t.label1.get_text() for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_text()]


@pytest.mark.parametrize("epochs", [1, 3, 30])
def test_training_curves_have_whole_epochs_and_plain_loss_ticks(epochs):
    runs, curves = fake_curves(epochs)
    fig = drawn(plots.training_curves(runs, curves, "t"))
    for ax in [a for a in fig.axes if a.get_visible()]:
        epochs = tick_texts(ax, "x")
        assert epochs and all(re.fullmatch(r"\d+", e) for e in epochs), epochs
        losses = tick_texts(ax, "y")
        assert len(losses) >= 2 and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in losses), losses


def test_batch_sizes_take_a_sequential_colormap():
    runs, curves = fake_curves()
    fig = plots.training_curves(runs, curves, "t")
    ax = fig.axes[0]
    colors = {line.get_label(): matplotlib.colors.to_rgb(line.get_color()) for line in ax.get_lines()}
    ordered = [colors[f"B={b}"] for b in BATCHES[:4]]
    assert len(set(ordered)) == 4
    # viridis: lightness grows with the batch size, so B=2...16 read as an ordered scale
    lightness = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in ordered]
    assert lightness == sorted(lightness) and min(np.diff(lightness)) > 0.05


def _points(fig) -> np.ndarray:
    """Display coordinates of every plotted data point (line vertices) in the figure."""
    points = []
    for ax in fig.axes:
        for line in ax.get_lines():
            xy = np.column_stack([np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)])
            xy = xy[np.isfinite(xy).all(axis=1)]
            if len(xy):
                points.append(ax.transData.transform(xy))
    return np.concatenate(points)


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


@pytest.mark.parametrize("figure", ["accuracy_vs_batch", "bn_eval_modes", "training_curves"])
def test_legends_never_cover_a_data_point(figure):
    summary = fake_summary()
    runs, curves = fake_curves()
    fig = {"accuracy_vs_batch": lambda: plots.accuracy_vs_batch(summary, "t"),
           "bn_eval_modes": lambda: plots.bn_eval_modes(summary, "t"),
           "training_curves": lambda: plots.training_curves(runs, curves, "t")}[figure]()
    drawn(fig)
    renderer = fig.canvas.get_renderer()
    legends = _legends(fig)
    assert len(legends) == 1  # one legend for the figure, not one per panel
    box = legends[0].get_window_extent(renderer)
    points = _points(fig)
    inside = (points[:, 0] >= box.x0) & (points[:, 0] <= box.x1) & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1)
    assert not inside.any(), f"{inside.sum()} data points under the legend"
    panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
    assert not any(box.overlaps(panel) for panel in panels)


def test_a_norm_has_the_same_colour_in_every_panel():
    summary = fake_summary()
    other = summary[summary.norm.isin(["gn", "bn"])].assign(model="cnn")
    fig = plots.accuracy_vs_batch(pd.concat([summary, other]), "t")
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                colours.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert all(len(c) == 1 for c in colours.values()), colours


def test_training_curves_keep_runs_of_other_settings_apart():
    runs, curves = fake_curves()
    runs["config.epochs"] = 3
    longer = runs.assign(run_id=runs.run_id + "-e5", **{"config.epochs": 5})
    curves.update({f"{rid}-e5": curves[rid].assign(train_loss=0.5) for rid in runs.run_id})
    fig = plots.training_curves(pd.concat([runs, longer], ignore_index=True), curves, "t")
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_visible())
    assert titles == ["mnist / mlp / epochs=3 / bn", "mnist / mlp / epochs=3 / ln",
                      "mnist / mlp / epochs=5 / bn", "mnist / mlp / epochs=5 / ln"]


def test_training_curves_keep_runs_that_leave_a_setting_unset():
    """A setting some runs leave unset (NaN in the runs table) is a panel of its own, not a dropped one: with two
    such settings that no run sets both of, every run was dropped and the report crashed."""
    runs, curves = fake_curves()
    runs["config.norm_batch_size"] = [4 if i % 2 else np.nan for i in range(len(runs))]
    runs["config.optim.weight_decay"] = [np.nan if i % 2 else 0.1 for i in range(len(runs))]
    fig = plots.training_curves(runs, curves, "t")
    lines = sum(len(ax.get_lines()) for ax in fig.axes if ax.get_visible())
    assert lines == len(runs)  # one batch size per line per panel: every run is drawn
    assert any("norm_batch_size=null" in ax.get_title() for ax in fig.axes)  # as a config writes it
