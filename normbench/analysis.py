"""From run folders to tables and a verdict: pure pandas, no I/O.

* `runs_table`: one row per run, every config key flattened (``norm.num_groups``),
  labels for data/model/norm that include the keys that vary within the experiment.
* `summary_table`: one row per condition (data x model x norm x batch size x any
  other varied setting but the seed), with mean, std, 95% t-interval, min and max.
* `pivot`, `delta_vs_bn`, `degradation`: the views the GN paper uses.
* `verdict`: sentences computed from those tables; nothing is decided in advance.

Accuracies are in percent; differences are in percentage points.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normbench.config import NOT_HASHED

METRICS = ["test_acc", "test_acc_batch_stats", "test_acc_precise", "train_loss", "test_loss", "train_acc"]
LABELLED = ("data", "model", "norm")
NOT_CONDITIONS = {"seed", *NOT_HASHED}  # settings that do not define a condition

# Two-sided 95% quantiles of Student's t, df = 1..30.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (NaN when df < 1)."""
    if not df >= 1:
        return math.nan
    if df <= 30 and float(df).is_integer():
        return _T95[int(df) - 1]
    if df < 30:  # fractional (Welch) df: interpolate between the neighbours
        lo = math.floor(df)
        return _T95[lo - 1] + (df - lo) * (_T95[lo] - _T95[lo - 1])
    z = 1.959964  # Cornish-Fisher expansion, accurate to 1e-4 beyond 30 df
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of the 95% t-interval, and n of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), t95(n - 1) * float(v.std(ddof=1)) / math.sqrt(n), n


def diff_ci(a, b) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval."""
    a = np.asarray([x for x in a if np.isfinite(x)], dtype=float)
    b = np.asarray([x for x in b if np.isfinite(x)], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return d, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return d, t95(df) * se


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return flat


def _varying(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if frame[c].astype(str).nunique(dropna=False) > 1]


def runs_table(summaries: list[dict], curves: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per run from its summary.json (with the config inside); curves add mean samples/s."""
    rows = []
    for s in summaries:
        row = {f"config.{k}": v for k, v in _flatten(s["config"]).items()}
        final = s.get("final") or {}
        row.update({
            "run_id": s["run_id"], "status": s["status"], "error": s.get("error"),
            "seed": s["config"]["seed"], "batch_size": s["config"]["batch_size"],
            "effective_lr": s.get("effective_lr"), "epochs": s.get("epochs_completed"), "steps": s.get("steps"),
            **{m: final.get(m) for m in METRICS},
            "best_test_acc": s.get("best_test_acc"), "diverged_step": s.get("diverged_step"),
            "wall_seconds": s.get("wall_seconds"), "samples_per_s": final.get("samples_per_s"),
        })
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    config_cols = [c for c in frame.columns if c.startswith("config.")]
    for group in LABELLED:
        frame[group] = _labels(frame, group, [c for c in config_cols if c.startswith(f"config.{group}.")])
    for m in METRICS + ["best_test_acc", "effective_lr", "wall_seconds", "samples_per_s"]:
        frame[m] = pd.to_numeric(frame[m], errors="coerce")
    frame = frame.sort_values(["data", "model", "norm", "batch_size", "seed"], kind="stable").reset_index(drop=True)
    first = ["run_id", "status", *LABELLED, "batch_size", "seed", "effective_lr", "epochs", "steps"]
    return frame[first + [c for c in frame.columns if c not in first]]


def _labels(frame: pd.DataFrame, group: str, columns: list[str]) -> pd.Series:
    """'bn', or 'bn[recurrent_stats=shared]' where runs with the same name differ in other keys."""
    name_col = f"config.{group}.name"
    labels = frame[name_col].astype(str).copy()
    for name, rows in frame.groupby(name_col):
        keys = [c for c in _varying(rows, columns) if c != name_col]
        for i, row in rows.iterrows():
            extras = ",".join(f"{k.split('.', 2)[2]}={_value(row[k])}" for k in keys)
            if extras:
                labels[i] = f"{name}[{extras}]"
    return labels


def _value(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple):
        return "(" + ",".join(map(_value, v)) + ")"
    return str(v)


def condition_columns(runs: pd.DataFrame) -> list[str]:
    """What defines a condition: data, model, norm, batch size, and every other varied setting but the seed."""
    config_cols = [c for c in runs.columns if c.startswith("config.")]
    other = [c for c in _varying(runs, config_cols)
             if c.split(".", 1)[1] not in NOT_CONDITIONS and c.split(".")[1] not in LABELLED
             and c != "config.batch_size"]
    return [*LABELLED, "batch_size", *other]


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: seeds, mean/std/95% interval/min/max of the final test accuracy, and more."""
    if runs.empty:
        return pd.DataFrame()
    keys = condition_columns(runs)
    rows = []
    for cond, group in runs.groupby(keys, sort=True, dropna=False):
        ok = group[group.status == "completed"]
        acc = ok.test_acc.to_numpy()
        mean, half, n = mean_ci(acc)
        row = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        row.update({
            "n": n, "n_diverged": int((group.status == "diverged").sum()),
            "n_failed": int((group.status == "failed").sum()),
            "test_acc_mean": mean, "test_acc_std": float(np.std(acc, ddof=1)) if n > 1 else math.nan,
            "test_acc_ci95": half, "test_acc_lo": mean - half, "test_acc_hi": mean + half,
            "test_acc_min": float(acc.min()) if n else math.nan, "test_acc_max": float(acc.max()) if n else math.nan,
        })
        for m in ("test_acc_batch_stats", "test_acc_precise", "train_loss"):
            row[f"{m}_mean"], row[f"{m}_ci95"], _ = mean_ci(ok[m].to_numpy())
        row.update({"effective_lr": group.effective_lr.iloc[0], "steps": ok.steps.max() if n else math.nan,
                    "wall_seconds_mean": group.wall_seconds.mean()})
        rows.append(row)
    return pd.DataFrame(rows)


def fmt_ci(mean: float, half: float, digits: int = 1) -> str:
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _panels(summary: pd.DataFrame) -> list[str]:
    return [k for k in summary.columns if k in ("data", "model") or k.startswith("config.")]


def pivot(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows: (data, model, ..., norm); columns: batch sizes; cells 'mean ± half-interval'."""
    cells = summary.assign(cell=[fmt_ci(m, h) for m, h in zip(summary.test_acc_mean, summary.test_acc_ci95)])
    table = cells.pivot_table(index=_panels(summary) + ["norm"], columns="batch_size", values="cell",
                              aggfunc="first")
    return table.fillna("-")


def _runs_of(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    mask = np.ones(len(runs), dtype=bool)
    for k, v in where.items():
        mask &= (runs[k].astype(str) == str(v)).to_numpy()
    return runs[mask & (runs.status == "completed").to_numpy()]


def bn_label(norms) -> str | None:
    """The batch-norm condition others are compared with: 'bn', else BN with per-step statistics."""
    labels = sorted({str(n) for n in norms if str(n).startswith("bn")})
    if "bn" in labels:
        return "bn"
    return next((n for n in labels if "per_step" in n), labels[0] if labels else None)


def delta_vs_bn(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Each norm's accuracy minus BN's, per batch size, with a Welch 95% interval (points)."""
    rows = []
    panels = _panels(summary)
    for _, s in summary.iterrows():
        where = {k: s[k] for k in panels + ["batch_size"]}
        bn_name = bn_label(summary.norm)
        if bn_name is None or str(s.norm).startswith("bn"):
            continue
        bn = _runs_of(runs, {**where, "norm": bn_name})
        if bn.empty:
            continue
        d, h = diff_ci(_runs_of(runs, {**where, "norm": s.norm}).test_acc, bn.test_acc)
        rows.append({**where, "norm": s.norm, "delta": d, "delta_ci95": h})
    return pd.DataFrame(rows)


def degradation(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per norm: accuracy at the largest batch minus at the smallest, with its 95% interval (points)."""
    rows = []
    panels = _panels(summary)
    for key, g in summary.groupby(panels + ["norm"], dropna=False):
        g = g[g.n > 0]
        if g.batch_size.nunique() < 2:
            continue
        small, large = g.batch_size.min(), g.batch_size.max()
        where = dict(zip(panels + ["norm"], key))
        acc_small = _runs_of(runs, {**where, "batch_size": small}).test_acc
        acc_large = _runs_of(runs, {**where, "batch_size": large}).test_acc
        d, h = diff_ci(acc_large, acc_small)
        rows.append({**where, "small_batch": small, "large_batch": large, "acc_small": acc_small.mean(),
                     "acc_large": acc_large.mean(), "drop": d, "drop_ci95": h})
    return pd.DataFrame(rows)


def _interval_words(d: float, h: float) -> str:
    return f"{d:+.1f} ± {h:.1f} points" if np.isfinite(h) else f"{d:+.1f} points (one seed: no interval)"


def _trend(norm: str, row: pd.Series) -> str:
    d, h, small, large = row["drop"], row["drop_ci95"], row["small_batch"], row["large_batch"]
    span = f"from batch {large} down to {small}"
    if not np.isfinite(h):
        return f"{norm}: {d:+.1f} points between batch {small} and {large}, from one seed: no interval, no verdict."
    if d - h > 0:
        return f"{norm} degrades as the batch shrinks: {d:.1f} ± {h:.1f} points lower at batch {small} than at {large}."
    if d + h < 0:
        return f"{norm} does better at the small batch: {-d:.1f} ± {h:.1f} points higher at batch {small} than at {large}."
    return f"{norm} within {d:+.1f} ± {h:.1f} points {span}: no degradation detected."


def _paired(runs: pd.DataFrame, where: dict, column: str) -> tuple[float, float]:
    """Mean and 95% half-interval of (column - test_acc) over the seeds of one condition."""
    sel = _runs_of(runs, where)
    return mean_ci((sel[column] - sel.test_acc).to_numpy())[:2]


def verdict(runs: pd.DataFrame, summary: pd.DataFrame, degr: pd.DataFrame) -> dict[str, list[str]]:
    """Plain sentences per panel (data / model ...), each computed from the tables with its interval."""
    out: dict[str, list[str]] = {}
    if degr.empty:
        return out
    panels = _panels(summary)
    for key, g in degr.groupby(panels, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        where = dict(zip(panels, key))
        title = " / ".join(str(where[k]) for k in ("data", "model") if k in where)
        title += "".join(f", {k.split('.', 1)[1]}={v}" for k, v in where.items() if k.startswith("config."))
        lines = []
        bn = bn_label(g.norm)
        order = ([bn] if bn else []) + [n for n in g.norm if n != bn]
        for norm in order:
            lines.append(_trend(norm, g[g.norm == norm].iloc[0]))
        if bn is not None:
            small = int(g.small_batch.min())
            for norm in (n for n in order if not n.startswith("bn")):
                d, h = diff_ci(_runs_of(runs, {**where, "norm": norm, "batch_size": small}).test_acc,
                               _runs_of(runs, {**where, "norm": bn, "batch_size": small}).test_acc)
                if not np.isfinite(d):
                    continue
                if not np.isfinite(h) or abs(d) <= h:
                    lines.append(f"At batch {small}, {norm} vs {bn}: {_interval_words(d, h)}: "
                                 "no detectable difference.")
                else:
                    better, worse = (norm, bn) if d > 0 else (bn, norm)
                    lines.append(f"At batch {small}, {better} beats {worse} by {abs(d):.1f} ± {h:.1f} points.")
            lines += _recovery(runs, g, where, bn, small)
        out[title] = lines
    return out


def _recovery(runs: pd.DataFrame, g: pd.DataFrame, where: dict, bn: str, small: int) -> list[str]:
    """How much of BN's small-batch accuracy depends on its evaluation statistics."""
    row = g[g.norm == bn].iloc[0]
    cond = {**where, "norm": bn, "batch_size": small}
    precise, precise_h = _paired(runs, cond, "test_acc_precise")
    batch, batch_h = _paired(runs, cond, "test_acc_batch_stats")
    if not np.isfinite(precise):
        return []
    text = (f"At batch {small}, recomputing BN's statistics after training changes its test accuracy by "
            f"{_interval_words(precise, precise_h)}; normalizing each test batch with its own statistics "
            f"changes it by {_interval_words(batch, batch_h)}.")
    loss = row["drop"]
    degraded = np.isfinite(row["drop_ci95"]) and loss - row["drop_ci95"] > 0
    if degraded and np.isfinite(precise_h) and precise - precise_h > 0:
        text += f" Recomputed statistics recover {100 * precise / loss:.0f}% of the {loss:.1f}-point loss."
    elif degraded:
        text += f" No detectable part of the {loss:.1f}-point loss is recovered by recomputing the statistics."
    return [text]
