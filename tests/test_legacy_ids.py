"""Finished runs under their normbench 0.2 run ids (a norm variant named by its norm alone: gn8 was
"cnn-gn-...") are adopted under the labelled id, never trained again and never counted twice."""

from __future__ import annotations

from normbench import results, runner, sweep
from normbench.config import compose, legacy_run_id, run_id

from conftest import tiny_run_overrides


def _finished_under_the_old_name(results_dir):
    cfg = compose(tiny_run_overrides(results_dir, "cnn", "gn", **{"norm.num_groups": 8}))
    old_id = legacy_run_id(cfg)
    assert old_id is not None and old_id != run_id(cfg) and old_id.startswith("cnn-gn-b16-")
    done = runner.execute(cfg)
    old = done.folder.parent / old_id
    done.folder.rename(old)  # as normbench 0.2 left it, its summary naming it by the old id
    results.write_summary(old, {**results.read_summary(old), "run_id": old_id})
    return cfg, old, (old / "metrics.csv").read_bytes()


def test_run_adopts_the_old_folder_instead_of_training(results_dir):
    cfg, old, metrics = _finished_under_the_old_name(results_dir)
    again = runner.execute(cfg)
    assert not again.trained and not old.exists()
    assert again.folder.name == run_id(cfg) and (again.folder / "metrics.csv").read_bytes() == metrics
    summaries, _, warnings = results.scan(again.folder.parent)  # its summary names it by its new id now
    assert [s["run_id"] for s in summaries] == [run_id(cfg)] and not warnings


def test_a_sweep_counts_it_done_and_a_dry_run_moves_nothing(results_dir):
    cfg, old, _ = _finished_under_the_old_name(results_dir)
    args = tiny_run_overrides(results_dir, "cnn", "gn", **{"norm.num_groups": 8})
    planned = sweep.plan(args, dry_run=True)
    assert [p.state for p in planned] == ["completed"] and old.exists()
    outcome = sweep.run(args)
    assert outcome.trained == 0 and not old.exists() and results.run_dir(cfg).exists()


def test_norms_whose_id_never_changed_have_no_legacy_id():
    for overrides in ([], ["model=cnn", "norm=gn"], ["model=cnn", "norm=ln", "batch_size=4"]):
        assert legacy_run_id(compose(overrides)) is None
