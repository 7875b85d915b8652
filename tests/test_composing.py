"""Sweep jobs composed the quick way (one Hydra composition per combination of group choices, the
other overrides set on a copy) give the config, or the error, that a full Hydra composition gives."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from normbench.config import compose
from normbench.errors import UserError
from normbench.sweep.composing import JobComposer, finish
from normbench.sweep.hydra_glue import compose_primary, expand_jobs


def outcome(make):
    """The config `make()` gives, or the message of the UserError it raises."""
    try:
        return make()
    except UserError as e:
        return f"error: {e}"


def both_ways(overrides: list[str], config_dir=None, jobs=None) -> tuple[list, list, dict]:
    """Every job of the sweep (or `jobs`, as given) composed the quick way and by `normbench.config.compose`
    (a full Hydra composition per job), and how many jobs took each quick path."""
    hydra, primary = compose_primary(overrides, config_dir)
    try:
        composer = JobComposer(hydra, primary)
        jobs = jobs or expand_jobs(hydra, primary)
        quick = [outcome(lambda: finish(composer.compose(job))) for job in jobs]
    finally:
        GlobalHydra.instance().clear()
    full = [outcome(lambda: compose(job, config_dir)) for job in jobs]
    return quick, full, composer.counts


def test_group_choices_scalars_nested_keys_and_enums_compose_as_hydra_does(tmp_path):
    quick, full, counts = both_ways([
        "data=synthetic,mnist", "model=mlp,cnn", "norm=bn,gn,frn", "batch_size=4,8", "seed=3",
        "norm.eps=1e-3", "norm.position=pre_act,post_act", "data.root=null", "model.width=7",
        f"results_dir={tmp_path}"])
    assert len(quick) == 2 * 2 * 3 * 2 * 2
    assert quick == full
    assert counts["values"] > 0  # the quick path was taken, for the jobs whose keys exist
    assert any(isinstance(q, str) for q in quick)  # model.width on the CNN: refused the same way both ways


def test_added_deleted_interpolated_and_badly_typed_values_compose_as_hydra_does(tmp_path):
    # the sweeper resolves ${...} in its own overrides; a job's overrides can still hold one (given here)
    jobs = [[norm, groups, "~keep_checkpoint", "eval_batch_size=${batch_size}", batch, shifts,
             f"results_dir={tmp_path}"]
            for norm in ("norm=ln", "norm=gn") for groups in ("++norm.num_groups=2", "++norm.num_groups=4")
            for batch in ("batch_size=8", "batch_size=eight")
            for shifts in ("eval.shifts=[contrast:0.5]", "eval.shifts=[]")]
    quick, full, counts = both_ways([f"results_dir={tmp_path}"], jobs=jobs)
    assert quick == full
    assert counts["overrides"] == len(jobs) and counts["values"] == 0
    missing, _, _ = both_ways([f"results_dir={tmp_path}"], jobs=[["name=???"], ["data.root=???"]])
    assert missing == [outcome(lambda: compose(["name=???"])), outcome(lambda: compose(["data.root=???"]))]
    assert all(isinstance(m, str) for m in missing)
    good = [q for q in quick if not isinstance(q, str)]
    assert {(q.norm.num_groups, q.eval_batch_size, q.batch_size, tuple(q.eval.shifts)) for q in good} == \
        {(g, 8, 8, s) for g in (2, 4) for s in (("contrast:0.5",), ())}
    assert any(isinstance(q, str) and "eight" in q for q in quick)
    assert any(isinstance(q, str) and "unknown key 'norm.num_groups'" in q for q in quick)  # on ln


def test_presets_and_a_user_config_dir_with_interpolations_compose_as_hydra_does(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "tied.yaml").write_text(
        "# @package _global_\neval_batch_size: ${batch_size}\nname: tied\n")
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "gn2.yaml").write_text("defaults:\n  - gn\n  - _self_\nnum_groups: 2\n")
    quick, full, counts = both_ways([
        "experiment=tied,quick", "hydra.sweeper.grids=null", "norm=gn2,ln", "batch_size=2,16", "lr=0.5",
        f"results_dir={tmp_path / 'r'}"], config_dir=tmp_path)
    assert quick == full
    assert counts["values"] > 0 and counts["overrides"] > 0  # quick has no interpolation, tied has one
    tied = [q for q in quick if not isinstance(q, str) and q.name == "tied"]
    assert tied and all(q.eval_batch_size == q.batch_size for q in tied)
    assert {q.norm.num_groups for q in quick if not isinstance(q, str) and q.norm.name == "gn"} == {2}


def test_jobs_do_not_share_their_configs(tmp_path):
    hydra, primary = compose_primary([f"results_dir={tmp_path}", "seed=0,1"])
    try:
        composer = JobComposer(hydra, primary)
        first, second = (finish(composer.compose(job)) for job in expand_jobs(hydra, primary))
    finally:
        GlobalHydra.instance().clear()
    first.norm.eps = 0.5
    first.eval.shifts.append("noise:0.1")
    assert (second.seed, second.norm.eps, second.eval.shifts) == (1, 1e-5, [])


@pytest.mark.parametrize("bad", ["norm=bn,nope", "batch_size=8,eight"])
def test_a_job_hydra_cannot_compose_stops_planning_with_hydras_message(tmp_path, bad):
    from normbench import sweep

    with pytest.raises(UserError) as planned:
        sweep.plan([bad, f"results_dir={tmp_path}"])
    with pytest.raises(UserError) as single:
        compose([bad.split("=")[0] + "=" + bad.split(",")[-1], f"results_dir={tmp_path}"])
    assert str(planned.value) == str(single.value)
