"""The probes' part of an experiment's report: read the finished runs' probe CSVs, aggregate them
(`normbench.analysis.probes`), draw the figures (`figures`) and say in words, with 95% intervals over seeds,
what they show. `probes_section` is the one entry point; it returns markdown lines and the figures' paths.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from normbench import results
from normbench.analysis import probes as ap
from normbench.analysis.stats import diff_ci
from normbench.analysis.tables import fmt_ci
from normbench.config.ids import norm_label
from normbench.probes import PROBES, columns
from normbench.probes import figures as fg


def read_tables(folders: list[Path]) -> tuple[dict[str, pd.DataFrame], list[dict], list[str]]:
    """Each probe's rows over every finished run, the runs' summaries, and warnings for damaged files."""
    tables: dict[str, list] = {name: [] for name in PROBES}
    runs, warnings = [], []
    for folder in folders:
        summary = results.read_summary(folder)
        if summary is None or summary.get("status") not in results.FINISHED or not isinstance(summary.get("config"), dict):
            continue
        c = summary["config"]
        run = {"run_id": summary.get("run_id", folder.name), "model": c["model"]["name"], "norm": norm_label(c["norm"]),
               "train_batch_size": c["batch_size"], "seed": c["seed"], "status": summary["status"],
               "test_acc": (summary.get("final") or {}).get("test_acc")}
        runs.append(run)
        for name in PROBES:
            path = folder / f"probe_{name}.csv"
            if not path.exists():
                continue
            try:
                table = pd.read_csv(io.BytesIO(results.read_regular(path)), dtype={"layer": str})
            except (OSError, ValueError, pd.errors.ParserError) as e:
                warnings.append(f"{path}: unreadable ({e}), left out")
                continue
            if list(table.columns) != columns(name):
                warnings.append(f"{path}: unexpected columns, left out")
                continue
            tables[name].append((run, table))
    return {k: ap.combine(v) for k, v in tables.items() if v}, runs, warnings


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _digits(value: float) -> int:
    return 3 if not np.isfinite(value) or value == 0 else max(1, 3 - int(math.floor(math.log10(abs(value)))))


def _cell(mean: float, half: float) -> str:
    return fmt_ci(mean, half, _digits(mean))


def _condition_table(per_run: pd.DataFrame, quantities: list[str], model: str) -> list[str]:
    f = per_run[per_run.model == model]
    table = ap.over_seeds(f, ["norm", "quantity"])
    rows = []
    for norm, g in table.groupby("norm", sort=True):
        g = g.set_index("quantity")
        rows.append([norm, *(_cell(g["mean"].get(q, math.nan), g.ci95.get(q, math.nan)) for q in quantities),
                     str(int(g.n.max()))])
    return _md_table(["norm", *quantities, "seeds"], rows)


def _versus(per_run: pd.DataFrame, quantity: str, model: str, a: str, b: str, words: str) -> str | None:
    """'On mlp, bn's loss range is 0.12 ± 0.05 lower than none's' or 'no detectable difference'."""
    norms = set(per_run[per_run.model == model].norm)
    if a not in norms or b not in norms:
        return None
    d, half, na, nb = ap.compare(per_run, quantity, model, a, b)
    if not np.isfinite(d):
        return None
    if not np.isfinite(half):
        return f"On {model}, {a} vs {b} on {words}: {d:+.3g} with no interval ({na} and {nb} seeds)."
    if abs(d) <= half:
        return f"On {model}, {a} vs {b} on {words}: no detectable difference ({d:+.3g} ± {half:.2g})."
    way = "lower" if d < 0 else "higher"
    return f"On {model}, {a}'s {words} is {abs(d):.3g} ± {half:.2g} {way} than {b}'s (Welch 95%)."


def _save(fig, out: Path, stem: str, paths: list[Path]) -> None:
    paths += results.write_figure(out / stem, fig)
    plt.close(fig)


def _landscape(frame: pd.DataFrame, out: Path, paths: list[Path]) -> list[str]:
    quantities = ["loss_range", "grad_predictiveness", "beta_smoothness"]
    per_run = ap.per_run(frame, quantities)
    lines = ["### Loss landscape along the gradient (Santurkar et al. 2018, §3.1)", "",
             "Mean over each run's measured steps, then over seeds (95% t-interval)."]
    for model in sorted(per_run.model.unique()):
        lines += ["", f"**{model}**", "", *_condition_table(per_run, quantities, model), ""]
        for q, words in (("loss_range", "loss range"), ("beta_smoothness", "effective β-smoothness")):
            lines += [s for s in [_versus(per_run, q, model, "bn", "none", words)] if s]
    _save(fg.over_training_figure({q: ap.curves(frame, q) for q in ("loss_range", "beta_smoothness")}),
          out, "probe_landscape", paths)
    return [*lines, "", "![loss range and β-smoothness over training](probe_landscape.png)", ""]


def _ics(frame: pd.DataFrame, out: Path, paths: list[Path]) -> list[str]:
    per_run = ap.per_run(frame, ["l2_diff", "cosine"], min_depth=1)
    lines = ["### Internal covariate shift (Santurkar et al. 2018, Definition 2.1)", "",
             "‖G − G′‖ and cos(G, G′) averaged over layers after the first (where G′ = G) and over steps."]
    for model in sorted(per_run.model.unique()):
        lines += ["", f"**{model}**", "", *_condition_table(per_run, ["l2_diff", "cosine"], model), ""]
        lines += [s for s in [_versus(per_run, "l2_diff", model, "bn", "none", "‖G − G′‖"),
                              _versus(per_run, "cosine", model, "bn", "none", "cos(G, G′)")] if s]
    _save(fg.per_layer_figure({q: ap.per_layer(frame, q) for q in ("l2_diff", "cosine")}, log={"l2_diff": True}),
          out, "probe_ics", paths)
    return [*lines, "", "![ICS per layer](probe_ics.png)", ""]


def _batch_stats(frame: pd.DataFrame, out: Path, paths: list[Path]) -> list[str]:
    slopes = ap.batch_error_slopes(frame)
    lines = ["### Batch-statistics noise", "",
             "Log-log slope of the median relative error of a batch's mean against B, at each run's last measured "
             "step (−0.5: the 1/√B law of independent samples), per layer, over seeds."]
    rows = []
    for _, r in slopes.iterrows():
        fits = np.isfinite(r.ci95) and abs(r["mean"] + 0.5) <= r.ci95
        verdict = ("interval includes −0.5" if fits else "no interval" if not np.isfinite(r.ci95)
                   else "shallower than 1/√B" if r["mean"] > -0.5 else "steeper than 1/√B")
        rows.append([r.model, r.norm, str(int(r.depth)), _cell(r["mean"], r.ci95), verdict])
    lines += ["", *_md_table(["model", "norm", "layer", "slope", "against 1/√B"], rows), ""]
    _save(fg.batch_error_figure(ap.batch_error(frame), "mean"), out, "probe_batch_stats", paths)
    return [*lines, "![batch-statistics error against B](probe_batch_stats.png)", ""]


def _residual(frame: pd.DataFrame, out: Path, paths: list[Path]) -> list[str]:
    first, last = ap.per_run(frame, ["ratio"], steps="first"), ap.per_run(frame, ["ratio"], steps="last")
    lines = ["### Residual branch scale (De & Smith 2020)", "",
             "Var(F(x)) / Var(skip(x)) per block, at initialization (first and last block) and at the last "
             "measured step (mean over blocks)."]
    init = frame[frame.quantity == "ratio"]
    init = init[init.step == init.groupby("run_id").step.transform("min")]
    by_block = init.groupby(["norm", "depth"]).value.mean().unstack("depth")
    rows = []
    for norm in sorted(set(first.norm)):
        blocks = by_block.loc[norm] if norm in by_block.index else pd.Series(dtype=float)
        end = ap.over_seeds(last[last.norm == norm], ["norm"])
        rows.append([norm, f"{blocks.iloc[0]:.3g}" if len(blocks) else "-",
                     f"{blocks.iloc[-1]:.3g}" if len(blocks) else "-", _cell(end["mean"].iloc[0], end.ci95.iloc[0])])
    lines += ["", *_md_table(["norm", "first block at init", "last block at init", "mean at last step"], rows), ""]
    _save(fg.per_layer_figure({"ratio": ap.over_seeds(init, ["model", "norm", "depth"])}, "block",
                              log={"ratio": False}), out, "probe_residual", paths)
    return [*lines, "![residual ratio per block at initialization](probe_residual.png)", ""]


def _scales(frame: pd.DataFrame, out: Path, paths: list[Path]) -> list[str]:
    _save(fg.per_layer_figure({q: ap.per_layer(frame, q) for q in ("grad_norm", "output_std")},
                              log={"grad_norm": True, "output_std": True}), out, "probe_scales", paths)
    return ["### Gradient and activation scale per layer", "",
            "Mean over each run's measured steps, then over seeds.", "",
            "![gradient norm and activation std per layer](probe_scales.png)", ""]


def _noisy_bn(runs: list[dict]) -> list[str]:
    """Whether BN with injected noise trains as well as BN: final test accuracy, per model."""
    frame = pd.DataFrame(runs)
    lines = []
    for model, g in frame.groupby("model", sort=True):
        base = g[g.norm == "bn"].test_acc.dropna().astype(float)
        for norm in sorted(n for n in g.norm.unique() if n.startswith("bn(") and "noise" in n):
            noisy = g[g.norm == norm].test_acc.dropna().astype(float)
            d, half = diff_ci(noisy, base)
            if not np.isfinite(d):
                continue
            said = (f"no detectable difference ({d:+.1f} ± {half:.1f} points)" if np.isfinite(half) and abs(d) <= half
                    else f"{d:+.1f} ± {half:.1f} points" if np.isfinite(half) else f"{d:+.1f} points, no interval")
            lines.append(f"On {model}, {norm} against bn, final test accuracy: {said} (Welch 95%).")
    return ["### Noisy BN against BN (Santurkar et al. 2018, §2.1)", "", *lines, ""] if lines else []


SECTIONS = {"batch_stats": _batch_stats, "landscape": _landscape, "ics": _ics, "residual": _residual,
            "scales": _scales}


def probes_section(run_folders: list[Path], out: Path) -> tuple[list[str], list[Path]]:
    """The report's probes section from finished runs' folders: markdown lines (figure links relative to
    `out`) and the figure files written into `out`. ([], []) when no run carries probes."""
    tables, runs, warnings = read_tables(list(run_folders))
    if not tables:
        return [], []
    paths: list[Path] = []
    lines = ["## Probes", "", "What the probes measured during training (docs: README, Probes; definitions in "
             "normbench/probes/). Intervals are 95% over seeds.", ""]
    for name, section in SECTIONS.items():
        if name in tables and len(tables[name]):
            lines += section(tables[name], out, paths)
    lines += _noisy_bn(runs)
    lines += [f"- skipped: {w}" for w in warnings]
    return lines, paths
