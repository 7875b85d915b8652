"""The experiment report: tables, figures and verdict rebuilt from the run folders alone.

`build` reads an experiment folder and computes everything; `write` puts the CSV
tables, figures and ``report.md`` next to the runs. The disk is the source of truth.

A sweep's report covers the runs that sweep planned (`after_sweep`), whatever else the folder
holds; ``normbench report results/<experiment>`` covers every run in the folder, and says so when
they differ in a setting that no sweep recorded there varies (a lone ``normbench run`` with other
epochs, say): that setting then separates them in the tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from rich.table import Table

from normbench import analysis, plots, results
from normbench.config import run_id
from normbench.display import console
from normbench.errors import UserError


LOST_MARK = re.compile(r"\d+/\d+ (diverged|failed|missing)")  # a pivot cell that lost seeds


@dataclass
class Report:
    experiment: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    pivot: pd.DataFrame
    delta: pd.DataFrame
    degradation: pd.DataFrame
    verdict: dict[str, list[str]]
    curves: dict[str, pd.DataFrame]
    summaries: list[dict] = field(default_factory=list)  # the run folders' summary.json, as read
    warnings: list[str] = field(default_factory=list)  # for the terminal: folders skipped, runs that do not mix
    sweeps: list[dict] = field(default_factory=list)
    scope: str = ""  # which runs the report covers, in a sentence
    skipped: list[str] = field(default_factory=list)  # the folders left out, and why
    effects: pd.DataFrame = field(default_factory=pd.DataFrame)  # each other swept setting's effect (analysis.effects)


def build(experiment: Path, sweep: dict | None = None) -> Report:
    """The report of every run in `experiment`, or of the runs `sweep` (its sweeps.json entry) planned."""
    if not experiment.is_dir():
        raise UserError(f"no experiment folder at {experiment}")
    summaries, curves, skipped = results.scan(experiment)
    in_folder = len(summaries)
    if sweep is not None:
        planned = set(sweep.get("runs", []))
        summaries = [s for s in summaries if s["run_id"] in planned]
        curves = {rid: c for rid, c in curves.items() if rid in planned}
    if not summaries:
        first = f"; the first: {skipped[0]}" if skipped else ""
        raise UserError(f"no finished runs under {experiment}" + (f" ({len(skipped)} skipped{first})" if skipped else ""))
    runs = analysis.runs_table(summaries)
    summary = analysis.summary_table(runs)
    degr = analysis.degradation(runs, summary)
    sweeps = [sweep] if sweep is not None else results.read_sweeps(experiment)
    if sweep is not None:
        others = in_folder - len(summaries)
        scope = (f"This report covers {_runs(len(summaries))} of the sweep `{sweep['command']}`"
                 + (f"; the folder holds {others} other finished {'run' if others == 1 else 'runs'} "
                    f"(`normbench report {experiment}` reports them all)." if others else "."))
        mixed = []
    else:
        scope = f"This report covers {_runs(len(summaries), 'all ')} in {experiment}."
        mixed = _unswept_differences(runs, sweeps)
    effects = analysis.sweep_effects(runs)
    verdict = analysis.verdict(runs, summary, degr)
    if not effects.empty:
        verdict[EFFECTS_TITLE] = analysis.factor_verdict(effects)
    return Report(experiment, runs, summary, analysis.pivot(summary), analysis.delta_vs_bn(runs, summary), degr,
                  verdict, curves, summaries, skipped + mixed, sweeps, " ".join([scope, *mixed]), skipped, effects)


EFFECTS_TITLE = "Other swept settings (smallest level minus largest; a named level minus the first)"


def _runs(n: int, all_: str = "") -> str:
    return "the one finished run" if n == 1 else f"{all_ or 'the '}{n} finished runs"


def _unswept_differences(runs: pd.DataFrame, sweeps: list[dict]) -> list[str]:
    """A sentence when the runs differ in settings (beyond data, model, norm and batch size) that no sweep
    recorded in the folder varies: they were made by different commands, and the tables keep them apart."""
    extra = [c for c in analysis.condition_columns(runs) if c.startswith("config.")]
    swept = set()
    for sweep in sweeps:
        mine = runs[runs.run_id.isin(set(sweep.get("runs") or []))]
        swept.update(c for c in extra if analysis.tables.as_text(mine[c]).nunique() > 1)
    unswept = [c for c in extra if c not in swept]
    if not unswept:
        return []
    values = "; ".join(f"{c.split('.', 1)[1]} {' or '.join(sorted(set(map(analysis.tables.value_text, runs[c]))))}"
                       for c in unswept)
    return [f"The runs in this folder differ in settings that no sweep recorded here varies ({values}): "
            "they come from different runs or sweeps, and the tables keep them apart by those settings."]


def after_sweep(outcome, command: str) -> list[tuple[Report, Path]]:
    """Record the sweep in each experiment it touched, then write the report of the runs it planned there."""
    written = []
    for experiment in outcome.experiment_dirs:
        planned = sorted({run_id(p.cfg) for p in outcome.planned  # a set: jobs that repeat a run list it once
                          if p.cfg is not None and results.experiment_dir(p.cfg) == experiment})
        entry = {"command": command.strip(), "seconds": round(outcome.seconds, 1), "planned": len(outcome.planned),
                 "trained": outcome.trained, "already_done": outcome.already_done, "failed": len(outcome.failures),
                 "runs": planned}
        kept = results.record_sweep(experiment, entry)
        rep = build(experiment, sweep=entry)
        rep.warnings += [kept] if kept else []
        written.append((rep, write(rep)))
    return written


def write(report: Report) -> Path:
    """Write runs.csv, summary.csv, pivot.csv, delta_vs_bn.csv, degradation.csv, figures and report.md."""
    with results.report_lock(report.experiment):
        return _write(report)


def _write(report: Report) -> Path:
    out = report.experiment
    results.remove_stale_temp_files(out)  # a sweep killed while writing its report may have left one
    results.write_table(out / "runs.csv", analysis.as_written(report.runs))
    results.write_table(out / "summary.csv", report.summary)
    results.write_table(out / "pivot.csv", report.pivot, index=True)
    results.write_table(out / "delta_vs_bn.csv", report.delta)
    results.write_table(out / "degradation.csv", report.degradation)
    if not report.effects.empty:
        results.write_table(out / "effects.csv", report.effects)
    title = out.name
    figures = {"accuracy_vs_batch": plots.accuracy_vs_batch(report.summary, title),
               "bn_eval_modes": plots.bn_eval_modes(report.summary, title),
               "training_curves": plots.training_curves(report.runs, report.curves, title)}
    for factor in dict.fromkeys(report.effects.factor) if not report.effects.empty else []:
        figures[f"accuracy_vs_{factor.removeprefix('config.').replace('.', '_')}"] = plots.metric_vs_factor(
            report.runs, factor, "test_acc", title)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            results.write_figure(out / name, fig)
            plt.close(fig)
            written.append(name)
    path = out / "report.md"
    results.atomic_write(path, markdown(report, written, _probes(report)))
    return path


def _probes(report: Report) -> list[str]:
    """The probes' section of report.md (it writes their figures), when some run carries probe tables."""
    folders = [report.experiment / s["run_id"] for s in report.summaries]
    if not any(any(f.glob("probe_*.csv")) for f in folders):
        return []  # (and the probes package, which imports torch, stays unimported)
    from normbench.probes.section import probes_section

    return probes_section(folders, report.experiment)[0]


def _heading(column) -> str:
    """'epochs' for the flattened config key 'config.epochs'."""
    return str(column).removeprefix("config.")


def md_table(frame: pd.DataFrame) -> str:
    """A markdown table of `frame` (its index too, unless a plain range): floats by `_cell`, 'config.' dropped."""
    frame = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame
    header = "| " + " | ".join(map(_heading, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(v) -> str:
    """A float with two decimals, or as many significant digits as tell 0.001 from 0.0005 (a setting)."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2f}" if v == 0 or 0.1 <= abs(v) < 1e6 else f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")  # a pipe or a line break would end the row


def _lost_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """The conditions where a planned seed diverged, failed or never finished, with the counts."""
    if summary.empty:
        return summary
    counts = ["n_planned", "n", "n_diverged", "n_failed", "n_missing"]
    keys = analysis.panel_columns(summary) + ["norm", "batch_size"]
    lost = summary[(summary.n_diverged + summary.n_failed + summary.n_missing) > 0]
    names = {"n_planned": "planned", "n": "completed", "n_diverged": "diverged", "n_failed": "failed",
             "n_missing": "missing"}
    return lost[keys + counts].rename(columns=names).reset_index(drop=True)


def _effects_table(effects: pd.DataFrame) -> pd.DataFrame:
    shown = effects.assign(effect=[analysis.fmt_ci(d, h, signed=True) for d, h in zip(effects.effect, effects.ci95)],
                           p=[f"{p:.2g}" if math.isfinite(p) else "-" for p in effects.p],
                           p_holm=[f"{p:.2g}" if math.isfinite(p) else "-" for p in effects.p_holm])
    shown.factor = shown.factor.str.removeprefix("config.")
    return shown.drop(columns=["ci95", "why"]).dropna(axis=1, how="all")


def _delta_pivot(delta: pd.DataFrame) -> pd.DataFrame:
    if delta.empty:
        return delta
    keys = [c for c in delta.columns if c not in ("batch_size", "delta", "delta_ci95")]
    cells = delta.assign(cell=[analysis.fmt_ci(d, h, signed=True) for d, h in zip(delta.delta, delta.delta_ci95)])
    return cells.pivot_table(index=keys, columns="batch_size", values="cell", aggfunc="first").fillna("-")


ANCHORS = {
    "resnet20": """**Group Normalization (Wu & He 2018), ResNet-50 on ImageNet, validation error (%) by images per GPU**
(accuracy = 100 - error; our stand-in is ResNet-20 on CIFAR):

| images/GPU | 32 | 16 | 8 | 4 | 2 |
|---|---|---|---|---|---|
| BN | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |
| GN | 24.1 | 24.2 | 24.0 | 24.2 | 24.1 |

At batch 32: BN 23.6, LN 25.3, IN 28.4, GN 24.1. A public Keras reproduction on CIFAR-10 (ResNet-20,
lr 0.1·B/32, 5 seeds) reports test accuracy BN ≈ 0.80 vs GN ≈ 0.86 at batch 2, both ≈ 0.86 at batch 32.""",
    "mlp": """**Layer Normalization (Ba et al. 2016), Figure 6**: permutation-invariant MNIST, MLP 784-1000-1000-10,
Adam, batch 128 vs 4. LN is robust to the batch size and converges faster; BN gets worse and noisier
at batch 4. The paper gives curves, no table.""",
    "rnn": """**Recurrent Batch Normalization (Cooijmans et al. 2016), Table 1**, pixel-by-pixel MNIST test accuracy:
LSTM 98.9, BN-LSTM 99.0; permuted MNIST: LSTM 90.2, BN-LSTM 95.4. Statistics shared across time
degrade the result badly. (normbench reads a row per step, 28 steps, not a pixel per step.)""",
    "cnn": """**What to expect at small scale** (docs/protocol.md §6.6 in the normbench repository): on MNIST
with a small conv net BN often still does well at batch 4-8, because its conv statistics use many H×W
values; the MLP with BatchNorm1d shows the effect most sharply.""",
}


def markdown(report: Report, figures: list[str], probes: list[str] = ()) -> str:
    r = report
    done = r.runs.status.value_counts().to_dict()
    lines = [f"# normbench report: {r.experiment.name}", "",
             f"{len(r.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(done.items())) + ". "
             "Accuracies are final test accuracies in percent; ± is the half-width of the 95% t-interval "
             "over seeds; differences are in percentage points. A cell marked (2/3 diverged), (1/3 failed) "
             "or (1/3 missing) is the mean of the seeds that completed; the others are counted, never "
             "dropped silently. No interval is given for one seed, or for seeds that all agree (no spread).",
             "", r.scope, "", "## Verdict", ""]
    for panel, sentences in r.verdict.items():
        lines += [f"**{panel}**", ""] + [f"- {s}" for s in sentences] + [""]
    if not r.verdict:
        lines += ["No verdict: it needs two batch sizes per norm, or two levels of some other setting.", ""]
    lines += ["## Test accuracy (%) by norm and batch size", "", md_table(r.pivot), ""]
    lost = _lost_seeds(r.summary)
    if not lost.empty:
        lines += ["## Seeds without a result", "", md_table(lost), ""]
    if not r.delta.empty:
        lines += ["## Difference from batch norm (points)", "", md_table(_delta_pivot(r.delta)), ""]
    if not r.degradation.empty:
        lines += ["## Degradation: accuracy at the largest batch minus at the smallest (points)", "",
                  md_table(r.degradation.rename(columns={"drop_ci95": "± (95%)"})), ""]
    if not r.effects.empty:
        lines += ["## Effects of the other swept settings", "",
                  "Each row: the metric at one level minus at another, in one condition (every other setting "
                  "equal), with its 95% interval over seeds (Welch's, or paired by seed), the two-sided p-value and "
                  "Holm's adjustment over all the rows of this table.", "", md_table(_effects_table(r.effects)), ""]
    lines += ["## Figures", ""] + [f"![{f}]({f}.png)" for f in figures] + [""]
    if probes:
        lines += [*probes, ""]
    models = sorted(set(r.runs["config.model.name"]))
    anchors = [ANCHORS[m] for m in models if m in ANCHORS]
    if anchors:
        lines += ["## Published results for comparison", ""] + [a + "\n" for a in anchors]
    lines += _provenance(r)
    return "\n".join(lines) + "\n"


def _values(runs: pd.DataFrame, column: str) -> str:
    return ", ".join(sorted({str(v) for v in runs[column]}))


def _provenance(r: Report) -> list[str]:
    summaries = r.summaries
    devices = sorted({s.get("device", "?") for s in summaries})
    versions = summaries[0].get("versions", {})
    shas = sorted({s.get("git_sha") or "unknown" for s in summaries})
    lines = ["## Provenance", "",
             f"- runs: {len(r.runs)}; total training time {r.runs.wall_seconds.sum():.0f} s on {', '.join(devices)}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- git sha: {', '.join(shas)}",
             f"- epochs per run: {_values(r.runs, 'config.epochs')}; "
             f"lr scaling: {_values(r.runs, 'config.lr_scaling')} "
             f"(base lr {_values(r.runs, 'config.lr')} at batch {_values(r.runs, 'config.base_batch_size')})"]
    lines += [f"- {_sweep_line(sweep)}" for sweep in r.sweeps]
    if r.skipped:
        lines += ["", "Run folders skipped or read in part:"] + [f"- {w}" for w in r.skipped]
    return lines


def _sweep_line(sweep: dict) -> str:
    """One recorded sweep (read from sweeps.json, so any field may be missing or odd)."""
    def count(key: str) -> str:
        value = sweep.get(key)
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"

    done = "already_done" if "already_done" in sweep else "skipped"  # the name before 0.2
    seconds = sweep.get("seconds")
    wall = f"{seconds:.0f} s wall" if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else "?"
    return (f"`{sweep['command']}`: {count('trained')} trained, {count(done)} already done, "
            f"{count('failed')} failed, {wall}")


def rich_pivot(report: Report) -> Table:
    """The pivot as a Rich table, for the end of a sweep."""
    pv = report.pivot.reset_index()
    title = f"{report.experiment.name}: test accuracy (%), mean ± 95% interval"
    table = Table(title=title, header_style="bold", min_width=len(title) + 4)  # a title never wraps
    for col in pv.columns:
        table.add_column(_heading(col), justify="right" if isinstance(col, (int, float)) else "left")
    for row in pv.itertuples(index=False):
        # through the console, which writes "±" as "+/-" where the output cannot encode it, before layout
        table.add_row(*(console.render_str(str(v), style="yellow" if LOST_MARK.search(str(v)) else "", markup=False)
                        for v in row))
    return table
