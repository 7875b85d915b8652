"""The effect of any swept setting on any recorded metric, per condition: pure pandas on the runs table.

A *factor* is a column of the runs table that a sweep varies: ``batch_size``, ``config.norm_batch_size``,
``config.lr``, ``config.norm.position``, ``config.norm.num_groups``, ``config.model.residual``, ``norm``
itself... A *metric* is any numeric column of a run: ``test_acc`` (and its BN evaluations
``test_acc_precise``, ``test_acc_batch_stats``), ``train_loss``, ``gap`` (train minus test accuracy),
a test-time shift's ``test_acc@contrast:0.5``, a probe's summary number.

`where` (column -> value or list of values) restricts the runs first; a norm, model or data value matches
the label ('bn(position=post_act)') or the name ('bn') of a run's entry.

`factor_effects` compares two levels of a factor within every condition that has both (the condition:
every other varied setting, seeds apart): metric at `level_a` minus metric at `level_b`, with Welch's
interval (or, with ``paired=True``, the paired one over the seeds both levels ran), and its p-value.
`metric_effects` compares two metrics of the same runs (always paired: one run, two numbers).
`adjust` puts Holm's correction over the rows a verdict rests on.

Numeric levels sort as numbers (`levels`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normbench.analysis.stats import Test, holm, paired_test, welch_test
from normbench.analysis.tables import (LABELLED, NOT_CONDITIONS, as_text, condition_columns, panel_columns,
                                       runs_of, value_text)

EFFECT_COLUMNS = ["metric", "factor", "level_a", "level_b", "effect", "ci95", "p", "p_holm", "test", "n_a", "n_b",
                  "why"]


def with_derived(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table plus the metrics computed from others: ``gap`` (train - test accuracy, points)."""
    if runs.empty or "gap" in runs.columns:
        return runs
    train = pd.to_numeric(runs.get("train_acc"), errors="coerce")
    return runs.assign(gap=train - runs.test_acc)


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _known(value) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def levels(runs: pd.DataFrame, factor: str) -> list:
    """The factor's distinct set values (unset ones left out), numbers in numeric order, then text."""
    values = {v for v in runs[factor] if _known(v)}
    return sorted(values, key=lambda v: (0, _number(v), "") if _number(v) is not None else (1, 0.0, str(v)))


def _same(column: pd.Series, value) -> np.ndarray:
    """Where the column holds `value`: numbers compare as numbers (4 matches 4.0, as a column with unset
    values stores it), anything else as its text."""
    number = _number(value) if not isinstance(value, bool) else None
    if number is not None:
        return (pd.to_numeric(column, errors="coerce") == number).to_numpy()
    return (as_text(column) == as_text(pd.Series([value]))[0]).to_numpy()


def factor_effects(runs: pd.DataFrame, factor: str, level_a, level_b, metric: str = "test_acc",
                   paired: bool = False, where: dict | None = None) -> pd.DataFrame:
    """Per condition with completed runs at both levels: metric(level_a) - metric(level_b).

    The conditions are the other varied settings (`condition_columns`, the factor apart); `where`
    (column -> value) restricts the runs first. Columns: the condition's keys, then `EFFECT_COLUMNS`;
    p_holm is left NaN here (`adjust` fills it for the family a verdict rests on).
    """
    runs = with_derived(_restrict(runs, where))
    if runs.empty or factor not in runs.columns or metric not in runs.columns:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    done = runs[runs.status == "completed"]
    keys = _keys_apart_from(runs, factor)
    rows = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        a = group[_same(group[factor], level_a)]
        b = group[_same(group[factor], level_b)]
        if a.empty or b.empty:
            continue
        if paired:
            joined = a[["seed", metric]].merge(b[["seed", metric]], on="seed", suffixes=("_a", "_b"))
            test = paired_test(joined[f"{metric}_a"], joined[f"{metric}_b"])
        else:
            test = welch_test(a[metric], b[metric])
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     **_row(metric, factor, value_text(level_a), value_text(level_b), test)})
    if not rows:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    return pd.DataFrame(rows, columns=[*keys, *EFFECT_COLUMNS]).rename(columns=_NAMES)


_NAMES = {f"config.{group}.name": group for group in LABELLED}


def _keys_apart_from(runs: pd.DataFrame, factor: str) -> list[str]:
    """The columns that define a condition, the factor apart. A setting of the norm (or model, data) is part of
    its label ('bn(position=post_act)'), so there the label gives way to the name and the other varied settings."""
    keys = [k for k in condition_columns(runs) if k != factor]
    for group in LABELLED:
        if factor.startswith(f"config.{group}."):
            own = f"config.{group}."
            others = [c for c in runs.columns if c.startswith(own) and c not in (factor, own + "name")
                      and as_text(runs[c]).nunique() > 1]
            keys = [f"config.{group}.name" if k == group else k for k in keys] + others
    return keys


def metric_effects(runs: pd.DataFrame, metric_a: str, metric_b: str, where: dict | None = None) -> pd.DataFrame:
    """Per condition: metric_a - metric_b over the same runs (paired by run)."""
    runs = with_derived(_restrict(runs, where))
    if runs.empty or metric_a not in runs.columns or metric_b not in runs.columns:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    done = runs[runs.status == "completed"]
    keys = condition_columns(runs)
    rows = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        test = paired_test(pd.to_numeric(group[metric_a], errors="coerce"),
                           pd.to_numeric(group[metric_b], errors="coerce"))
        if test.n_a == 0:
            continue
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     **_row(f"{metric_a} - {metric_b}", "metric", metric_a, metric_b, test)})
    return pd.DataFrame(rows, columns=[*keys, *EFFECT_COLUMNS]) if rows else pd.DataFrame(columns=EFFECT_COLUMNS)


def _row(metric: str, factor: str, level_a: str, level_b: str, test: Test) -> dict:
    return {"metric": metric, "factor": factor, "level_a": level_a, "level_b": level_b, "effect": test.effect,
            "ci95": test.ci95, "p": test.p, "p_holm": math.nan, "test": test.kind, "n_a": test.n_a,
            "n_b": test.n_b, "why": test.why}


def adjust(effects: pd.DataFrame) -> pd.DataFrame:
    """The same rows with p_holm: Holm's correction over all of them (one family)."""
    if effects.empty:
        return effects
    return effects.assign(p_holm=holm(effects.p.tolist()))


def _restrict(runs: pd.DataFrame, where: dict | None) -> pd.DataFrame:
    if not where or runs.empty:
        return runs
    mask = np.ones(len(runs), dtype=bool)
    for column, value in where.items():
        if column not in runs.columns:
            return runs.iloc[0:0]
        allowed = value if isinstance(value, (list, tuple)) else [value]
        hits = [_same(runs[column], v) for v in allowed]
        name = f"config.{column}.name"
        if column in LABELLED and name in runs.columns:  # "bn" also picks bn(position=post_act): the name matches
            hits += [_same(runs[name], v) for v in allowed]
        mask &= np.logical_or.reduce(hits)
    return runs[mask]


SWEPT_ASIDE = ("batch_size",)  # the batch size has its own tables (degradation, deltas vs BN)


def swept_factors(runs: pd.DataFrame) -> list[str]:
    """The settings (beyond data, model and norm names and the batch size) that take two or more values."""
    found = []
    for column in runs.columns:
        parts = column.split(".")
        if (parts[0] != "config" or column.removeprefix("config.") in NOT_CONDITIONS or parts[1] == "probes"
                or column == "config.batch_size" or (parts[1] in LABELLED and parts[-1] == "name")):
            continue
        if len(levels(runs, column)) > 1:
            found.append(column)
    return found


def sweep_effects(runs: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """For every swept setting: its smallest level against its largest (a categorical one: every level against
    the first), per condition, as one Holm family."""
    if "config.norm_batch_size" in runs.columns and runs["config.norm_batch_size"].notna().any():
        # unset is the whole batch: norm_batch_size=2,8,null compares 2 with the batch size, its largest level
        runs = runs.assign(**{"config.norm_batch_size": pd.to_numeric(runs["config.norm_batch_size"], errors="coerce")
                              .fillna(runs.batch_size)})
    frames = []
    for factor in swept_factors(runs):
        found = levels(runs, factor)
        numeric = all(_number(v) is not None for v in found)
        pairs = [(found[0], found[-1])] if numeric else [(v, found[0]) for v in found[1:]]
        frames += [factor_effects(runs, factor, a, b, metric) for a, b in pairs]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    return adjust(pd.concat(frames, ignore_index=True))


def degradation(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per norm: accuracy at the largest batch minus at the smallest, with its Welch 95% interval (points): the
    batch size as one factor among others, compared at its extremes within each panel and norm.

    Only batch sizes with a completed seed count; the summary's seed counts say how many did.
    """
    rows = []
    panels = panel_columns(summary)
    for key, g in summary.groupby(panels + ["norm"], dropna=False):
        g = g[g.n > 0]
        if g.batch_size.nunique() < 2:
            continue
        small, large = g.batch_size.min(), g.batch_size.max()
        where = dict(zip(panels + ["norm"], key))
        mine = runs_of(runs, where)
        effect = factor_effects(mine, "batch_size", large, small)
        if effect.empty:
            continue
        row = effect.iloc[0]
        rows.append({**where, "small_batch": small, "large_batch": large,
                     "acc_small": mine[mine.batch_size == small].test_acc.mean(),
                     "acc_large": mine[mine.batch_size == large].test_acc.mean(), "drop": row.effect,
                     "drop_ci95": row.ci95})
    return pd.DataFrame(rows)
