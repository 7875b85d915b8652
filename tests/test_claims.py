"""The claims suite: the catalog agrees with its presets, verdicts follow from the numbers (hand-made runs),
and `normbench claims` trains, judges and writes its files end to end (tiny synthetic runs)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import analysis
from normbench.claims import CLAIMS, Check, select
from normbench.claims.judge import judge, outcome
from normbench.claims.suite import claim_overrides, plan
from normbench.cli import app
from normbench.config import to_dict
from normbench.errors import UserError

SYNTHETIC = ["data=synthetic", "data.num_train=512", "data.num_test=256"]


def test_select_names_claims_and_lists_the_valid_ones():
    assert [c.id for c in select(["gn_bridge", "bn_batch"])] == ["bn_batch", "gn_bridge"]  # catalog order
    assert len(select(None)) == len(CLAIMS) >= 15
    with pytest.raises(UserError, match="unknown claim 'nope'; valid: bn_batch, "):
        select(["nope"])


def test_claim_ids_are_unique_and_every_check_is_well_formed():
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)
    for claim in CLAIMS:
        assert claim.statement and claim.source and claim.anchor and claim.setup and claim.checks
        assert all(c.says for c in claim.checks)
    with pytest.raises(ValueError, match="expect"):
        Check("norm", "a", "b", ">=")


def _row(effect, ci95, p, **extra) -> pd.Series:
    return pd.Series({"effect": effect, "ci95": ci95, "p_holm": p, "why": None, "n_a": 4, **extra})


@pytest.mark.parametrize("expect, effect, ci95, p, margin, want", [
    (">", 2.0, 1.0, 0.01, 0, "supported"),
    (">", -2.0, 1.0, 0.01, 0, "contradicted"),
    (">", 2.0, 3.0, 0.2, 0, "not detected"),
    ("<", -2.0, 1.0, 0.01, 0, "supported"),
    (">", 2.0, 1.9, 0.06, 0, "not detected"),  # the raw interval excludes 0, Holm's p does not
    ("=", 0.2, 0.5, 0.5, 1.0, "supported"),
    ("=", 0.2, 2.0, 0.8, 1.0, "inconclusive"),
    ("=", 3.0, 1.0, 0.001, 1.0, "contradicted"),
    ("not_below", -0.5, 0.4, 0.03, 1.0, "supported"),
    ("not_below", 5.0, 1.0, 0.001, 1.0, "supported"),
    ("not_below", -3.0, 1.0, 0.001, 1.0, "contradicted"),
    ("not_below", -1.0, 2.0, 0.4, 1.0, "inconclusive"),
    (">", 2.0, math.nan, math.nan, 0, "inconclusive"),  # one seed: no interval, no test
])
def test_outcome_follows_the_expectation(expect, effect, ci95, p, margin, want):
    check = Check("norm", "a", "b", expect, margin=margin)
    assert outcome(check, _row(effect, ci95, p)) == want


def test_the_same_difference_in_every_seed_is_exact_for_equalities_only():
    from normbench.analysis.stats import NO_SPREAD

    same = _row(0.0, math.nan, math.nan, why=NO_SPREAD)
    assert outcome(Check("norm", "a", "b", "="), same) == "supported"
    assert outcome(Check("norm", "a", "b", "not_below", margin=1.0), same) == "supported"
    assert outcome(Check("norm", "a", "b", "=", margin=0.5), _row(2.0, math.nan, math.nan, why=NO_SPREAD)) \
        == "contradicted"
    assert outcome(Check("norm", "a", "b", ">"), _row(2.0, math.nan, math.nan, why=NO_SPREAD)) == "inconclusive"


# ---- the catalog against its presets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned_claims(tmp_path_factory):
    """Every claim's preset planned on synthetic data (no training): the configs its runs would have."""
    out = tmp_path_factory.mktemp("claims")
    return plan(list(CLAIMS), "small", [*SYNTHETIC, f"results_dir={out}"], dry_run=True)


def _fake_summaries(planned, rng) -> list[dict]:
    """A summary.json per planned run, with made-up numbers for every metric a check may read."""
    summaries = []
    for p in planned:
        config = to_dict(p.cfg)
        shifts = {s: {"test_acc": float(rng.uniform(50, 90)), "test_acc_adapted": float(rng.uniform(50, 90))}
                  for s in config["eval"]["shifts"]}
        final = {"test_acc": float(rng.uniform(80, 95)), "train_acc": float(rng.uniform(90, 99)),
                 "test_acc_precise": float(rng.uniform(80, 95)), "test_acc_batch_stats": float(rng.uniform(50, 95)),
                 "train_loss": 0.3, "test_loss": 0.3}
        summaries.append({"run_id": p.run_id, "status": "completed", "config": config, "final": final,
                          "effective_lr": 0.1, "epochs_completed": 2, "steps": 100, "wall_seconds": 1.0,
                          "best_test_acc": final["test_acc"], "shifts": shifts})
    return summaries


def test_every_check_of_every_claim_finds_runs_in_its_preset(planned_claims):
    """A typo in a level ('gn(num_groups=1)'), a factor or a where clause would leave a check without rows."""
    rng = np.random.default_rng(0)
    assert all(p.state != "invalid" for ps in planned_claims.plans.values() for p in ps), \
        [(p.label, p.error) for ps in planned_claims.plans.values() for p in ps if p.state == "invalid"]
    for claim in CLAIMS:
        runs = analysis.runs_table(_fake_summaries(planned_claims.plans[claim.id], rng))
        probe = {"ics_l2": 1.0, "loss_range": 1.0, "beta_smoothness": 1.0, "residual_ratio": 1.0, "bstats_slope": -0.5}
        runs = runs.assign(**{k: v + rng.normal(0, 0.1, len(runs)) for k, v in probe.items()})
        j = judge(claim, runs)
        assert not j.why.startswith("no finished runs"), f"{claim.id}: {j.why}"
        assert set(j.rows.check) == set(range(len(claim.checks))), claim.id


def test_claims_share_runs_and_keep_every_run_in_one_folder(planned_claims):
    unique = planned_claims.unique
    total = sum(len(ps) for ps in planned_claims.plans.values())
    assert len(unique) < total  # bn_eval reuses bn_batch's runs at batch 2, ...
    assert {p.cfg.name for p in unique} == {"claims"}


def test_paper_scale_changes_the_folder_and_refuses_an_unknown_scale():
    claim = select(["bn_batch"])[0]
    assert "name=claims_paper" in claim_overrides(claim, "paper", [])
    assert claim_overrides(claim, "small", ["data.root=X"]) == ["experiment=claims/bn_batch", "data.root=X"]
    with pytest.raises(UserError, match="--scale must be one of small, paper"):
        claim_overrides(claim, "huge", [])


# ---- end to end ----------------------------------------------------------------------------------------


def test_claims_command_trains_judges_and_writes(tmp_path):
    """gn with one group is LN exactly: the same runs, so every seed's difference is 0 and the check holds."""
    args = ["claims", "gn_bridge", *SYNTHETIC, "data.num_train=128", "data.num_test=64", "epochs=1", "seed=0,1",
            f"results_dir={tmp_path}", "hydra.sweeper.grids=[{norm: 'ln,in'}, {norm: gn, norm.num_groups: '1,16'}]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "claims"
    table = pd.read_csv(folder / "claims.csv")
    assert list(table.claim) == ["gn_bridge"] and table.verdict.iloc[0] in ("supported", "inconclusive")
    checks = pd.read_csv(folder / "claims_checks.csv")
    first = checks[checks.check.str.startswith("gn with 1 group")]
    assert len(first) == 1 and first.effect.iloc[0] == 0 and first.outcome.iloc[0] == "supported"
    assert len(checks) == 2
    md = (folder / "claims.md").read_text()
    assert f"## gn_bridge: {table.verdict.iloc[0]}" in md and "![gn_bridge](claim_gn_bridge.png)" in md
    assert (folder / "claim_gn_bridge.png").exists()
    again = CliRunner().invoke(app, args)  # resumes: nothing to train, the same verdict
    assert again.exit_code == 0 and table.verdict.iloc[0] in again.output
    assert pd.read_csv(folder / "claims_checks.csv").equals(checks)


def test_claims_dry_run_and_list(tmp_path):
    listed = CliRunner().invoke(app, ["claims", "--list"])
    assert listed.exit_code == 0 and all(c.id in listed.output for c in CLAIMS)
    dry = CliRunner().invoke(app, ["claims", "bn_eval", "ln_online", *SYNTHETIC, f"results_dir={tmp_path}",
                                   "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "distinct runs (claims share some)" in dry.output and not (tmp_path / "claims").exists()
    jobs = CliRunner().invoke(app, ["claims", "bn_eval", *SYNTHETIC, f"results_dir={tmp_path}", "--dry-run",
                                    "--jobs", "2"], env={"NORMBENCH_WORKER_START_SECONDS": "3600"})
    assert jobs.exit_code == 0 and "too little to pay for starting 1 more worker process" in jobs.output
    bad = CliRunner().invoke(app, ["claims", "bn_eval", *SYNTHETIC, f"results_dir={tmp_path}", "--dry-run"],
                             env={"NORMBENCH_WORKER_START_SECONDS": "soon"})
    assert bad.exit_code == 2 and bad.output.startswith("error: NORMBENCH_WORKER_START_SECONDS must be a number")
    launcher = CliRunner().invoke(app, ["claims", "bn_eval", *SYNTHETIC, f"results_dir={tmp_path}", "--dry-run",
                                        "--jobs", "2", "hydra/launcher=submitit_local"])
    assert launcher.exit_code == 2 and "--jobs runs processes on this machine" in launcher.output


def test_claims_user_errors_are_one_line(tmp_path):
    for args in (["claims", "nope"], ["claims", "bn_eval", "--scale", "huge", f"results_dir={tmp_path}"],
                 ["claims", "bn_eval", "no_such_key=1", f"results_dir={tmp_path}"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
    scale = CliRunner().invoke(app, ["claims", "--scale", "huge", f"results_dir={tmp_path}"])
    assert scale.output == "error: --scale must be one of small, paper, got 'huge'\n"  # no claim's name before it


def test_probe_metrics_reach_the_judge(tmp_path):
    """batch_noise reads the batch-statistics probe's tables: its check gets a slope from every run."""
    args = ["claims", "batch_noise", *SYNTHETIC, "data.num_train=256", "data.num_test=64", "epochs=1",
            "model.width=16", "seed=0,1", "probes.batch_stats.every=4", "probes.batch_stats.samples=128",
            "probes.batch_stats.sizes=[2,4,8,16]", f"results_dir={tmp_path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    checks = pd.read_csv(tmp_path / "claims" / "claims_checks.csv")
    assert list(checks.test) == ["one-sample"] and checks.n_a.iloc[0] == 2
    assert -1.0 < checks.effect.iloc[0] + -0.5 < 0.0  # a slope between -1 and 0, as a batch mean's error has


def test_claims_go_through_another_launcher(tmp_path):
    """With hydra/launcher=submitit_local each claim's sweep is handed to the launcher, and judged the same."""
    args = ["claims", "bn_eval", *SYNTHETIC, "data.num_train=64", "data.num_test=32", "epochs=1", "model.width=8",
            "seed=0,1", f"results_dir={tmp_path}", "hydra/launcher=submitit_local"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "claims" / "claims.csv")
    assert list(table.claim) == ["bn_eval"] and table.verdict.iloc[0] in ("supported", "contradicted",
                                                                           "not detected", "inconclusive")
    assert len(list((tmp_path / "claims").glob("mlp-bn-b2-s*"))) == 2
    jobs = CliRunner().invoke(app, [*args, "--jobs", "2"])
    assert jobs.exit_code == 2 and "--jobs runs processes on this machine" in jobs.output


def test_an_override_that_removes_a_compared_side_stops_before_training(tmp_path):
    """bn_eval compares runs at batch 2: batch_size=4 leaves nothing to compare, so nothing is trained."""
    args = ["claims", "bn_eval", *SYNTHETIC, "batch_size=4", f"results_dir={tmp_path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "claim bn_eval: with these overrides no planned runs can make the comparison" \
        in result.output, result.output
    assert not list((tmp_path / "claims").glob("mlp-*")) if (tmp_path / "claims").exists() else True
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 1 and "no planned runs can make the comparison" in dry.output


@pytest.mark.parametrize("flags", [["--dry-run"], ["--dry-run", "--jobs", "2"], ["--jobs", "2"], []])
def test_a_composition_error_names_its_claim_and_the_key(tmp_path, flags):
    result = CliRunner().invoke(app, ["claims", "gn_bridge", "bn_eval", *SYNTHETIC, "model.channels=[4,4,4]",
                                      f"results_dir={tmp_path}", *flags])
    assert result.exit_code == 2 and result.output.startswith("error: claim bn_eval: unknown key 'model.channels'")
    assert not (tmp_path / "claims").exists() or not any((tmp_path / "claims").iterdir())


def test_an_override_without_a_value_gets_a_hint():
    with pytest.raises(UserError, match=r"unknown claim 'epochs' \(overrides are written KEY=VALUE\)"):
        select(["epochs"])


def test_every_claim_composes_at_paper_scale(tmp_path):
    """The paper-scale overrides fit each preset (gn_bridge's CNN channels once met resnet20's schema)."""
    outcome = plan(list(CLAIMS), "paper", ["data=synthetic", "data.shape=[1,28,28]", "data.num_train=256",
                                            "data.num_test=64", f"results_dir={tmp_path}"], dry_run=True)
    bad = [(cid, p.error) for cid, ps in outcome.plans.items() for p in ps if p.state == "invalid"]
    assert not bad, bad[:3]
    assert not outcome.uncovered and {p.cfg.name for p in outcome.unique} == {"claims_paper"}


@pytest.mark.parametrize("command", ["sweep", "claims"])
@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_below_one_is_one_line(command, jobs, tmp_path):
    result = CliRunner().invoke(app, [command, "data=synthetic", f"results_dir={tmp_path}", "--jobs", jobs])
    assert result.exit_code == 2 and result.output == f"error: --jobs must be a whole number, at least 1, got {jobs}\n"
