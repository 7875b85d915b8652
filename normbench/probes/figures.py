"""The probes' figures, from the tables of `normbench.analysis.probes` (matplotlib, no I/O: callers save them).

* `batch_error_figure`: batch-statistics error against B per layer, log-log, with a 1/sqrt(B) reference;
* `over_training_figure`: a quantity over training steps per norm, with bands over seeds (landscape);
* `per_layer_figure`: a quantity per layer per norm, with bands over seeds (ICS, residual ratio).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _grid(rows: int, cols: int, width: float = 4.6, height: float = 3.4):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def _band(ax, x, mean, half, label: str, log: bool = False) -> None:
    """A mean line and its interval band; on a log axis the band's foot stops at a tenth of the mean."""
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
    half = np.nan_to_num(np.asarray(half, dtype=float))
    mean = np.asarray(mean, dtype=float)
    low = np.maximum(mean - half, mean / 10) if log else mean - half
    ax.fill_between(x, low, mean + half, color=line.get_color(), alpha=0.2)


def batch_error_figure(table: pd.DataFrame, stat: str) -> plt.Figure:
    """One panel per (model, norm): the relative error of a batch's `stat` against B, a line per layer, and
    the 1/sqrt(B) law through the first layer's smallest B (dashed)."""
    panels = list(table.groupby(["model", "norm"], sort=True))
    cols = min(len(panels), 3)
    fig, axes = _grid((len(panels) + cols - 1) // cols, cols)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((model, norm), g) in zip(axes.flat, panels):
        for depth, layer in g.groupby("depth", sort=True):
            layer = layer.sort_values("batch_size")
            _band(ax, layer.batch_size, layer["mean"], layer.ci95, f"{depth}: {layer.layer.iloc[0]}", log=True)
        first = g[g.depth == g.depth.min()].sort_values("batch_size")
        if len(first) and np.isfinite(first["mean"].iloc[0]):
            b = np.asarray(sorted(g.batch_size.unique()), dtype=float)
            ax.plot(b, first["mean"].iloc[0] * np.sqrt(b[0] / b), "k--", linewidth=1, label="1/√B")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(f"|{'μ' if stat == 'mean' else 'σ'}_B − population| / σ (median)")
        ax.set_title(f"{model} / {norm}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, title="layer", title_fontsize=7)
    fig.tight_layout()
    return fig


def over_training_figure(tables: dict[str, pd.DataFrame], log: bool = True) -> plt.Figure:
    """A row per quantity (`tables`: quantity -> `analysis.probes.curves`), a column per model, a line per
    norm over training steps with its band over seeds."""
    return _lines_figure(tables, "step", "step", {q: log for q in tables})


def per_layer_figure(tables: dict[str, pd.DataFrame], xlabel: str = "layer (forward order)",
                     log: dict[str, bool] | None = None) -> plt.Figure:
    """A row per quantity (`tables`: quantity -> `analysis.probes.per_layer`), a column per model, a line per
    norm across layers with its band over seeds."""
    return _lines_figure(tables, "depth", xlabel, log or {})


def _lines_figure(tables: dict[str, pd.DataFrame], x: str, xlabel: str, log: dict[str, bool]) -> plt.Figure:
    """A row per quantity, a column per model, a line per norm along column `x` with its band over seeds."""
    models = sorted({m for t in tables.values() for m in t.model.unique()})
    fig, axes = _grid(len(tables), max(len(models), 1))
    for r, (quantity, table) in enumerate(tables.items()):
        for c, model in enumerate(models):
            ax = axes[r, c]
            for norm, g in table[table.model == model].groupby("norm", sort=True):
                g = g.sort_values(x)
                _band(ax, g[x], g["mean"], g.ci95, norm, bool(log.get(quantity)))
            if log.get(quantity):
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(quantity.replace("_", " "))
            ax.set_title(model)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
