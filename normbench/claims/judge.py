"""A claim's verdict, computed from its runs: pure pandas, no I/O.

Each `Check` of a claim becomes one row per condition that has runs at both of its levels (a factor
comparison, `analysis.effects.factor_effects`), or over the same runs (two metrics, paired), or against
a constant (one metric). Every row of a claim is one test of one family: Holm's correction runs over all of
them. A row then reads:

* ``>`` / ``<``: supported when the adjusted p-value is below 0.05 with the predicted sign, contradicted
  when it is below 0.05 with the other sign, not detected otherwise;
* ``=``: supported when the 95% interval lies within ±margin, contradicted when it lies wholly outside
  ±margin, inconclusive between;
* ``not_below``: supported when the interval's lower end is at or above -margin, contradicted when its upper
  end is below -margin, inconclusive between.

Where every seed gives the same difference (gn with one group against ln: the same computation, a difference
of exactly 0 in every seed), that difference is taken as exact for ``=`` and ``not_below``; for ``>`` and
``<`` there is then no test, and the row is inconclusive, as is any row from a single seed. The
claim: inconclusive when a check has no rows (its runs did not finish, or diverged); contradicted when any row is;
supported when every row is; inconclusive when a row is; otherwise not detected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from normbench.analysis import effects as fx
from normbench.analysis.stats import NO_SPREAD, holm, paired_test, welch_test
from normbench.claims.catalog import Check, Claim

LEVEL = 0.05
VERDICTS = ("supported", "contradicted", "not detected", "inconclusive")


@dataclass
class Judgement:
    claim: Claim
    verdict: str
    rows: pd.DataFrame  # one row per tested condition: the check, the effect, its interval, p, p_holm, the outcome
    why: str = ""  # for inconclusive: what was missing

    @property
    def headline(self) -> pd.Series | None:
        """The row the claims table shows: the first whose outcome is the verdict (the comparison that decided
        it), else the first."""
        if self.rows.empty:
            return None
        deciding = self.rows[self.rows.outcome == self.verdict]
        return deciding.iloc[0] if len(deciding) else self.rows.iloc[0]


def with_claim_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table plus the metrics claims compare that a run's summary does not hold directly:
    ``gap`` (`effects.with_derived`) and ``test_acc_or_chance`` (a diverged run counts at chance accuracy)."""
    runs = fx.with_derived(runs)
    if runs.empty:
        return runs
    known = _classes(runs)
    if "config.data.num_classes" in runs.columns:  # synthetic data says how many it has
        known = pd.to_numeric(runs["config.data.num_classes"], errors="coerce").fillna(known)
    chance = 100.0 / known
    diverged = runs.status == "diverged"
    return runs.assign(test_acc_or_chance=runs.test_acc.where(~diverged, chance))


def _classes(runs: pd.DataFrame) -> pd.Series:
    """Classes per run from the dataset's name (NaN for a plugin dataset: its diverged runs then have no value)."""
    known = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
    return runs["config.data.name"].map(known).astype(float)


def _rows(runs: pd.DataFrame, check: Check) -> pd.DataFrame:
    if check.factor == "metric":
        return fx.metric_effects(runs, check.a, check.b, where=check.where)
    if check.factor == "value":
        return _versus_constant(runs, check)
    if check.factor == "cells":
        return _cells(runs, check)
    usable = runs
    if check.metric == "test_acc_or_chance":  # diverged runs take part: the metric gives them a value
        usable = usable.assign(status=usable.status.replace({"diverged": "completed"}))
    if check.factor == "config.norm_batch_size" and check.factor in usable.columns:
        # a normalization batch of the whole batch is plain BN, and a run may have recorded it as unset
        usable = usable.assign(**{check.factor: usable[check.factor].fillna(usable.batch_size)})
    return fx.factor_effects(usable, check.factor, check.a, check.b, check.metric, paired=check.paired,
                             where=check.where)


def _versus_constant(runs: pd.DataFrame, check: Check) -> pd.DataFrame:
    sel = fx._restrict(runs, check.where)
    sel = sel[sel.status == "completed"]
    if check.a not in sel.columns or sel.empty:
        return pd.DataFrame()
    values = pd.to_numeric(sel[check.a], errors="coerce").to_numpy()
    test = paired_test(values, np.full(len(values), float(check.b)))
    return pd.DataFrame([{"metric": check.a, "factor": "value", "level_a": check.a, "level_b": str(check.b),
                          "effect": test.effect, "ci95": test.ci95, "p": test.p, "p_holm": math.nan,
                          "test": "one-sample", "n_a": test.n_a, "n_b": 0, "why": test.why}])


def _cells(runs: pd.DataFrame, check: Check) -> pd.DataFrame:
    """Two cells that differ in more than one setting (SkipInit without norm against BN with plain blocks)."""
    a = fx._restrict(runs, {**check.where, **check.a})
    b = fx._restrict(runs, {**check.where, **check.b})
    a, b = a[a.status == "completed"], b[b.status == "completed"]
    if a.empty or b.empty or check.metric not in runs.columns:
        return pd.DataFrame()
    test = welch_test(a[check.metric], b[check.metric])
    words = lambda cell: ", ".join(f"{k.removeprefix('config.')}={v}" for k, v in cell.items())  # noqa: E731
    return pd.DataFrame([{"metric": check.metric, "factor": "cells", "level_a": words(check.a),
                          "level_b": words(check.b), "effect": test.effect, "ci95": test.ci95, "p": test.p,
                          "p_holm": math.nan, "test": test.kind, "n_a": test.n_a, "n_b": test.n_b, "why": test.why}])


def outcome(check: Check, row: pd.Series) -> str:
    """One row's outcome under its check's expectation (see the module docstring)."""
    d, h, p = float(row.effect), float(row.ci95), float(row.p_holm)
    if row.why == NO_SPREAD and check.expect in ("=", "not_below") and np.isfinite(d):
        h = 0.0  # every seed gave the same difference (an identical computation): the effect is known exactly
    if not np.isfinite(d) or not np.isfinite(h):
        return "inconclusive"
    lo, hi = d - h, d + h
    if check.expect in (">", "<"):
        if not p < LEVEL:
            return "not detected"
        return "supported" if (d > 0) == (check.expect == ">") else "contradicted"
    if check.expect == "=":
        if -check.margin <= lo and hi <= check.margin:
            return "supported"
        return "contradicted" if (lo > check.margin or hi < -check.margin) else "inconclusive"
    # not_below
    if lo >= -check.margin:
        return "supported"
    return "contradicted" if hi < -check.margin else "inconclusive"


def judge(claim: Claim, runs: pd.DataFrame) -> Judgement:
    """The claim's verdict from its runs (the runs table of the runs its preset planned)."""
    runs = with_claim_metrics(runs)
    frames, missing = [], []
    for i, check in enumerate(claim.checks):
        rows = _rows(runs, check) if not runs.empty else pd.DataFrame()
        if rows.empty:
            missing.append(check.says)
            continue
        frames.append(rows.assign(check=i, says=check.says, expect=check.expect, margin=check.margin))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not table.empty:
        table["p_holm"] = holm(table.p.tolist())
        table["outcome"] = [outcome(claim.checks[int(r.check)], r) for _, r in table.iterrows()]
    if missing or table.empty:
        return Judgement(claim, "inconclusive", table, "no finished runs (completed, with the metric) for "
                         + "; ".join(missing))
    found = set(table.outcome)
    for verdict in ("contradicted", "inconclusive"):
        if verdict in found:
            return Judgement(claim, verdict, table, _why(table) if verdict == "inconclusive" else "")
    if found == {"supported"}:
        return Judgement(claim, "supported", table)
    return Judgement(claim, "not detected", table)


def uncovered(claim: Claim, summaries: list[dict]) -> list[str]:
    """The comparisons of `claim` that no pair of the planned runs can make (an override such as batch_size=4
    or norm=ln removed one side): what `judge` would later call 'no runs'. `summaries` are summary-shaped
    dicts of the planned configs, without results."""
    if not summaries:
        return [check.says for check in claim.checks]
    from normbench import analysis

    runs = analysis.runs_table([{**s, "status": "completed", "final": {}} for s in summaries])
    metrics = set()
    for check in claim.checks:
        metrics |= {check.a, check.b} if check.factor == "metric" else {check.a} if check.factor == "value" else set()
        metrics.add(check.metric)
    runs = runs.assign(**{m: 0.0 for m in metrics | {"test_acc", "train_acc"}})
    return [check.says for check in claim.checks if _rows(with_claim_metrics(runs), check).empty]


def _why(table: pd.DataFrame) -> str:
    """Which comparisons could not decide, and why, in a sentence."""
    parts = []
    for _, r in table[table.outcome == "inconclusive"].iterrows():
        if r.why:
            parts.append(f"{r.says}: {r.why}")
        else:
            parts.append(f"{r.says}: its 95% interval ({r.effect:+.3g} ± {r.ci95:.3g}) is too wide to tell "
                         f"whether it stays within the margin of {r.margin:g}")
    return "; ".join(parts)
