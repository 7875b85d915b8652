"""normbench.analysis.effects: any swept setting's effect on any metric, with Welch or paired intervals and
Holm's correction, on hand-made run summaries (no training)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normbench import analysis
from normbench.analysis import effects as fx
from normbench.analysis.stats import holm, paired_test, welch_test
from tests.test_analysis import fake_run


def _with(run: dict, **config) -> dict:
    for key, value in config.items():
        node = run["config"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return run


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, math.nan, 0.005]
    # sorted: 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> running max
    assert holm(p)[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(holm(p)[3])
    assert holm(p)[4] == pytest.approx(0.02)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 is capped at 1; 0.9 never falls below it
    assert holm([0.04, 0.5]) == [0.08, 0.5]
    assert holm([]) == []


def test_welch_and_paired_tests_are_scipys():
    a, b = [1.0, 2.0, 3.5], [2.0, 3.0, 5.0]
    w = welch_test(a, b)
    assert w.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert w.kind == "welch" and w.n_a == w.n_b == 3
    pt = paired_test(a, b)
    assert pt.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    ci = stats.ttest_rel(a, b).confidence_interval()
    assert pt.effect - pt.ci95 == pytest.approx(ci.low) and pt.effect + pt.ci95 == pytest.approx(ci.high)
    one = welch_test([1.0], [2.0, 3.0])
    assert math.isnan(one.p) and math.isnan(one.ci95) and one.why


def _norm_batch_runs(loss_at_2: float) -> list[dict]:
    """BN at batch 64 with norm_batch_size 2..64 (3 seeds); the statistics of 2 cost `loss_at_2` points."""
    runs = []
    for nbs in (2, 8, 64):
        for seed in range(3):
            acc = 95.0 - (loss_at_2 if nbs == 2 else 0.0) + 0.3 * seed
            runs.append(_with(fake_run("bn", 64, seed, acc), norm_batch_size=nbs))
    return runs


def test_sweep_effects_find_the_normalization_batch():
    runs = analysis.runs_table(_norm_batch_runs(5.0))
    effects = analysis.sweep_effects(runs)
    assert list(effects.factor.unique()) == ["config.norm_batch_size"]
    row = effects.iloc[0]
    assert (row.level_a, row.level_b) == ("2", "64")
    assert row.effect == pytest.approx(-5.0) and row.p < 0.05 and row.p_holm == pytest.approx(row.p)
    words = analysis.factor_verdict(effects)
    assert len(words) == 1 and "norm_batch_size=2 minus at norm_batch_size=64" in words[0]
    assert "-5.0 ±" in words[0]


def test_a_setting_without_effect_is_no_detectable_difference():
    runs = analysis.runs_table([_with(fake_run("bn", 64, s, 95.0 + (0.4 if (s + nbs) % 2 else -0.4)),
                                      norm_batch_size=nbs) for nbs in (2, 64) for s in range(4)])
    words = analysis.factor_verdict(analysis.sweep_effects(runs))
    assert words and "no detectable difference" in words[0]


def test_paired_comparison_uses_the_seeds_both_levels_ran():
    summaries = _norm_batch_runs(1.0)
    runs = analysis.runs_table(summaries)
    paired = fx.factor_effects(runs, "config.norm_batch_size", 2, 64, paired=True)
    welch = fx.factor_effects(runs, "config.norm_batch_size", 2, 64)
    assert paired.iloc[0].test == "paired" and welch.iloc[0].test == "welch"
    # every seed loses exactly 1 point: no spread in the paired differences, so no interval
    assert math.isnan(paired.iloc[0].ci95) and paired.iloc[0].effect == pytest.approx(-1.0)


def test_categorical_levels_and_where():
    summaries = [_with(fake_run(norm, 32, s, 90.0 + (2.0 if pos == "pre_act" else 0.0) + 0.2 * s),
                       **{"norm.position": pos}) for norm in ("bn", "ln") for pos in ("pre_act", "post_act")
                 for s in range(3)]
    runs = analysis.runs_table(summaries)
    assert fx.levels(runs, "config.norm.position") == ["post_act", "pre_act"]
    e = fx.factor_effects(runs, "config.norm.position", "pre_act", "post_act", where={"norm": "bn"})
    assert list(e.norm) == ["bn"] and e.iloc[0].effect == pytest.approx(2.0)
    both = analysis.sweep_effects(runs)
    assert sorted(both.norm) == ["bn", "ln"] and (both.p_holm >= both.p).all()


def test_metric_effects_pair_two_metrics_of_the_same_runs():
    runs = analysis.runs_table([fake_run("bn", 2, s, 80.0 + s, precise=85.0 + s * 1.1) for s in range(3)])
    e = analysis.metric_effects(runs, "test_acc_precise", "test_acc")
    assert e.iloc[0].effect == pytest.approx(np.mean([5.0, 5.1, 5.2])) and e.iloc[0].test == "paired"


def test_gap_is_train_minus_test_accuracy():
    runs = fx.with_derived(analysis.runs_table([fake_run("bn", 32, 0, 90.0)]))
    assert runs.gap.iloc[0] == pytest.approx(5.0)  # fake runs train at 95.0


def test_effects_of_nothing_are_empty():
    runs = analysis.runs_table([fake_run("bn", 32, s, 90.0 + s) for s in range(3)])
    assert analysis.sweep_effects(runs).empty
    assert fx.factor_effects(runs, "config.no_such_key", 1, 2).empty
    assert fx.factor_effects(runs, "batch_size", 32, 64).empty


def test_numeric_levels_match_a_column_that_also_holds_unset_values():
    """norm_batch_size 4 is stored as 4.0 where other runs leave it unset (NaN): 4 still finds it."""
    summaries = [_with(fake_run("bn", 32, s, 90.0 + s), norm_batch_size=4) for s in range(3)]
    summaries += [fake_run("bn", 32, s, 92.0 + s) for s in range(3)]
    runs = analysis.runs_table(summaries)
    runs["config.norm_batch_size"] = runs["config.norm_batch_size"].astype(float)
    e = fx.factor_effects(runs.assign(**{"config.norm_batch_size": runs["config.norm_batch_size"].fillna(32)}),
                          "config.norm_batch_size", 4, 32)
    assert len(e) == 1 and e.iloc[0].effect == pytest.approx(-2.0)


def test_an_unset_normalization_batch_is_the_whole_batch_in_sweep_effects():
    summaries = [_with(fake_run("bn", 64, s, 80.0 + s), norm_batch_size=2) for s in range(3)]
    summaries += [fake_run("bn", 64, s, 90.0 + s) for s in range(3)]  # norm_batch_size null: over all 64
    effects = analysis.sweep_effects(analysis.runs_table(summaries))
    row = effects.iloc[0]
    assert (row.level_a, row.level_b) == ("2", "64") and row.effect == pytest.approx(-10.0)


def test_a_condition_names_whole_numbers_without_a_decimal_point():
    """A setting some runs leave unset is a float column in the runs table; the sentence still says epochs=2."""
    from normbench.analysis.verdict import _condition

    row = pd.Series({"data": "mnist", "model": "mlp", "norm": "bn", "batch_size": 32.0, "config.epochs": 2.0,
                     "config.lr": 0.05})
    assert _condition(row, list(row.index)) == "mnist / mlp / bn, batch 32, epochs=2, lr=0.05"
