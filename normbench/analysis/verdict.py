"""The verdict: plain sentences per panel (data / model ...), each computed from the tables with its interval.

Nothing is decided in advance. Per panel, norm by norm (BN first): the seeds that diverged,
failed or are missing, condition by condition (divergence at a small batch is itself a result),
then how accuracy moves from the largest batch to the smallest; then each norm against BN at the
smallest batch, and BN evaluated with recomputed and with per-batch statistics. A sentence whose
statistics rest on fewer seeds than planned says so; a difference without an interval says why.

A difference whose interval contains zero is "no detectable change", never a bound ("within ...").
With the same epochs a smaller batch takes more SGD steps (batch 2 vs 32: 16x); when the two batch
sizes compared took different numbers of steps, the sentence says so ("at 16× the steps") and does
not attribute the difference to the batch size alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from normbench.analysis.stats import diff_ci, no_interval, paired_ci, recovered_share
from normbench.analysis.tables import LOST, as_text, bn_label, panel_columns, runs_of, value_text


def _match(frame: pd.DataFrame, where: dict) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for k, v in where.items():
        mask &= (as_text(frame[k]) == as_text(pd.Series([v]))[0]).to_numpy()
    return frame[mask]


def _title(where: dict) -> str:
    title = " / ".join(str(where[k]) for k in ("data", "model") if k in where)
    return title + "".join(f", {k.split('.', 1)[1]}={v}" for k, v in where.items() if k.startswith("config."))


def _lost_seeds(norm: str, rows: pd.DataFrame) -> list[str]:
    """'bn: 2 of 3 seeds diverged at batch 2, 1 of 3 at batch 4.', one sentence per way of losing seeds."""
    lines = []
    for col, word in LOST:
        hits = rows[rows[col] > 0].sort_values("batch_size")
        parts = [f"{int(r[col])} of {int(r.n_planned)} at batch {int(r.batch_size)}" for _, r in hits.iterrows()]
        if parts:
            first = parts[0].replace(" at batch", f" seeds {word} at batch", 1)
            why = " (not run, or not finished)" if word == "missing" else ""
            lines.append(f"{norm}: {', '.join([first, *parts[1:]])}{why}.")
    return lines


def _completed_only(rows: pd.DataFrame, parts: list[tuple[str, int, str]]) -> str:
    """' (completed seeds only: 1 of 3 at batch 2)' for each (norm, batch, words) that lost seeds."""
    short = []
    for norm, batch, words in parts:
        row = rows[(rows.norm == norm) & (rows.batch_size == batch)]
        if len(row) and row.n.iloc[0] < row.n_planned.iloc[0]:
            short.append(f"{int(row.n.iloc[0])} of {int(row.n_planned.iloc[0])} {words}")
    return f" (completed seeds only: {', '.join(short)})" if short else ""


def _signed(x: float) -> str:
    """'+1.5', '-0.3', and '+0.0' for anything that rounds to zero (never '-0.0')."""
    return f"{round(x, 1) + 0.0:+.1f}"


def _interval_words(d: float, h: float, why: str | None) -> str:
    return f"{_signed(d)} ± {h:.1f} points" if np.isfinite(h) else f"{_signed(d)} points ({why})"


def _times(ratio: float) -> str:
    """16.0 -> '16×', 1.5 -> '1.5×', 0.25 -> '1/4'."""
    return f"{ratio:.3g}×" if ratio >= 1 else f"1/{1 / ratio:.3g}"


def _steps_ratio(rows: pd.DataFrame, norm: str, small: int, large: int) -> float | None:
    """Steps taken at the small batch over steps at the large one (completed seeds); None when equal or unknown."""
    def steps(batch: int) -> float:
        row = rows[(rows.norm == norm) & (rows.batch_size == batch)]
        return float(row.steps.iloc[0]) if len(row) else float("nan")

    ratio = steps(small) / steps(large)
    return ratio if np.isfinite(ratio) and ratio > 0 and abs(ratio - 1) > 0.01 else None


def _trend(runs: pd.DataFrame, where: dict, norm: str, row: pd.Series, caveat: str, steps: float | None) -> str:
    """How accuracy moves from the largest batch to the smallest (`row` of the degradation table)."""
    d, h, small, large = row["drop"], row["drop_ci95"], int(row["small_batch"]), int(row["large_batch"])
    at_steps = f" at {_times(steps)} the steps" if steps else ""
    if not np.isfinite(h):
        why = no_interval(runs_of(runs, {**where, "norm": norm, "batch_size": large}).test_acc,
                          runs_of(runs, {**where, "norm": norm, "batch_size": small}).test_acc)
        return f"{norm} changes by {_signed(-d)} points from batch {large} to {small}{at_steps}{caveat}; {why}."
    if abs(d) <= h:
        return (f"{norm} changes by {_signed(-d)} ± {h:.1f} points from batch {large} to {small}{at_steps}{caveat}: "
                "no detectable change.")
    lower = d > 0
    amount = f"{abs(d):.1f} ± {h:.1f} points {'lower' if lower else 'higher'} at batch {small} than at {large}"
    if steps:  # batch size and step count changed together: no attribution to the batch size
        return f"{norm} is {amount},{at_steps}{caveat}."
    headline = "degrades as the batch shrinks" if lower else "does better at the small batch"
    return f"{norm} {headline}: {amount}{caveat}."


def _versus_bn(runs: pd.DataFrame, rows: pd.DataFrame, where: dict, norm: str, bn: str, small: int) -> str | None:
    a = runs_of(runs, {**where, "norm": norm, "batch_size": small}).test_acc
    b = runs_of(runs, {**where, "norm": bn, "batch_size": small}).test_acc
    d, h = diff_ci(a, b)
    if not np.isfinite(d):
        return None
    caveat = _completed_only(rows, [(norm, small, f"for {norm}"), (bn, small, f"for {bn}")])
    if not np.isfinite(h):
        return f"At batch {small}, {norm} differs from {bn} by {_signed(d)} points{caveat}; {no_interval(a, b)}."
    if abs(d) <= h:
        return (f"At batch {small}, {norm} differs from {bn} by {_signed(d)} ± {h:.1f} points{caveat}: "
                "no detectable difference.")
    better, worse = (norm, bn) if d > 0 else (bn, norm)
    return f"At batch {small}, {better} beats {worse} by {abs(d):.1f} ± {h:.1f} points{caveat}."


def verdict(runs: pd.DataFrame, summary: pd.DataFrame, degr: pd.DataFrame) -> dict[str, list[str]]:
    """Plain sentences per panel (data / model ...), each computed from the tables with its interval."""
    out: dict[str, list[str]] = {}
    if summary.empty:
        return out
    panels = panel_columns(summary)
    for key, rows in summary.groupby(panels, dropna=False):
        where = dict(zip(panels, key if isinstance(key, tuple) else (key,)))
        g = _match(degr, where) if not degr.empty else degr
        bn = bn_label(rows.norm)
        lines = []
        for norm in sorted(set(rows.norm), key=lambda n: (n != bn, n)):
            lines += _lost_seeds(norm, rows[rows.norm == norm])
            trend = g[g.norm == norm] if not g.empty else g
            if len(trend):
                row = trend.iloc[0]
                small, large = int(row.small_batch), int(row.large_batch)
                caveat = _completed_only(rows, [(norm, b, f"at batch {b}") for b in (small, large)])
                lines.append(_trend(runs, where, norm, row, caveat, _steps_ratio(rows, norm, small, large)))
        if bn is not None and not g.empty:
            small = int(g.small_batch.min())
            for norm in sorted(n for n in set(g.norm) if not n.startswith("bn")):
                sentence = _versus_bn(runs, rows, where, norm, bn, small)
                lines += [sentence] if sentence else []
            lines += _recovery(runs, rows, g, where, bn, small)
        if lines:
            out[_title(where)] = lines
    return out


def _paired_words(sel: pd.DataFrame, column: str) -> str:
    d, h = paired_ci(sel[column], sel.test_acc)
    keep = sel[column].notna().to_numpy() & sel.test_acc.notna().to_numpy()
    return _interval_words(d, h, no_interval((sel[column] - sel.test_acc)[keep]))


def _share_words(share: float, lo: float, hi: float, loss: float) -> str:
    """The share of the loss won back, with its interval, never above 100%."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return (f"Recomputed statistics recover part of the {loss:.1f}-point loss, but the seeds do not bound "
                "how much (the 95% interval of the share is unbounded).")
    if lo >= 1:
        return (f"Recomputed statistics recover all of the {loss:.1f}-point loss: even the lower end of the "
                "95% interval of the share reaches 100%.")
    pct = [100 * min(max(x, 0.0), 1.0) for x in (share, lo, hi)]
    return (f"Recomputed statistics recover {pct[0]:.0f}% of the {loss:.1f}-point loss "
            f"(95% interval {pct[1]:.0f}% to {pct[2]:.0f}%).")


def _recovery(runs: pd.DataFrame, rows: pd.DataFrame, g: pd.DataFrame, where: dict, bn: str, small: int) -> list[str]:
    """How much of BN's small-batch accuracy depends on its evaluation statistics."""
    row = g[g.norm == bn]
    if row.empty:
        return []
    row = row.iloc[0]
    sel = runs_of(runs, {**where, "norm": bn, "batch_size": small})
    precise, precise_h = paired_ci(sel.test_acc_precise, sel.test_acc)
    if not np.isfinite(precise) or int(row.small_batch) != small:
        return []
    text = (f"At batch {small}, recomputing BN's statistics after training changes its test accuracy by "
            f"{_paired_words(sel, 'test_acc_precise')}")
    if sel.test_acc_batch_stats.notna().any():
        text += f"; normalizing each test batch with its own statistics changes it by " \
                f"{_paired_words(sel, 'test_acc_batch_stats')}"
    text += _completed_only(rows, [(bn, small, f"at batch {small}")]) + "."
    loss = row["drop"]
    degraded = np.isfinite(row["drop_ci95"]) and loss - row["drop_ci95"] > 0
    if degraded and np.isfinite(precise_h) and precise - precise_h > 0:
        large = runs_of(runs, {**where, "norm": bn, "batch_size": int(row.large_batch)}).test_acc
        text += " " + _share_words(*recovered_share(sel.test_acc, sel.test_acc_precise, large))
    elif degraded and np.isfinite(precise_h):
        text += f" No detectable part of the {loss:.1f}-point loss is recovered by recomputing the statistics."
    return [text]


LEVEL = 0.05  # a difference is called detected when its Holm-adjusted p-value is below this


def _condition(row: pd.Series, keys: list[str]) -> str:
    """'mnist / mlp / bn, batch 64, lr=0.1' for the keys of an effects row."""
    words = [str(row[k]) for k in ("data", "model", "norm") if k in keys]
    if "batch_size" in keys:
        words[-1:] = [f"{words[-1]}, batch {int(row.batch_size)}"] if words else [f"batch {int(row.batch_size)}"]
    extras = [f"{k.removeprefix('config.')}={value_text(row[k])}" for k in keys if k.startswith("config.")]
    return ", ".join([" / ".join(words), *extras]) if extras else " / ".join(words)


def effect_words(row: pd.Series, family: int) -> str:
    """'-5.1 ± 1.2 points (Welch; Holm-adjusted p = 0.003 over 6 comparisons): lower' and its kin."""
    unit = " points" if "acc" in str(row.metric) or str(row.metric) == "gap" else ""
    if not np.isfinite(row.ci95):
        return f"{_signed(row.effect)}{unit} ({row.why or 'no interval'})"
    p = row.p_holm if np.isfinite(row.p_holm) else row.p
    stat = (f"{row.test}; Holm-adjusted p = {p:.2g} over {family} comparisons" if family > 1
            else f"{row.test}; p = {p:.2g}")
    text = f"{_signed(row.effect)} ± {row.ci95:.1f}{unit} ({stat})"
    if p >= LEVEL:
        return text + (": no detectable difference" if abs(row.effect) <= row.ci95
                       else ": not significant once corrected for the number of comparisons")
    return text


def factor_verdict(effects: pd.DataFrame) -> list[str]:
    """One sentence per row of `effects.sweep_effects`: how a swept setting moves the metric, in one condition."""
    if effects.empty:
        return []
    keys = [c for c in effects.columns if c not in ("metric", "factor", "level_a", "level_b", "effect", "ci95", "p",
                                                     "p_holm", "test", "n_a", "n_b", "why")]
    family = int(np.isfinite(effects.p.astype(float)).sum())
    lines = []
    for _, row in effects.iterrows():
        present = [k for k in keys if k != row.factor and pd.notna(row[k])]
        factor = str(row.factor).removeprefix("config.")
        lines.append(f"{_condition(row, present)}: {row.metric} at {factor}={value_text(row.level_a)} minus at "
                     f"{factor}={value_text(row.level_b)}: {effect_words(row, family)}.")
    return lines
