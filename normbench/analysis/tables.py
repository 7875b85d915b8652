"""Run summaries to tables: one row per run, one row per condition, and the pivots built on them.

* `runs_table`: one row per run, every config key flattened (``norm.num_groups``); the norm's label
  is `normbench.config.ids.norm_label` (as in run ids: 'gn', 'gn8', 'gn(num_groups=4)'), the data and
  model labels include the keys that vary within the table ('cnn(channels=(16,32))').
* `summary_table`: one row per condition (data x model x norm x batch size x any other varied
  setting but the seed): the seeds planned, completed, diverged, failed and missing, and the
  mean, std, 95% t-interval, min and max of the completed seeds.
* `pivot`, `delta_vs_bn`: the views the GN paper uses (the third, `degradation`, is in `effects`). A pivot cell whose
  condition lost seeds says so (``95.0 (2/3 diverged)``): no seed is left out silently.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normbench.analysis.stats import diff_ci, mean_ci
from normbench.config import NOT_HASHED
from normbench.config.ids import norm_label

METRICS = ["test_acc", "test_acc_batch_stats", "test_acc_precise", "train_loss", "test_loss", "train_acc"]
LABELLED = ("data", "model", "norm")
NOT_CONDITIONS = {"seed", *NOT_HASHED}  # settings that do not define a condition
LOST = (("n_diverged", "diverged"), ("n_failed", "failed"), ("n_missing", "missing"))  # seeds without a result


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return flat


def as_text(values: pd.Series) -> pd.Series:
    """Each value as str() writes it, a missing one as "nan" (pandas' own astype(str) keeps NaN missing
    since pandas 3), so keys built from settings that some runs leave unset still match and join."""
    return values.map(lambda v: "nan" if v is None or (isinstance(v, float) and v != v) else str(v)).astype(object)


def _varying(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if as_text(frame[c]).nunique(dropna=False) > 1]


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
            **_shift_columns(s.get("shifts") or {}),
        })
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.attrs[INTEGERS] = _integer_columns(rows)
    config_cols = [c for c in frame.columns if c.startswith("config.")]
    for group in ("data", "model"):
        frame[group] = _labels(frame, group, [c for c in config_cols if c.startswith(f"config.{group}.")])
    frame["norm"] = [norm_label(s["config"]["norm"]) if isinstance(s["config"].get("norm"), dict)
                     else str(s["config"].get("norm")) for s in summaries]
    frame["norm"] = _told_apart(frame, "norm", [c for c in config_cols if c.startswith("config.norm.")])
    shifted = [c for c in frame.columns if c.startswith(SHIFT_METRICS)]
    for m in METRICS + ["best_test_acc", "effective_lr", "wall_seconds", "samples_per_s"] + shifted:
        frame[m] = pd.to_numeric(frame[m], errors="coerce")
    frame = frame.sort_values(["data", "model", "norm", "batch_size", "seed"], kind="stable").reset_index(drop=True)
    first = ["run_id", "status", *LABELLED, "batch_size", "seed", "effective_lr", "epochs", "steps"]
    return frame[first + [c for c in frame.columns if c not in first]]


SHIFT_METRICS = ("test_acc@", "test_acc_adapted@")
INTEGERS = "integer_columns"  # frame.attrs key: the columns of whole numbers that some runs leave empty


def _integer_columns(rows: list[dict]) -> list[str]:
    """Columns whose values are all ints (not bools) where present and missing in some rows: pandas
    stores those as floats (3.0), which `as_written` undoes."""
    columns = dict.fromkeys(key for row in rows for key in row)
    found = []
    for c in columns:
        values = [row.get(c) for row in rows]
        present = [v for v in values if v is not None]
        if present and len(present) < len(values) and all(type(v) is int for v in present):
            found.append(c)
    return found


def as_written(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table as runs.csv holds it: whole-number settings and counts that some runs leave
    empty written as 3, not 3.0 (a copy; `runs_table` records which columns those are)."""
    columns = [c for c in runs.attrs.get(INTEGERS, []) if c in runs.columns]
    return runs.astype({c: "Int64" for c in columns}) if columns else runs


def _shift_columns(shifts: dict) -> dict:
    """`test_acc@contrast:0.5` and `test_acc_adapted@contrast:0.5` (BN re-estimated on the shifted inputs) for
    each test-time shift a run was evaluated under (`eval.shifts`)."""
    return {f"{metric}{key}": values.get(metric[:-1]) for key, values in shifts.items() for metric in SHIFT_METRICS}


def _labels(frame: pd.DataFrame, group: str, columns: list[str]) -> pd.Series:
    """'cnn', or 'cnn(channels=(16,32))' where runs with the same name differ in other keys."""
    name_col = f"config.{group}.name"
    labels = as_text(frame[name_col]).copy()
    for name, rows in frame.groupby(name_col):
        keys = [c for c in _varying(rows, columns) if c != name_col]
        for i, row in rows.iterrows():
            extras = ",".join(f"{k.split('.', 2)[2]}={value_text(row[k])}" for k in keys)
            if extras:
                labels[i] = f"{name}({extras})"
    return labels


def _told_apart(frame: pd.DataFrame, label: str, columns: list[str]) -> pd.Series:
    """Labels that stay one label only where the runs agree in `columns`: runs of one norm label made by two
    versions of its plugin (norm.plugin.source, which the label leaves out) become 'mynorm(plugin.source=...)',
    so no table pools them as seeds of one condition."""
    labels = frame[label].copy()
    for name, rows in frame.groupby(label):
        keys = _varying(rows, columns)
        for i, row in rows.iterrows():
            extras = ",".join(f"{k.split('.', 2)[2]}={value_text(row[k])}" for k in keys)
            if extras:
                labels[i] = f"{name[:-1]},{extras})" if name.endswith(")") else f"{name}({extras})"
    return labels


def value_text(v) -> str:
    """A setting's value as labels show it: 4 for 4.0, (16,32) for a list, null where a run leaves it unset."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple):
        return "(" + ",".join(map(value_text, v)) + ")"
    return str(v)


def condition_columns(runs: pd.DataFrame) -> list[str]:
    """What defines a condition: data, model, norm, batch size, and every other varied setting but the seed."""
    config_cols = [c for c in runs.columns if c.startswith("config.")]
    other = [c for c in _varying(runs, config_cols)
             if c.split(".", 1)[1] not in NOT_CONDITIONS and c.split(".")[1] not in LABELLED
             and c.split(".")[1] != "probes"  # measurements taken, not a setting of the training
             and c != "config.batch_size"]
    return [*LABELLED, "batch_size", *other]


def panel_columns(frame: pd.DataFrame) -> list[str]:
    """What defines a panel of the verdict and the figures: a condition but its norm and batch size."""
    return [k for k in frame.columns if k in ("data", "model") or k.startswith("config.")]


def _planned_seeds(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Per run: how many seeds its panel has. Every condition of a panel is meant to run all of them."""
    panel = [k for k in keys if k not in ("norm", "batch_size")]
    key = runs[panel].apply(as_text).agg("|".join, axis=1)
    return runs.seed.groupby(key).transform("nunique")


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: seed counts, mean/std/95% interval/min/max of the final test accuracy, and more.

    n counts the completed seeds the statistics use; n_planned those of the panel; n_diverged and
    n_failed the seeds that ended without a result; n_missing the planned seeds with no finished run.
    """
    if runs.empty:
        return pd.DataFrame()
    keys = condition_columns(runs)
    runs = runs.assign(_planned=_planned_seeds(runs, keys))
    rows = []
    for cond, group in runs.groupby(keys, sort=True, dropna=False):
        ok = group[group.status == "completed"]
        acc = ok.test_acc.to_numpy()
        mean, half, n = mean_ci(acc)
        planned = int(group._planned.iloc[0])
        row = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        row.update({
            "n": n, "n_planned": planned, "n_diverged": int((group.status == "diverged").sum()),
            "n_failed": int((group.status == "failed").sum()), "n_missing": planned - group.seed.nunique(),
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


def fmt_ci(mean: float, half: float, digits: int = 1, signed: bool = False) -> str:
    """'90.0 ± 1.3'; '90.0' without an interval; '-' without a value; signed: '+2.0 ± 1.3'."""
    if not np.isfinite(mean):
        return "-"
    value = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return value if not np.isfinite(half) else f"{value} ± {half:.{digits}f}"


def lost_seeds(row: pd.Series) -> str:
    """'2/3 diverged, 1/3 failed': the seeds of a summary row that have no result ('' if none)."""
    return ", ".join(f"{int(row[col])}/{int(row.n_planned)} {word}" for col, word in LOST if row[col] > 0)


def cell_text(row: pd.Series) -> str:
    """A pivot cell: '90.0 ± 1.3', '90.0' (one seed), '90.0 (no spread)', '95.0 (2/3 diverged)', '3/3 diverged'."""
    text = fmt_ci(row.test_acc_mean, row.test_acc_ci95)
    if row.n > 1 and not np.isfinite(row.test_acc_ci95):
        text += " (no spread)"
    lost = lost_seeds(row)
    if not lost:
        return text
    return lost if row.n == 0 else f"{text} ({lost})"


def pivot(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows: (data, model, ..., norm); columns: batch sizes; cells from `cell_text`."""
    cells = summary.assign(cell=[cell_text(row) for _, row in summary.iterrows()])
    index = panel_columns(summary) + ["norm"]
    # A setting some runs leave unset (norm_batch_size null: the whole batch) is shown as "-", not dropped
    # (pivot_table leaves out rows with a missing key), and whole numbers without ".0".
    cells[index] = cells[index].apply(lambda col: col.map(_key_text))
    table = cells.pivot_table(index=index, columns="batch_size", values="cell", aggfunc="first")
    return table.reindex(sorted(table.index, key=_natural)).fillna("-")


def _natural(key) -> tuple:
    """Rows in numeric order where a key is a number (2, 4, 16, not 16, 2, 4); "-" (unset) after them."""
    def part(v: str) -> tuple:
        try:
            return (0, float(v), "")
        except ValueError:
            return (1 if v != "-" else 2, 0.0, v)
    return tuple(part(str(v)) for v in (key if isinstance(key, tuple) else (key,)))


def _key_text(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def runs_of(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    """The completed runs that match every key of `where`."""
    mask = np.ones(len(runs), dtype=bool)
    for k, v in where.items():
        mask &= (as_text(runs[k]) == as_text(pd.Series([v]))[0]).to_numpy()
    return runs[mask & (runs.status == "completed").to_numpy()]


def bn_label(norms) -> str | None:
    """The batch-norm condition others are compared with: 'bn', else a BN whose statistics are not shared over
    time steps ('bn_shared' is the ablation, not the reference)."""
    labels = sorted({str(n) for n in norms if str(n).startswith("bn")})
    if "bn" in labels:
        return "bn"
    return next((n for n in labels if "shared" not in n), labels[0] if labels else None)


def delta_vs_bn(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Each norm's accuracy minus BN's, per batch size, with a Welch 95% interval (points)."""
    rows = []
    panels = panel_columns(summary)
    for _, s in summary.iterrows():
        where = {k: s[k] for k in panels + ["batch_size"]}
        bn_name = bn_label(summary.norm)
        if bn_name is None or str(s.norm).startswith("bn"):
            continue
        bn = runs_of(runs, {**where, "norm": bn_name})
        if bn.empty:
            continue
        d, h = diff_ci(runs_of(runs, {**where, "norm": s.norm}).test_acc, bn.test_acc)
        rows.append({**where, "norm": s.norm, "delta": d, "delta_ci95": h})
    return pd.DataFrame(rows)
