"""The claims suite's outputs: ``claims.csv`` (a row per claim), ``claims_checks.csv`` (a row per tested
condition), ``claims.md`` (the table, then a section per claim: setup, numbers, figure, anchor) and a figure
per claim, all written atomically into the suite's experiment folder."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from normbench import results  # noqa: E402
from normbench.analysis.tables import fmt_ci  # noqa: E402
from normbench.claims.judge import Judgement  # noqa: E402
from normbench.report import md_table  # noqa: E402

SCALE_WORDS = {"small": "small (the presets' small settings: minutes on a CPU)",
               "paper": "paper (the paper-scale overrides: CIFAR / full MNIST, GPU hours)"}
CONDITION_KEYS = ("data", "model", "norm", "batch_size")


def _digits(value: float) -> int:
    if not np.isfinite(value) or value == 0:
        return 2
    return max(1, 2 - int(math.floor(math.log10(abs(value)))))


def effect_text(row: pd.Series | None) -> tuple[str, str]:
    """('-5.12', '± 1.30') style strings of a row's effect and interval ('-' when unknown)."""
    if row is None or not np.isfinite(row.effect):
        return "-", "-"
    digits = _digits(row.effect)
    return f"{row.effect:+.{digits}f}", (f"± {row.ci95:.{digits}f}" if np.isfinite(row.ci95) else "-")


def claims_table(judgements: list[Judgement], scale: str) -> pd.DataFrame:
    rows = []
    for j in judgements:
        head = j.headline
        effect, ci = effect_text(head)
        rows.append({"claim": j.claim.id, "statement": j.claim.statement, "source": j.claim.source,
                     "effect": effect, "ci95": ci, "measured": head.says if head is not None else "",
                     "verdict": j.verdict, "scale": scale, "anchor": j.claim.anchor, "why": j.why,
                     "checks": len(j.rows)})
    return pd.DataFrame(rows)


def _condition(row: pd.Series) -> str:
    if row.get("factor") == "cells":
        return f"{row.level_a} vs {row.level_b}"
    parts = [str(row[k]) for k in CONDITION_KEYS if k in row.index and isinstance(row[k], str)]
    if "batch_size" in row.index and pd.notna(row["batch_size"]):
        parts.append(f"batch {int(row['batch_size'])}")
    extras = [f"{k.removeprefix('config.')}={row[k]}" for k in row.index
              if str(k).startswith("config.") and pd.notna(row[k]) and k != row.get("factor")]
    return ", ".join([" / ".join(parts), *extras]) if extras else " / ".join(parts)


def checks_table(judgements: list[Judgement]) -> pd.DataFrame:
    frames = []
    for j in judgements:
        if j.rows.empty:
            continue
        shown = pd.DataFrame({
            "claim": j.claim.id, "check": j.rows.says, "condition": [_condition(r) for _, r in j.rows.iterrows()],
            "expect": j.rows.expect, "margin": j.rows.margin, "effect": j.rows.effect, "ci95": j.rows.ci95,
            "test": j.rows.test, "n_a": j.rows.n_a, "n_b": j.rows.n_b, "p": j.rows.p, "p_holm": j.rows.p_holm,
            "outcome": j.rows.outcome, "why": j.rows.why})
        frames.append(shown)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def forest(j: Judgement):
    """Each tested condition's effect with its 95% interval, the no-effect line, and ±margin where one applies."""
    rows = j.rows
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.4), layout="constrained")
    colors = {"supported": "tab:green", "contradicted": "tab:red", "not detected": "tab:gray",
              "inconclusive": "tab:orange"}
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        half = r.ci95 if np.isfinite(r.ci95) else 0.0
        ax.errorbar(r.effect, yi, xerr=half, fmt="o", color=colors[r.outcome], capsize=3)
        if r.margin:
            ax.plot([-r.margin, r.margin], [yi, yi], color="0.75", linewidth=6, zorder=0, solid_capstyle="butt")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r.says}\n{_condition(r)}" for _, r in rows.iterrows()], fontsize=7)
    ax.set_xlabel("effect (a minus b; accuracies in points), 95% interval")
    handles = [plt.Line2D([], [], marker="o", linestyle="none", color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, loc="best")
    ax.set_title(f"{j.claim.id}: {j.verdict}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _p(value: float) -> str:
    return f"{value:.2g}" if np.isfinite(value) else "-"


def markdown(judgements: list[Judgement], scale: str, command: str, done: str, figures: set[str]) -> str:
    table = claims_table(judgements, scale)
    shown = table.assign(effect=[f"{e} {c}" if c != "-" else e for e, c in zip(table.effect, table.ci95)])
    lines = ["# normbench claims", "",
             f"Scale: {SCALE_WORDS.get(scale, scale)}. Command: `{command}`" + (f"; {done}." if done else "."), "",
             "Each claim is tested by the comparisons listed in its section, each in every condition that has "
             "runs at both sides. Effects are differences of means over seeds (accuracies in percentage points) "
             "with their 95% interval (Welch's, or paired by seed or by run); Holm's correction runs over all of a "
             "claim's comparisons. Verdicts: **supported** (every comparison goes the predicted way, after the "
             "correction), **contradicted** (one goes clearly the other way), **not detected** (an interval "
             "includes no effect), **inconclusive** (too few finished runs, divergence, or an interval too wide to "
             "decide an equality). Every verdict holds at the scale it was measured at, and only there.", "",
             *md_table(shown[["claim", "verdict", "measured", "effect", "scale"]]).splitlines(), ""]
    for j in judgements:
        c = j.claim
        lines += [f"## {c.id}: {j.verdict}", "", f"**Claim.** {c.statement}", "", f"**Source.** {c.source}", "",
                  f"**Setup ({scale}).** {c.setup if scale == 'small' else c.paper_setup} "
                  f"Preset: `normbench/conf/experiment/{c.preset}.yaml`"
                  + (f", with `{' '.join(c.paper)}`." if scale == "paper" else "."), ""]
        if j.why:
            lines += [f"**Why {j.verdict}:** {j.why}.", ""]
        if not j.rows.empty:
            rows = j.rows
            numbers = pd.DataFrame({
                "comparison": rows.says, "condition": [_condition(r) for _, r in rows.iterrows()],
                "predicted": [f"{e} (margin {m:g})" if m else e for e, m in zip(rows.expect, rows.margin)],
                "effect": [fmt_ci(e, h, _digits(e), signed=True) for e, h in zip(rows.effect, rows.ci95)],
                "test": [f"{t}, n={a}/{b}" if b else f"{t}, n={a}" for t, a, b in zip(rows.test, rows.n_a, rows.n_b)],
                "p": [_p(p) for p in rows.p], "p (Holm)": [_p(p) for p in rows.p_holm], "outcome": rows.outcome})
            lines += [md_table(numbers), ""]
        if c.id in figures:
            lines += [f"![{c.id}](claim_{c.id}.png)", ""]
        lines += [f"**Published anchor.** {c.anchor}", ""]
    return "\n".join(lines) + "\n"


def write(folder: Path, judgements: list[Judgement], scale: str, command: str, done: str = "") -> Path:
    """`done`: what this invocation did, in words ('172 runs trained, 0 already finished, 226 s wall')."""
    with results.report_lock(folder):
        results.remove_stale_temp_files(folder)
        results.write_table(folder / "claims.csv", claims_table(judgements, scale))
        results.write_table(folder / "claims_checks.csv", checks_table(judgements))
        figures = set()
        for j in judgements:
            fig = forest(j)
            if fig is not None:
                results.write_figure(folder / f"claim_{j.claim.id}", fig)
                plt.close(fig)
                figures.add(j.claim.id)
        path = folder / "claims.md"
        results.atomic_write(path, markdown(judgements, scale, command, done, figures))
    return path
