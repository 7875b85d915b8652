"""The probes' tables across runs: pure pandas, no I/O (normbench/probes/ writes them, `probes.section`
reads them).

Every function takes the stacked long tables of `combine`: one probe's rows from many runs, each row
tagged with its run (``run_id``, ``model``, ``norm``, ``train_batch_size``, ``seed``). A *condition* is
(model, norm, training batch size); seeds are its repeats, and intervals are over seeds (`stats.mean_ci`,
`stats.diff_ci`). A run first becomes one number per quantity (`per_run`), so that steps and layers
are never counted as independent samples.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normbench.analysis.stats import diff_ci, mean_ci

RUN_KEYS = ("run_id", "model", "norm", "train_batch_size", "seed")  # the run's own batch size: the
# batch-statistics probe has a batch_size column of its own (the B it measures)


def combine(tables: list[tuple[dict, pd.DataFrame]]) -> pd.DataFrame:
    """One probe's tables from many runs, stacked; each row gets its run's `RUN_KEYS` from the dict."""
    frames = [table.assign(**{k: run[k] for k in RUN_KEYS}) for run, table in tables if len(table)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def over_seeds(per_seed: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """For each group of `by`: the mean over seeds, the half-width of its 95% interval, and n."""
    rows = []
    for key, g in per_seed.groupby(by, dropna=False, sort=True):
        mean, half, n = mean_ci(g[value])
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "mean": mean, "ci95": half, "n": n})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci95", "n"])


def per_run(frame: pd.DataFrame, quantities: list[str], steps: str = "all", layers: str = "all",
            min_depth: int = 0) -> pd.DataFrame:
    """One number per run and quantity: the mean over its measured steps (or its first / last step) and over
    layers of depth >= `min_depth` (or its last layer)."""
    f = frame[frame.quantity.isin(quantities) & (frame.depth >= min_depth)]
    if steps in ("first", "last"):
        pick = f.groupby("run_id").step.transform("min" if steps == "first" else "max")
        f = f[f.step == pick]
    if layers == "last":
        f = f[f.depth == f.groupby("run_id").depth.transform("max")]
    return f.groupby([*RUN_KEYS, "quantity"], as_index=False).value.mean()


def compare(per_run_frame: pd.DataFrame, quantity: str, model: str, a: str, b: str) -> tuple[float, float, int, int]:
    """mean(norm a) - mean(norm b) of `quantity` on `model`, with its Welch 95% half-width, and each side's n."""
    f = per_run_frame[(per_run_frame.quantity == quantity) & (per_run_frame.model == model)]
    va, vb = f[f.norm == a].value.to_numpy(), f[f.norm == b].value.to_numpy()
    d, half = diff_ci(va, vb)
    return d, half, int(np.isfinite(va).sum()), int(np.isfinite(vb).sum())


def curves(frame: pd.DataFrame, quantity: str, by: tuple[str, ...] = ("model", "norm")) -> pd.DataFrame:
    """`quantity` over training: per condition in `by` and step, the mean over seeds with its interval."""
    f = frame[frame.quantity == quantity]
    per_seed = f.groupby([*by, "seed", "step"], as_index=False).value.mean()
    return over_seeds(per_seed, [*by, "step"])


def per_layer(frame: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """`quantity` per layer (depth), mean over each run's steps, then over seeds, per model and norm."""
    f = frame[frame.quantity == quantity]
    per_seed = f.groupby(["model", "norm", "seed", "depth"], as_index=False).value.mean()
    return over_seeds(per_seed, ["model", "norm", "depth"])


def batch_error(frame: pd.DataFrame, stat: str = "mean", quantile: float = 0.5, step: str = "last") -> pd.DataFrame:
    """Batch-statistics error per (model, norm, layer depth, batch size): at each run's first or last
    measured step, the chosen quantile, mean over seeds with its interval; plus the values per statistic."""
    f = frame[(frame.stat == stat) & np.isclose(frame["quantile"].astype(float), quantile)]
    pick = f.groupby("run_id").step.transform("min" if step == "first" else "max")
    f = f[f.step == pick]
    out = over_seeds(f, ["model", "norm", "depth", "batch_size"])
    values = f.groupby(["model", "norm", "depth", "batch_size"]).agg(values=("values", "first"), layer=("layer", "first"))
    return out.join(values, on=["model", "norm", "depth", "batch_size"])


def loglog_slope(batch_sizes, errors) -> float:
    """Least-squares slope of log(error) against log(B); -0.5 is the 1/sqrt(B) law. NaN with < 2 points."""
    x, y = np.asarray(batch_sizes, dtype=float), np.asarray(errors, dtype=float)
    keep = np.isfinite(y) & (y > 0) & (x > 0)
    if len(np.unique(x[keep])) < 2:
        return math.nan
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def batch_error_slopes(frame: pd.DataFrame, stat: str = "mean", quantile: float = 0.5) -> pd.DataFrame:
    """Per run and layer, the log-log slope of the error against B at its last step; then per (model, norm,
    depth) the mean over seeds with its interval. The 1/sqrt(B) law gives -0.5."""
    f = frame[(frame.stat == stat) & np.isclose(frame["quantile"].astype(float), quantile)]
    f = f[f.step == f.groupby("run_id").step.transform("max")]
    slopes = (f.groupby([*RUN_KEYS, "depth"])[["batch_size", "value"]]
              .apply(lambda g: loglog_slope(g.batch_size, g.value)).rename("value").reset_index())
    return over_seeds(slopes, ["model", "norm", "depth"])
