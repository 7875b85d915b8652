"""normbench.analysis on hand-made run summaries: statistics, tables and the computed verdict. No training."""

from __future__ import annotations

import functools
import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normbench import analysis
from normbench.analysis import diff_ci
from normbench.config import compose, to_dict

T2, T4 = stats.t.ppf(0.975, 2), stats.t.ppf(0.975, 4)  # 95% t quantiles at 2 and 4 df

# ---- formatting ------------------------------------------------------------------------------------------


def test_fmt_ci():
    assert analysis.fmt_ci(90.04, 1.26) == "90.0 ± 1.3"
    assert analysis.fmt_ci(90.04, math.nan) == "90.0"
    assert analysis.fmt_ci(math.nan, 1.0) == "-"


# ---- fake run summaries ----------------------------------------------------------------------------------


@functools.cache
def _base_config(norm: str) -> str:
    import json

    return json.dumps(to_dict(compose(["data=synthetic", "model=mlp", f"norm={norm}", "results_dir=unused"])))


_ids = itertools.count()


def fake_run(norm: str = "bn", batch_size: int = 32, seed: int = 0, acc: float | None = 90.0, *,
             status: str = "completed", precise: float | None = None, batch_stats: float | None = None,
             preset: str | None = None, steps: int = 100, **norm_keys) -> dict:
    """A dict shaped like summary.json, with a real composed config."""
    import json

    config = json.loads(_base_config(preset or norm))
    config["norm"].update(norm_keys)
    config["batch_size"], config["seed"] = batch_size, seed
    final = None if acc is None else {
        "epoch": 1, "step": 100, "lr": 0.1, "train_loss": 0.5, "train_acc": 95.0, "test_loss": 0.4,
        "test_acc": acc, "test_acc_batch_stats": batch_stats, "test_acc_precise": precise,
        "seconds": 1.0, "samples_per_s": 1000.0}
    return {
        "run_id": f"mlp-{config['norm']['name']}-b{batch_size}-s{seed}-{next(_ids):012d}", "status": status,
        "config_hash": "0" * 12, "error": None if status != "failed" else "RuntimeError: x",
        "config": config, "final": final, "effective_lr": 0.1 * batch_size / 32, "epochs_completed": 1,
        "steps": steps, "wall_seconds": 2.0, "best_test_acc": acc,
        "diverged_step": 7 if status == "diverged" else None,
    }


def tables(summaries: list[dict]):
    runs = analysis.runs_table(summaries)
    summary = analysis.summary_table(runs)
    degr = analysis.degradation(runs, summary)
    return runs, summary, degr, analysis.verdict(runs, summary, degr)


def one(frame: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(frame), dtype=bool)
    for k, v in where.items():
        mask &= (frame[k] == v).to_numpy()
    assert mask.sum() == 1, f"{where}: {mask.sum()} rows"
    return frame[mask].iloc[0]


# BN loses 20 points from batch 128 to 2 (seed noise 0.5); LN is flat.
BN_DROP = {("bn", 128): [90.0, 90.5, 89.5], ("bn", 2): [70.0, 70.5, 69.5],
           ("ln", 128): [88.0, 88.5, 87.5], ("ln", 2): [88.5, 87.5, 88.0]}
BN_PRECISE_GAIN = (14.0, 15.0, 16.0)  # recomputed statistics at batch 2, per seed


def bn_drop_runs(with_precise: bool = False, gains=BN_PRECISE_GAIN) -> list[dict]:
    out = []
    for (norm, batch), accs in BN_DROP.items():
        for seed, acc in enumerate(accs):
            extra = {}
            if with_precise and norm == "bn":
                gain = gains[seed] if batch == 2 else 0.0
                extra = {"precise": acc + gain, "batch_stats": acc + 5.0}
            out.append(fake_run(norm, batch, seed, acc, **extra))
    return out


# ---- tables ----------------------------------------------------------------------------------------------


def test_runs_table_flattens_config_and_sorts():
    summaries = [fake_run("ln", 8, 1, 80.0), fake_run("bn", 8, 0, 70.0), fake_run("bn", 2, 0, 60.0)]
    runs = analysis.runs_table(summaries)
    assert list(runs.columns[:10]) == ["run_id", "status", "data", "model", "norm", "batch_size", "seed",
                                       "effective_lr", "epochs", "steps"]
    assert list(zip(runs.norm, runs.batch_size, runs.seed)) == [("bn", 2, 0), ("bn", 8, 0), ("ln", 8, 1)]
    assert list(runs.test_acc) == [60.0, 70.0, 80.0]
    assert set(runs.data) == {"synthetic"} and set(runs.model) == {"mlp"}
    assert list(runs["config.norm.name"]) == ["bn", "bn", "ln"]
    assert runs["config.norm.momentum"].iloc[0] == 0.1 and math.isnan(runs["config.norm.momentum"].iloc[2])
    assert runs["config.data.shape"].iloc[0] == (1, 28, 28)
    assert runs.effective_lr.tolist() == pytest.approx([0.1 * 2 / 32, 0.1 * 8 / 32, 0.1 * 8 / 32])
    assert analysis.runs_table([]).empty


def test_summary_table_statistics_and_diverged_runs():
    summaries = [fake_run("bn", 4, s, a) for s, a in enumerate([80.0, 82.0, 84.0])]
    summaries.append(fake_run("bn", 4, 3, 10.0, status="diverged"))  # has a test_acc, must not count
    summaries.append(fake_run("bn", 4, 4, None, status="failed"))
    summaries += [fake_run("ln", 4, 0, 85.0)]
    runs = analysis.runs_table(summaries)
    summary = analysis.summary_table(runs)
    assert len(summary) == 2
    bn = one(summary, norm="bn")
    assert (bn.n, bn.n_diverged, bn.n_failed) == (3, 1, 1)
    assert bn.test_acc_mean == pytest.approx(82.0)
    assert bn.test_acc_std == pytest.approx(2.0)
    assert bn.test_acc_ci95 == pytest.approx(T2 * 2.0 / math.sqrt(3))
    assert (bn.test_acc_min, bn.test_acc_max) == (80.0, 84.0)
    assert bn.test_acc_lo == pytest.approx(82.0 - bn.test_acc_ci95)
    assert bn.test_acc_hi == pytest.approx(82.0 + bn.test_acc_ci95)
    assert bn.train_loss_mean == pytest.approx(0.5)
    assert math.isnan(bn.test_acc_precise_mean)
    assert (bn.n_planned, bn.n_missing) == (5, 0)  # the panel ran seeds 0-4
    ln = one(summary, norm="ln")
    assert (ln.n, ln.n_diverged, ln.test_acc_mean) == (1, 0, 85.0)
    assert (ln.n_planned, ln.n_missing) == (5, 4)
    assert math.isnan(ln.test_acc_std) and math.isnan(ln.test_acc_ci95)
    assert list(summary.columns[:4]) == ["data", "model", "norm", "batch_size"]


def test_summary_table_seed_is_not_a_condition_but_other_settings_are():
    summaries = [fake_run("bn", 4, s, 80.0 + s) for s in range(2)]
    for s in range(2):
        run = fake_run("bn", 4, s, 60.0 + s)
        run["config"]["lr"] = 0.5
        summaries.append(run)
    summary = analysis.summary_table(analysis.runs_table(summaries))
    assert "config.lr" in summary.columns and "config.seed" not in summary.columns
    assert sorted(summary.test_acc_mean) == [60.5, 80.5]
    assert list(summary.n) == [2, 2]


def test_pivot_cells():
    summaries = [fake_run("bn", b, s, a) for b, accs in ((2, [70.0, 72.0]), (128, [90.0, 90.0]))
                 for s, a in enumerate(accs)]
    summaries.append(fake_run("ln", 2, 0, 88.0))
    summary = analysis.summary_table(analysis.runs_table(summaries))
    pv = analysis.pivot(summary)
    assert pv.index.names == ["data", "model", "norm"]
    assert list(pv.columns) == [2, 128]
    assert pv.loc[("synthetic", "mlp", "bn"), 2] == "71.0 ± 12.7"  # sd sqrt(2), n 2: 12.706
    assert pv.loc[("synthetic", "mlp", "bn"), 128] == "90.0 (no spread)"  # not a zero-width interval
    assert pv.loc[("synthetic", "mlp", "ln"), 2] == "88.0 (1/2 missing)"  # one seed of the panel's two: no interval
    assert pv.loc[("synthetic", "mlp", "ln"), 128] == "-"  # not run


def test_delta_vs_bn_and_degradation():
    runs, summary, degr, _ = tables(bn_drop_runs())
    delta = analysis.delta_vs_bn(runs, summary)
    assert set(delta.norm) == {"ln"}
    small = one(delta, batch_size=2)
    assert small.delta == pytest.approx(88.0 - 70.0)
    assert small.delta_ci95 == pytest.approx(T4 * math.sqrt(0.25 / 3 + 0.25 / 3))  # Welch df = 4
    assert one(delta, batch_size=128).delta == pytest.approx(88.0 - 90.0)

    assert set(degr.norm) == {"bn", "ln"}
    bn = one(degr, norm="bn")
    assert (bn.small_batch, bn.large_batch) == (2, 128)
    assert (bn.acc_small, bn.acc_large) == (pytest.approx(70.0), pytest.approx(90.0))
    assert bn["drop"] == pytest.approx(20.0)  # largest batch minus smallest
    assert bn.drop_ci95 == pytest.approx(T4 * math.sqrt(0.25 / 3 + 0.25 / 3))
    assert one(degr, norm="ln")["drop"] == pytest.approx(0.0)


def test_degradation_needs_two_batch_sizes():
    runs, summary, degr, verdict = tables([fake_run("bn", 4, s, 80.0 + s) for s in range(3)])
    assert degr.empty and verdict == {}


# ---- verdict ---------------------------------------------------------------------------------------------


def test_verdict_bn_degrades_ln_flat():
    _, _, _, verdict = tables(bn_drop_runs())
    assert list(verdict) == ["synthetic / mlp"]
    lines = verdict["synthetic / mlp"]
    half = T4 * math.sqrt(0.25 / 3 + 0.25 / 3)
    assert lines[0] == (f"bn degrades as the batch shrinks: 20.0 ± {half:.1f} points lower at batch 2 "
                        "than at 128.")
    assert lines[1] == f"ln changes by +0.0 ± {half:.1f} points from batch 128 to 2: no detectable change."
    assert lines[2] == f"At batch 2, ln beats bn by 18.0 ± {half:.1f} points."
    assert len(lines) == 3  # no recovery sentence without test_acc_precise
    assert not any("recomput" in line for line in lines)


def test_verdict_recovery_sentence_with_precise_bn():
    _, _, _, verdict = tables(bn_drop_runs(with_precise=True))
    lines = verdict["synthetic / mlp"]
    assert len(lines) == 4
    recovery = lines[3]
    assert recovery.startswith("At batch 2, recomputing BN's statistics after training changes its test accuracy by "
                               f"+15.0 ± {T2 / math.sqrt(3):.1f} points;")
    # every seed gains exactly 5: no spread, so no interval (never "± 0.0")
    assert "its own statistics changes it by +5.0 points (no spread between seeds, so no interval)." in recovery
    share, lo, hi, _ = analysis.recovered_share([70.0, 70.5, 69.5], [84.0, 85.5, 85.5], [90.0, 90.5, 89.5])
    assert recovery.endswith(f"Recomputed statistics recover 75% of the 20.0-point loss "
                             f"(95% interval {100 * lo:.0f}% to {100 * hi:.0f}%).")
    assert "± 0.0" not in recovery


def test_verdict_bn_flat_within_noise():
    data = {("bn", 128): [90.0, 91.0, 89.0], ("bn", 2): [89.5, 90.5, 88.5],
            ("ln", 128): [90.0, 90.4, 89.8], ("ln", 2): [90.0, 90.2, 89.6]}
    summaries = [fake_run(n, b, s, a) for (n, b), accs in data.items() for s, a in enumerate(accs)]
    runs, _, degr, verdict = tables(summaries)
    lines = verdict["synthetic / mlp"]
    bn = one(degr, norm="bn")
    assert abs(bn["drop"]) < bn.drop_ci95
    assert lines[0] == f"bn changes by -0.5 ± {bn.drop_ci95:.1f} points from batch 128 to 2: no detectable change."
    assert lines[1].startswith("ln changes by ") and lines[1].endswith(" from batch 128 to 2: no detectable change.")
    d, h = diff_ci(data[("ln", 2)], data[("bn", 2)])
    assert abs(d) <= h
    assert lines[2] == f"At batch 2, ln differs from bn by {d:+.1f} ± {h:.1f} points: no detectable difference."
    assert not any("degrades" in line or "beats" in line for line in lines)


def test_verdict_bn_better_at_small_batch():
    data = {("bn", 64): [70.0, 70.5, 69.5], ("bn", 4): [80.0, 80.5, 79.5],
            ("ln", 64): [60.0, 60.5, 59.5], ("ln", 4): [60.0, 60.5, 59.5]}
    summaries = [fake_run(n, b, s, a) for (n, b), accs in data.items() for s, a in enumerate(accs)]
    lines = tables(summaries)[3]["synthetic / mlp"]
    assert lines[0].startswith("bn does better at the small batch: 10.0 ± ")
    assert lines[0].endswith("points higher at batch 4 than at 64.")
    assert lines[2].startswith("At batch 4, bn beats ln by 20.0 ± ")


def test_verdict_one_seed_gives_no_interval():
    summaries = [fake_run("bn", 128, 0, 90.0), fake_run("bn", 2, 0, 70.0),
                 fake_run("ln", 128, 0, 88.0), fake_run("ln", 2, 0, 87.0)]
    lines = tables(summaries)[3]["synthetic / mlp"]
    assert lines == ["bn changes by -20.0 points from batch 128 to 2; one seed: no interval, so no test.",
                     "ln changes by -1.0 points from batch 128 to 2; one seed: no interval, so no test.",
                     "At batch 2, ln differs from bn by +17.0 points; one seed: no interval, so no test."]
    assert not any("detectable" in line or "degrades" in line or "beats" in line for line in lines)


def test_verdict_never_says_within():
    data = {("bn", 32): [70.0, 90.0, 80.0], ("bn", 2): [75.0, 95.0, 85.0]}
    summaries = [fake_run(n, b, s, a) for (n, b), accs in data.items() for s, a in enumerate(accs)]
    [line] = tables(summaries)[3]["synthetic / mlp"]
    assert line.startswith("bn changes by +5.0 ± ")
    assert line.endswith(" points from batch 32 to 2: no detectable change.")
    assert "within" not in line


def test_verdict_names_the_steps_when_the_batch_sizes_took_different_numbers():
    """Same epochs: batch 2 takes 16x the steps of batch 32, and the sentence says so."""
    data = {("bn", 32): [90.0, 90.5, 89.5], ("bn", 2): [70.0, 70.5, 69.5],
            ("ln", 32): [80.0, 80.5, 79.5], ("ln", 2): [88.0, 88.5, 87.5],
            ("gn", 32): [80.0, 90.0, 85.0], ("gn", 2): [81.0, 91.0, 86.0]}
    summaries = [fake_run(n, b, s, a, steps=1600 // b) for (n, b), accs in data.items() for s, a in enumerate(accs)]
    lines = tables(summaries)[3]["synthetic / mlp"]
    half = T4 * math.sqrt(0.25 / 3 + 0.25 / 3)
    assert lines[0] == f"bn is 20.0 ± {half:.1f} points lower at batch 2 than at 32, at 16× the steps."
    assert lines[1].startswith("gn changes by +1.0 ± ") and lines[1].endswith(
        " points from batch 32 to 2 at 16× the steps: no detectable change.")
    assert lines[2] == f"ln is 8.0 ± {half:.1f} points higher at batch 2 than at 32, at 16× the steps."
    assert not any("degrades" in line or "does better" in line for line in lines)
    one_seed = [fake_run("bn", b, 0, 80.0 + b, steps=1600 // b) for b in (2, 32)]
    assert tables(one_seed)[3]["synthetic / mlp"] == [
        "bn changes by -30.0 points from batch 32 to 2 at 16× the steps; one seed: no interval, so no test."]


# ---- labels ----------------------------------------------------------------------------------------------


def test_labels_name_the_packaged_variant():
    summaries = []
    for batch, accs in ((4, (70.0, 71.0)), (64, (90.0, 91.0))):
        for seed, acc in enumerate(accs):
            summaries.append(fake_run("bn", batch, seed, acc))  # recurrent_stats=per_step
            summaries.append(fake_run("bn", batch, seed, acc - 5, preset="bn_shared"))
            summaries.append(fake_run("ln", batch, seed, acc + 10))
    runs, summary, degr, verdict = tables(summaries)
    labels = {"bn", "bn_shared", "ln"}
    assert set(runs.norm) == labels
    assert (runs.groupby("norm").size() == 4).all()
    shared = runs[runs.norm == "bn_shared"]
    assert set(shared["config.norm.recurrent_stats"]) == {"shared"}
    # the labels are the conditions: three of them per batch size
    assert set(summary.norm) == labels and len(summary) == 6
    assert one(summary, norm="bn_shared", batch_size=4).test_acc_mean == pytest.approx(65.5)
    # per-step BN is the reference the others are compared with
    assert analysis.bn_label(summary.norm) == "bn"
    delta = analysis.delta_vs_bn(runs, summary)
    assert set(delta.norm) == {"ln"}
    assert one(delta, batch_size=4).delta == pytest.approx(10.0)
    assert set(degr.norm) == labels
    assert verdict["synthetic / mlp"][0].startswith("bn degrades as the batch shrinks")


def test_labels_do_not_depend_on_the_other_runs():
    """A norm's label is that of its run id: the same settings get the same label in any table."""
    runs = analysis.runs_table([fake_run("bn", 4, 0), fake_run("bn", 8, 0, momentum=0.1), fake_run("ln", 4, 0)])
    assert sorted(set(runs.norm)) == ["bn", "ln"]
    runs = analysis.runs_table([fake_run("bn", 4, 0, momentum=0.1), fake_run("bn", 4, 0, momentum=0.01)])
    assert sorted(runs.norm) == ["bn", "bn(momentum=0.01)"]
    alone = analysis.runs_table([fake_run("gn", 4, 0, num_groups=4)])
    assert list(alone.norm) == ["gn(num_groups=4)"]


def test_bn_label_choice():
    assert analysis.bn_label(["ln", "bn", "gn"]) == "bn"
    assert analysis.bn_label(["bn_shared", "bn(momentum=0.01)"]) == "bn(momentum=0.01)"
    assert analysis.bn_label(["ln", "gn"]) is None


# ---- seeds that diverged, failed or never finished ------------------------------------------------------

FLAT = {("bn", 128): [90.0, 90.5, 89.5], ("ln", 128): [88.0, 88.5, 87.5], ("ln", 2): [88.5, 87.5, 88.0]}


def flat_runs() -> list[dict]:
    return [fake_run(n, b, s, a) for (n, b), accs in FLAT.items() for s, a in enumerate(accs)]


def test_two_of_three_diverged_seeds_are_in_the_cell_and_the_verdict():
    summaries = flat_runs() + [fake_run("bn", 2, 0, 95.0), fake_run("bn", 2, 1, 10.0, status="diverged"),
                               fake_run("bn", 2, 2, None, status="diverged")]
    runs, summary, degr, verdict = tables(summaries)
    bn = one(summary, norm="bn", batch_size=2)
    assert (bn.n_planned, bn.n, bn.n_diverged, bn.n_failed, bn.n_missing) == (3, 1, 2, 0, 0)
    assert analysis.pivot(summary).loc[("synthetic", "mlp", "bn"), 2] == "95.0 (2/3 diverged)"
    lines = verdict["synthetic / mlp"]
    assert lines[0] == "bn: 2 of 3 seeds diverged at batch 2."
    assert lines[1] == ("bn changes by +5.0 points from batch 128 to 2 (completed seeds only: 1 of 3 at batch 2); "
                        "one seed: no interval, so no test.")
    assert lines[3] == ("At batch 2, ln differs from bn by -7.0 points (completed seeds only: 1 of 3 for bn); "
                        "one seed: no interval, so no test.")
    assert not any("beats" in line for line in lines)  # the survivor alone ranks nothing


def test_all_seeds_diverged_leaves_no_mean_but_the_finding():
    summaries = flat_runs() + [fake_run("bn", 2, s, None, status="diverged") for s in range(3)]
    summaries += [fake_run("bn", 4, 0, 80.0), fake_run("bn", 4, 1, 81.0),
                  fake_run("bn", 4, 2, None, status="diverged")]
    runs, summary, degr, verdict = tables(summaries)
    pv = analysis.pivot(summary)
    assert pv.loc[("synthetic", "mlp", "bn"), 2] == "3/3 diverged"
    assert pv.loc[("synthetic", "mlp", "bn"), 4] == f"80.5 ± {stats.t.ppf(0.975, 1) * 0.5:.1f} (1/3 diverged)"  # sd/sqrt(n) = 0.5
    lines = verdict["synthetic / mlp"]
    assert lines[0] == "bn: 3 of 3 seeds diverged at batch 2, 1 of 3 at batch 4."
    assert lines[1].startswith("bn degrades as the batch shrinks: 9.5 ± ")
    assert lines[1].endswith("points lower at batch 4 than at 128 (completed seeds only: 2 of 3 at batch 4).")
    assert not any(line.startswith("At batch 2") for line in lines)  # no BN seed at batch 2 to compare with


def test_failed_and_missing_seeds_are_counted():
    summaries = flat_runs() + [fake_run("bn", 2, 0, 95.0), fake_run("bn", 2, 1, None, status="failed")]
    runs, summary, degr, verdict = tables(summaries)  # seed 2 at batch 2 never finished
    bn = one(summary, norm="bn", batch_size=2)
    assert (bn.n_planned, bn.n, bn.n_diverged, bn.n_failed, bn.n_missing) == (3, 1, 0, 1, 1)
    assert analysis.lost_seeds(bn) == "1/3 failed, 1/3 missing"
    assert analysis.pivot(summary).loc[("synthetic", "mlp", "bn"), 2] == "95.0 (1/3 failed, 1/3 missing)"
    lines = verdict["synthetic / mlp"]
    assert lines[:2] == ["bn: 1 of 3 seeds failed at batch 2.",
                         "bn: 1 of 3 seeds missing at batch 2 (not run, or not finished)."]


def test_lost_seeds_are_reported_with_a_single_batch_size():
    summaries = [fake_run("bn", 2, 0, 90.0), fake_run("bn", 2, 1, None, status="diverged")]
    runs, summary, degr, verdict = tables(summaries)
    assert degr.empty
    assert verdict == {"synthetic / mlp": ["bn: 1 of 2 seeds diverged at batch 2."]}


# ---- no interval without spread, and a bounded recovery -------------------------------------------------


def test_zero_variance_pairs_give_no_plus_minus_zero():
    data = {("bn", 128): [90.0, 90.5, 89.5], ("bn", 2): [70.0] * 3, ("ln", 128): [88.0, 88.5, 87.5],
            ("ln", 2): [88.0] * 3}
    summaries = [fake_run(n, b, s, a) for (n, b), accs in data.items() for s, a in enumerate(accs)]
    runs, summary, degr, verdict = tables(summaries)
    lines = verdict["synthetic / mlp"]
    assert "At batch 2, ln differs from bn by +18.0 points; no spread between seeds, so no interval." in lines
    assert not any("± 0.0" in line or "beats" in line for line in lines)
    assert analysis.pivot(summary).loc[("synthetic", "mlp", "ln"), 2] == "88.0 (no spread)"
    delta = analysis.delta_vs_bn(runs, summary)
    assert math.isnan(one(delta, batch_size=2).delta_ci95)


@pytest.mark.parametrize("gains", [(14.0, 15.0, 16.0), (18.0, 19.5, 20.5), (19.0, 20.0, 21.0), (24.0, 25.0, 26.0),
                                   (30.0, 35.0, 45.0)])
def test_recovery_share_has_an_interval_and_never_exceeds_100_percent(gains):
    lines = tables(bn_drop_runs(with_precise=True, gains=gains))[3]["synthetic / mlp"]
    recovery = lines[-1]
    assert "Recomputed statistics recover" in recovery
    assert "interval" in recovery.split("Recomputed statistics recover")[1]
    percents = [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", recovery)]
    assert percents and all(p <= 100 for p in percents), recovery


def test_recovery_above_the_loss_says_all_of_it():
    recovery = tables(bn_drop_runs(with_precise=True, gains=(24.0, 25.0, 26.0)))[3]["synthetic / mlp"][-1]
    assert recovery.endswith("Recomputed statistics recover all of the 20.0-point loss: even the lower end of "
                             "the 95% interval of the share reaches 100%.")


def test_recovery_capped_at_the_whole_loss():
    recovery = tables(bn_drop_runs(with_precise=True, gains=(18.0, 19.5, 20.5)))[3]["synthetic / mlp"][-1]
    share, lo, hi, _ = analysis.recovered_share([70.0, 70.5, 69.5], [88.0, 90.0, 90.0], [90.0, 90.5, 89.5])
    assert lo < 1 < hi
    assert recovery.endswith(f"recover {100 * share:.0f}% of the 20.0-point loss "
                             f"(95% interval {100 * lo:.0f}% to 100%).")


def test_runs_csv_writes_whole_numbers_that_some_runs_leave_empty_without_a_decimal_point():
    """pandas stores [7, None] as floats; runs.csv says 7, as summary.json does, and leaves the rest as they are."""
    import io

    gn = fake_run("gn", 8, 1, 80.0, status="diverged")  # diverged_step 7; num_groups only in GN's config
    runs = analysis.runs_table([fake_run("bn", 8, 0, 70.0), gn])
    assert runs.diverged_step.dtype == float  # the table itself computes in floats
    written = pd.read_csv(io.StringIO(analysis.as_written(runs).to_csv(index=False)), dtype=str, keep_default_na=False)
    assert sorted(written.diverged_step) == ["", "7"]
    assert sorted(written["config.norm.num_groups"]) == ["", str(gn["config"]["norm"]["num_groups"])]
    assert sorted(written["config.norm.momentum"]) == ["", "0.1"]  # floats stay floats
    assert analysis.as_written(runs.iloc[:0]).empty and analysis.as_written(pd.DataFrame()).empty


def test_runs_table_has_a_column_per_test_time_shift():
    from normbench.analysis import runs_table

    summary = {"run_id": "r", "status": "completed", "final": {"test_acc": 90.0},
               "config": {"seed": 0, "batch_size": 2, "data": {"name": "d"}, "model": {"name": "m"},
                          "norm": {"name": "bn"}, "optim": {"name": "sgd"}},
               "shifts": {"contrast:0.5": {"test_acc": 51.6, "test_acc_adapted": None}}}
    row = runs_table([summary]).iloc[0]
    assert row["test_acc@contrast:0.5"] == 51.6 and np.isnan(row["test_acc_adapted@contrast:0.5"])


def test_a_setting_some_runs_leave_unset_keeps_their_rows(tmp_path):
    """norm_batch_size null (the whole batch) beside set values: those runs stay in every table, shown "-",
    and the set values sort as numbers (pandas' groupby and pivot_table drop missing keys by default)."""
    from conftest import tiny_run_overrides
    from normbench import analysis, results, runner
    from normbench.config import compose

    base = tiny_run_overrides(tmp_path / "r", batch_size=8)
    for extra in (["norm_batch_size=2"], ["norm_batch_size=4"], [], ["batch_size=16"]):
        runner.execute(compose([*base, *extra]))
    summaries, _, _ = results.scan(tmp_path / "r" / "default")
    runs = analysis.runs_table(summaries)
    summary = analysis.summary_table(runs)
    assert len(summary) == 4 and summary.n.sum() == 4
    pivot = analysis.pivot(summary)
    assert [key[2] for key in pivot.index] == ["2", "4", "-"]  # data, model, norm_batch_size, norm
    assert (pivot.loc[pivot.index[2]] != "-").sum() == 2  # the unset row has its batch 8 and 16 cells


def test_a_label_names_an_unset_setting_as_a_config_writes_it():
    iid, grouped = fake_run("bn", 8, 0, 70.0), fake_run("bn", 8, 0, 71.0)
    grouped["config"]["data"]["batch_classes"] = 2
    iid["config"]["data"]["batch_classes"] = None
    assert sorted(analysis.runs_table([iid, grouped]).data) == ["synthetic(batch_classes=2)",
                                                                 "synthetic(batch_classes=null)"]


def test_runs_of_two_versions_of_a_plugin_norm_are_not_pooled():
    """The norm label leaves the plugin's code out (run ids carry it); a table of runs made by two versions of
    the plugin keeps them apart instead of averaging them as seeds of one condition."""
    runs = []
    for source, acc in (("sha256:aaaa", 96.0), ("sha256:bbbb", 10.0)):
        for seed in (0, 1):
            run = fake_run("gn", 64, seed, acc + seed, num_groups=4)
            run["config"]["norm"]["plugin"] = {"name": "mine", "source": source}
            runs.append(run)
    table = analysis.runs_table(runs)
    assert sorted(set(table.norm)) == ["gn(num_groups=4,plugin.source=sha256:aaaa)",
                                       "gn(num_groups=4,plugin.source=sha256:bbbb)"]
    summary = analysis.summary_table(table)
    assert sorted(summary.n) == [2, 2] and sorted(summary.test_acc_mean) == [10.5, 96.5]
    one_version = analysis.runs_table(runs[:2])
    assert set(one_version.norm) == {"gn(num_groups=4)"}
