"""Sweeps: Hydra's multirun internals, expansion and validation, resume, failures, the CLI, --jobs.

Every sweep here is tiny (synthetic data, a 16-unit MLP, one epoch of 64 samples) and writes under tmp_path.
"""

from __future__ import annotations

import inspect
import itertools
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from typer.testing import CliRunner

import normbench.runner
from normbench import results, sweep
from normbench.sweep import hydra_glue, workers
from normbench.cli import app
from normbench.config import compose, run_id
from normbench.errors import UserError

from conftest import one_error_line, write_idx_dataset

TINY = ["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=16", "epochs=1",
        "eval.precise_bn_samples=64", "device=cpu"]


def tiny(results_dir: Path, *sweep_args: str) -> list[str]:
    return [*TINY, *sweep_args, f"results_dir={results_dir}"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # Rich reads it on every print: no wrapped run ids


@pytest.fixture
def trained(monkeypatch) -> list[str]:
    """Run ids of every training started (sweep.train_job imports runner.execute at call time); a run whose
    folder already held a finished result is not trained, so not counted."""
    calls: list[str] = []
    real = normbench.runner.execute

    def counting(cfg, progress=None, **kwargs):
        calls.append(run_id(cfg))
        try:
            result = real(cfg, progress, **kwargs)
        except BaseException:
            raise
        if not result.trained:
            calls.pop()
        return result

    monkeypatch.setattr(normbench.runner, "execute", counting)
    return calls


def set_status(folder: Path, status: str) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    summary["status"] = status
    (folder / "summary.json").write_text(json.dumps(summary))


def run_folders(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if experiment.is_dir() else []


# ---- the Hydra internals normbench relies on -------------------------------------------------------------


def test_hydra_internals_have_the_expected_signatures():
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    assert hydra_glue.Hydra is Hydra and hydra_glue.create_config_search_path is create_config_search_path
    create = inspect.signature(Hydra.create_main_hydra2)  # classmethod: cls is bound
    assert list(create.parameters) == ["task_name", "config_search_path"]
    multirun = inspect.signature(Hydra.multirun)
    assert list(multirun.parameters)[:4] == ["self", "config_name", "task_function", "overrides"]
    assert all(p.default is not inspect.Parameter.empty for p in list(multirun.parameters.values())[4:])
    compose_config = inspect.signature(Hydra.compose_config)
    assert list(compose_config.parameters)[:4] == ["self", "config_name", "overrides", "run_mode"]
    from hydra.types import RunMode

    assert hydra_glue.RunMode is RunMode and RunMode.MULTIRUN
    search = inspect.signature(create_config_search_path)
    assert list(search.parameters) == ["search_path_dir"]
    # what hydra_multirun reads back from the jobs
    from hydra.core.utils import JobReturn

    assert isinstance(inspect.getattr_static(JobReturn, "return_value"), property)
    # what the grids sweeper plugin builds on
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    assert list(inspect.signature(BasicSweeper.split_arguments).parameters) == ["overrides", "max_batch_size"]
    assert {"get_job_batch", "is_done", "setup"} <= set(dir(BasicSweeper))
    # what planning composes jobs with (normbench/sweep/composing.py)
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    assert hydra_glue.ConfigLoaderImpl is ConfigLoaderImpl
    assert list(inspect.signature(ConfigLoaderImpl._apply_overrides_to_config).parameters) == ["overrides", "cfg"]
    assert list(inspect.signature(ConfigLoaderImpl._parse_overrides_and_create_caching_repo).parameters) == \
        ["self", "config_name", "overrides"]
    assert list(inspect.signature(ConfigLoaderImpl.load_sweep_config).parameters) == \
        ["self", "master_config", "sweep_overrides"]


def _seed_and_batch(dict_cfg):
    from hydra.core.hydra_config import HydraConfig

    return int(dict_cfg.seed), int(dict_cfg.batch_size), int(HydraConfig.get().job.num)


def test_hydra_multirun_returns_every_job_in_order(tmp_path):
    out = sweep.hydra_multirun(["seed=7,3", "batch_size=5", f"results_dir={tmp_path}", "hydra/launcher=basic"],
                               _seed_and_batch)
    assert out == [(7, 5, 0), (3, 5, 1)]
    assert not GlobalHydra.instance().is_initialized()
    assert (tmp_path / "default" / ".hydra" / "multirun.yaml").is_file()  # Hydra's files stay in the experiment


def test_hydra_multirun_turns_hydra_errors_into_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown norm 'nope'; valid: .*bn.*ln"):
        sweep.hydra_multirun(["norm=bn,nope", f"results_dir={tmp_path}"], _seed_and_batch)
    assert not GlobalHydra.instance().is_initialized()


# ---- expansion and validation ----------------------------------------------------------------------------


def test_plan_expands_the_grid(tmp_path, trained):
    planned = sweep.plan(tiny(tmp_path, "norm=bn,ln", "batch_size=4,8", "seed=0,1"))
    assert len(planned) == 8
    assert [p.state for p in planned] == ["new"] * 8
    assert all(p.error is None for p in planned)
    combos = [(p.cfg.norm.name, p.cfg.batch_size, p.cfg.seed) for p in planned]
    assert combos == list(itertools.product(["bn", "ln"], [4, 8], [0, 1]))
    ids = [run_id(p.cfg) for p in planned]
    assert len(set(ids)) == 8
    assert all(p.cfg.model.width == 16 and p.cfg.data.num_train == 64 for p in planned)
    assert "norm=ln" in planned[4].overrides and "batch_size=4" in planned[4].overrides
    assert trained == [] and run_folders(tmp_path / "default") == []


def test_plan_marks_invalid_combinations_and_goes_on(tmp_path):
    planned = sweep.plan(tiny(tmp_path, "norm=in,bn", "seed=range(2)"))
    assert [(p.state, p.cfg.seed if p.cfg else None) for p in planned] == \
        [("invalid", None), ("invalid", None), ("new", 0), ("new", 1)]
    for p in planned[:2]:
        assert p.cfg is None
        assert "instance norm" in p.error and "model=cnn" in p.error
        assert "norm=in" in p.label
    assert [[o for o in p.overrides if o.startswith("seed=")] for p in planned] == \
        [["seed=0"], ["seed=1"], ["seed=0"], ["seed=1"]]
    assert planned[2].cfg.norm.name == "bn" and planned[2].error is None


def test_plan_marks_a_batch_larger_than_the_data_invalid(tmp_path):
    planned = sweep.plan(tiny(tmp_path, "batch_size=16,128"))
    assert [p.state for p in planned] == ["new", "invalid"]
    assert "larger than the training set (64 samples)" in planned[1].error


def test_quick_preset_expands_to_the_documented_grid(tmp_path):
    """MLP: 4 norms x 7 batch sizes, CNN: 2 norms x 3 batch sizes, 3 seeds each."""
    jobs = sweep.expand(["experiment=quick", f"results_dir={tmp_path}"])
    assert len(jobs) == 102

    def value(job, key):
        return next(o.split("=", 1)[1] for o in job if o.startswith(f"{key}="))

    grid = [(value(j, "model"), value(j, "norm"), int(value(j, "batch_size")), int(value(j, "seed"))) for j in jobs]
    assert len(set(grid)) == 102
    assert set(grid) == (set(itertools.product(["mlp"], ["bn", "ln", "gn", "none"], [2, 4, 8, 16, 32, 64, 128],
                                               [0, 1, 2]))
                         | set(itertools.product(["cnn"], ["bn", "gn"], [2, 8, 32], [0, 1, 2])))


def test_grids_sweeper_runs_the_union_once_and_the_command_line_wins(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "g.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: grids\n"
        "hydra:\n  sweeper:\n    params:\n      seed: 0,1\n    grids:\n"
        "      - {norm: 'bn,ln', batch_size: '2,4'}\n"
        "      - {norm: 'ln,gn', batch_size: '4'}\n")
    base = ["experiment=g", f"results_dir={tmp_path / 'r'}"]
    jobs = sweep.expand(base, config_dir=tmp_path)
    keys = {tuple(sorted(o for o in j if o.split("=")[0] in ("norm", "batch_size", "seed"))) for j in jobs}
    # (bn, ln) x (2, 4) plus (ln, gn) x 4: 4 + 2 conditions, (ln, 4) shared once; x 2 seeds
    assert len(jobs) == 10 == len(keys)
    narrowed = sweep.expand(base + ["seed=7"], config_dir=tmp_path)
    assert len(narrowed) == 5 and all("seed=7" in j for j in narrowed)


def test_submitit_local_launcher_runs_the_sweep(tmp_path):
    """submitit_local: the stand-in for SLURM job arrays (same launcher plugin family)."""
    from typer.testing import CliRunner

    from normbench.cli import app

    result = CliRunner().invoke(app, ["sweep", "data=synthetic", "data.num_train=64", "data.num_test=32",
                                      "model=mlp", "model.width=16", "norm=bn,ln", "batch_size=16", "epochs=1",
                                      "hydra/launcher=submitit_local", f"results_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    summaries = [results.read_summary(p) for p in (tmp_path / "default").iterdir() if p.name.startswith("mlp")]
    assert sorted(s["config"]["norm"]["name"] for s in summaries) == ["bn", "ln"]
    assert all(s["status"] == "completed" for s in summaries)


def test_slurm_launcher_preset_composes_with_its_knobs(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="normbench.conf", version_base="1.3"):
        cfg = hydra_compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                       "hydra.launcher.gpus_per_node=2"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 2, 64)
    assert {"cpus_per_task", "mem_gb", "timeout_min"} <= set(launcher)


def test_invalid_jobs_are_not_counted_as_trained(tmp_path):
    outcome = sweep.run(["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=16",
                         "norm=ln,in", "batch_size=16", "epochs=1", f"results_dir={tmp_path}"])
    assert outcome.trained == 1
    assert [what for what, _ in outcome.failures] == [p.label for p in outcome.planned if p.state == "invalid"]


def test_experiment_presets_set_their_top_level_keys(tmp_path):
    quick = compose(["experiment=quick"])
    assert (quick.name, quick.epochs, quick.lr, quick.eval.precise_bn_samples) == ("quick", 2, 0.05, 1000)
    assert quick.eval.every_epoch is False
    paper = compose(["experiment=ln_paper"])
    assert (paper.name, paper.lr, paper.lr_scaling.value) == ("ln_paper", 1e-3, "none")
    rnn = compose(["experiment=rnn"])
    assert (rnn.name, rnn.epochs, rnn.lr_scaling.value) == ("rnn", 5, "sqrt")
    assert compose(["experiment=quick", "epochs=5"]).epochs == 5  # the command line still wins
    planned = sweep.plan(["experiment=quick", "model=mlp", "norm=ln", "batch_size=2", "seed=0", "data=synthetic",
                          "hydra.sweeper.grids=null", f"results_dir={tmp_path}"])
    assert len(planned) == 1 and results.run_dir(planned[0].cfg).parent == tmp_path / "quick"


def test_quick_preset_composes_against_mnist_files(tmp_path):
    """A slice of the preset, really composed and validated, on tiny MNIST idx files."""
    import os

    write_idx_dataset(Path(os.environ["NORMBENCH_DATA_DIR"]), n_train=100, n_test=20)
    planned = sweep.plan(["experiment=quick", "hydra.sweeper.grids=null", "model=mlp", "norm=ln",
                          "batch_size=2,128", "seed=1", f"results_dir={tmp_path}"])
    assert [p.state for p in planned] == ["new", "invalid"]
    cfg = planned[0].cfg
    assert (cfg.data.name, cfg.data.train_size, cfg.optim.name) == ("mnist", 4000, "sgd")
    assert (cfg.model.name, cfg.norm.name, cfg.batch_size, cfg.seed) == ("mlp", "ln", 2, 1)
    assert "larger than the training set (100 samples)" in planned[1].error


# ---- resume ----------------------------------------------------------------------------------------------


def test_jobs_that_differ_only_outside_the_run_id_train_one_run_once(tmp_path, trained):
    """threads is not part of the run id: threads=1,2 plans one run, trains it once (for threads=1), says so,
    and the sweep's record lists it once."""
    args = tiny(tmp_path, "norm=bn,ln", "threads=1,2")
    planned = sweep.plan(args)
    assert [p.state for p in planned] == ["new", "duplicate", "new", "duplicate"]
    assert "threads=2 is the same run as threads=1 (threads is not part of the run id)" in planned[1].error
    result = CliRunner().invoke(app, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert len(trained) == 2 == len(set(trained))
    assert "(2 jobs)" in result.output and "2 the same run as an earlier job; trained 2" in result.output
    record = json.loads((tmp_path / "default" / "sweeps.json").read_text())[-1]
    assert sorted(record["runs"]) == sorted(trained)
    assert {results.read_summary(f)["threads"] for f in run_folders(tmp_path / "default")} == {1}
    dry = CliRunner().invoke(app, ["sweep", "--dry-run", *args])
    assert dry.exit_code == 0 and "4 runs: 0 to train, 2 already done" in dry.output
    # values that mean the same: a normalization batch equal to the SGD batch is BN over the whole batch
    same = sweep.plan(tiny(tmp_path, "batch_size=16", "norm_batch_size=null,16"))
    assert [p.state for p in same] == ["new", "duplicate"]
    assert same[1].error == ("norm_batch_size=16 is the same run as norm_batch_size=null (the same config once its "
                             "values are resolved): trained once")


def test_resume_skips_finished_runs(tmp_path, trained):
    args = tiny(tmp_path, "norm=bn,ln")
    first = sweep.run(args)
    assert first.trained == 2 and len(trained) == 2 and first.failures == []
    folders = run_folders(tmp_path / "default")
    assert [f.name for f in folders] == sorted(trained)
    assert all(results.read_summary(f)["status"] == "completed" for f in folders)

    again = sweep.run(args)
    assert again.trained == 0 and len(trained) == 2
    assert again.outcomes == []  # nothing to train: no training pass at all
    assert [p.state for p in again.planned] == ["completed", "completed"]

    dry = CliRunner().invoke(app, ["sweep", "--dry-run", *args])
    assert dry.exit_code == 0, dry.output
    assert "2 runs: 0 to train, 2 already done, 0 failed, 0 invalid" in dry.output

    bn = next(f for f in folders if "-bn-" in f.name)
    ln = next(f for f in folders if "-ln-" in f.name)
    set_status(bn, "running")  # killed mid-run
    assert [p.state for p in sweep.plan(args)] == ["running", "completed"]
    trained.clear()
    assert sweep.run(args).trained == 1 and trained == [bn.name]
    assert results.read_summary(bn)["status"] == "completed"

    set_status(bn, "failed")
    set_status(ln, "diverged")
    assert [p.state for p in sweep.plan(args)] == ["failed", "diverged"]
    trained.clear()
    skipped = sweep.run(args)
    assert skipped.trained == 0 and trained == []
    retried = sweep.run(args, retry_failed=True)
    assert retried.trained == 2 and sorted(trained) == sorted([bn.name, ln.name])
    assert retried.failures == []
    assert [results.read_summary(f)["status"] for f in (bn, ln)] == ["completed", "completed"]


def test_resume_ignores_a_folder_of_another_config(tmp_path, trained):
    args = tiny(tmp_path, "norm=bn")
    sweep.run(args)
    (folder,) = run_folders(tmp_path / "default")
    summary = json.loads((folder / "summary.json").read_text())
    summary["config_hash"] = "0" * 12  # same folder name, different settings: not this run
    (folder / "summary.json").write_text(json.dumps(summary))
    assert [p.state for p in sweep.plan(args)] == ["damaged"]  # not this run's result: trained again
    (folder / "summary.json").write_text("{ not json")
    assert [p.state for p in sweep.plan(args)] == ["damaged"]
    trained.clear()
    assert sweep.run(args).trained == 1 and trained == [folder.name]
    kept = folder.with_name(f".{folder.name}.damaged-1")
    assert (kept / "summary.json").read_text() == "{ not json"  # kept aside, not trained over


def test_interrupted_sweep_resumes_only_unfinished_runs(tmp_path, monkeypatch, trained):
    real_fit = normbench.runner.fit
    fits = []

    def fit_then_killed(cfg, model, data, progress=None, **kwargs):
        fits.append(run_id(cfg))
        result = real_fit(cfg, model, data, progress, **kwargs)  # metrics.csv is on disk ...
        if len(fits) == 3:
            raise KeyboardInterrupt  # ... but the summary still says running
        return result

    monkeypatch.setattr(normbench.runner, "fit", fit_then_killed)
    args = tiny(tmp_path, "norm=bn,ln", "seed=0,1")
    with pytest.raises(KeyboardInterrupt):
        sweep.run(args)
    assert len(trained) == 3
    experiment = tmp_path / "default"
    killed = experiment / trained[2]
    assert results.read_summary(killed)["status"] == "running"
    assert len(results.read_metrics(killed)) == 1  # complete-looking metrics, unfinished run

    summaries, curves, warnings = results.scan(experiment)
    assert sorted(s["run_id"] for s in summaries) == sorted(trained[:2])
    assert trained[2] not in curves and warnings == []

    planned = sweep.plan(args)
    assert [p.state for p in planned] == ["completed", "completed", "running", "new"]
    never_started = run_id(planned[3].cfg)
    trained.clear()
    outcome = sweep.run(args)
    assert trained == [killed.name, never_started]
    assert outcome.trained == 2 and outcome.failures == []
    summaries, _, warnings = results.scan(experiment)
    assert len(summaries) == 4 and warnings == []
    assert {s["status"] for s in summaries} == {"completed"}


# ---- failures --------------------------------------------------------------------------------------------


@pytest.fixture
def ln_fails(monkeypatch):
    real_fit = normbench.runner.fit

    def fit(cfg, model, data, progress=None, **kwargs):
        if cfg.norm.name == "ln":
            raise RuntimeError("injected failure in ln")
        return real_fit(cfg, model, data, progress, **kwargs)

    monkeypatch.setattr(normbench.runner, "fit", fit)
    return real_fit


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, ln_fails, trained):
    outcome = sweep.run(tiny(tmp_path, "norm=ln,bn", "seed=0,1"))
    assert len(trained) == 4 and outcome.trained == 4
    ln_ids = [r for r in trained if "-ln-" in r]
    assert len(ln_ids) == 2
    assert outcome.failures == [(r, "RuntimeError: injected failure in ln") for r in ln_ids]
    assert [o["status"] for o in outcome.outcomes] == ["failed", "failed", "completed", "completed"]
    for rid in ln_ids:
        summary = results.read_summary(tmp_path / "default" / rid)
        assert summary["status"] == "failed"
        assert summary["error"] == "RuntimeError: injected failure in ln"
        assert "injected failure in ln" in summary["traceback"]
        assert summary["final"] is None and summary["finished_at"]
    summaries, _, warnings = results.scan(tmp_path / "default")
    assert sorted(s["status"] for s in summaries) == ["completed", "completed", "failed", "failed"]


def test_a_failure_left_from_an_earlier_sweep_is_still_reported(tmp_path, ln_fails):
    args = tiny(tmp_path, "norm=ln")
    first = sweep.run(args)
    assert len(first.failures) == 1
    rid = first.failures[0][0]
    again = sweep.run(args)  # same command, nothing new to train
    assert [p.state for p in again.planned] == ["failed"]
    assert [what for what, _ in again.failures] == [rid]


def test_cli_sweep_reports_failures_with_a_nonzero_exit(tmp_path, ln_fails, monkeypatch):
    args = tiny(tmp_path, "norm=bn,ln")
    result = CliRunner().invoke(app, ["sweep", *args])
    assert result.exit_code == 1, result.output
    ln_id = next(p.name for p in run_folders(tmp_path / "default") if "-ln-" in p.name)
    assert "without a result (failed or invalid): 1" in result.output
    assert f"{ln_id}: RuntimeError: injected failure in ln" in result.output
    assert "trained 1, 1 failed" in result.output  # a failed run is not counted as trained
    experiment = tmp_path / "default"
    assert (experiment / "report.md").is_file()  # the report is still built from the run that worked
    assert json.loads((experiment / "sweeps.json").read_text())[-1]["failed"] == 1

    monkeypatch.setattr(normbench.runner, "fit", ln_fails)  # fixed: retrying trains it again
    result = CliRunner().invoke(app, ["sweep", "--retry-failed", *args])
    assert result.exit_code == 0, result.output
    assert results.read_summary(experiment / ln_id)["status"] == "completed"
    assert "trained 1" in result.output


# ---- --dry-run -------------------------------------------------------------------------------------------


def test_dry_run_lists_runs_and_trains_nothing(tmp_path, trained):
    args = tiny(tmp_path, "norm=bn,ln", "seed=0,1")
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    assert "4 runs: 4 to train, 0 already done, 0 failed, 0 invalid" in result.output
    for p in sweep.plan(args):
        assert run_id(p.cfg) in result.output
    assert "norm=ln seed=1" in result.output  # the varying overrides of each run
    assert trained == []
    assert run_folders(tmp_path / "default") == []


def test_dry_run_with_an_invalid_combination_exits_1(tmp_path, trained):
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *tiny(tmp_path, "norm=bn,in")])
    assert result.exit_code == 1, result.output
    assert "invalid (1)" in result.output
    assert "(1) 1 run: norm 'in' (instance norm) is undefined on flat features" in result.output
    assert "2 runs: 1 to train, 0 already done, 0 failed, 1 invalid" in result.output
    assert trained == [] and run_folders(tmp_path / "default") == []


def test_a_sweep_of_only_invalid_jobs_is_one_user_error_and_writes_nothing(tmp_path, trained):
    result = CliRunner().invoke(app, ["sweep", *tiny(tmp_path, "norm=in,frn", "seed=0,1")])
    line = one_error_line(result, "every job is invalid (4); 2 jobs (", "norm 'in' (instance norm) is undefined",
                          "; 1 other reason: the same command with --dry-run lists each")
    assert "frn" not in line.split(": norm 'in'")[1]  # the other reason is counted, not printed
    assert trained == [] and (not tmp_path.exists() or not any(tmp_path.iterdir()))


def test_dry_run_names_each_cause_of_invalid_jobs_once(tmp_path, trained):
    """Twelve jobs invalid for one reason: one numbered line with the reason, not twelve copies."""
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *tiny(tmp_path, "norm=bn,in", "seed=range(12)")])
    assert result.exit_code == 1, result.output
    assert result.output.count("is undefined on flat features") == 1
    assert "(1) 12 runs: norm 'in' (instance norm) is undefined on flat features" in result.output
    assert result.output.count("invalid (1)") == 12


# ---- --jobs: worker processes ------------------------------------------------------------------------------


def test_jobs_2_trains_every_run_in_worker_processes_with_the_sequential_results(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("NORMBENCH_WORKER_START_SECONDS", "0")  # tiny runs: workers even where they do not pay
    started = []
    real = sweep.Workers.__init__
    monkeypatch.setattr(sweep.Workers, "__init__", lambda self, *a, **k: started.append(1) or real(self, *a, **k))

    args = ["norm=bn,ln", "seed=0,1", "batch_size=8"]
    outcome = sweep.run(tiny(tmp_path / "par", *args), jobs=2)
    assert [o["status"] for o in outcome.outcomes] == ["completed"] * 4
    assert outcome.trained == 4 and outcome.failures == [] and started == [1]  # in worker processes
    folders = run_folders(tmp_path / "par" / "default")
    assert [f.name for f in folders] == sorted(o["run_id"] for o in outcome.outcomes)
    assert {results.read_summary(f)["threads"] for f in folders} == {1}  # tiny steps: one thread (threads.py)

    previous = torch.get_num_threads()
    try:
        sequential = sweep.run(tiny(tmp_path / "seq", *args))  # each run sets its own thread count
    finally:
        torch.set_num_threads(previous)
    assert sequential.trained == 4
    for folder in folders:  # same runs, same numbers, whichever process trained them
        twin = tmp_path / "seq" / "default" / folder.name
        columns = ["epoch", "train_loss", "test_acc", "test_acc_batch_stats", "test_acc_precise"]
        assert results.read_metrics(folder)[columns].equals(results.read_metrics(twin)[columns])

    again = sweep.run(tiny(tmp_path / "par", *args), jobs=2)  # resumes like a sequential sweep: all done
    assert again.trained == 0 and again.outcomes == []


def _dies_on_ln(cfg, retry_failed):
    """A worker's train function that kills its process on ln runs (as an out-of-memory kill would)."""
    if cfg.norm.name == "ln":
        os._exit(3)
    return workers._worker_train(cfg, retry_failed)


def _start_time(cfg, retry_failed):
    return {"run_id": run_id(cfg), "status": "completed", "error": None, "started": time.time()}


def test_a_worker_that_dies_fails_its_run_and_the_sweep_goes_on(tmp_path):
    planned = sweep.plan(tiny(tmp_path, "norm=bn,ln,none"))
    with sweep.Workers(1, train=_dies_on_ln) as workers:
        for p in planned:
            workers.offer(p)
        outcomes = workers.join()
    assert [o["status"] for o in outcomes] == ["completed", "failed", "completed"]
    assert "worker process died" in outcomes[1]["error"] and "again to resume" in outcomes[1]["error"]
    assert results.read_summary(results.run_dir(planned[2].cfg))["status"] == "completed"  # on a fresh worker


def test_workers_start_the_costliest_waiting_run_first(tmp_path):
    planned = sweep.plan(tiny(tmp_path, "seed=0,1,2,3,4"))
    for p, cost in zip(planned, [1, 5, 2, 4, 3]):
        p.cost = cost
    with sweep.Workers(1, train=_start_time) as workers:
        for p in planned:
            workers.offer(p)
        outcomes = workers.join()
    assert [o["run_id"] for o in outcomes] == [run_id(p.cfg) for p in planned]  # in the order offered
    by_start = [p.cost for _, p in sorted(zip((o["started"] for o in outcomes), planned), key=lambda t: t[0])]
    assert by_start[1:] == sorted(by_start[1:], reverse=True)  # the first may start before the rest arrive


def test_workers_skip_runs_that_need_no_training(tmp_path):
    planned = sweep.plan(tiny(tmp_path, "norm=bn,in"))
    planned[0].state = "completed"
    with sweep.Workers(2, train=_start_time) as workers:
        for p in planned:
            workers.offer(p)
        assert workers.join() == []


def test_each_worker_keeps_to_its_own_gpu(tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(workers, "train_job", lambda cfg, retry_failed: seen.append(cfg.device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for slot in range(3):
        monkeypatch.setattr(workers, "_worker_slot", slot)
        workers._worker_train(compose(tiny(tmp_path) + ["device=auto"]), False)
    workers._worker_train(compose(tiny(tmp_path)), False)
    assert seen == ["cuda:0", "cuda:1", "cuda:0", "cpu"]  # an explicit device is left alone


def test_jobs_with_another_hydra_launcher_is_refused(tmp_path):
    assert sweep.configured_launcher(tiny(tmp_path)) == "basic"
    assert sweep.configured_launcher(tiny(tmp_path) + ["hydra/launcher=submitit_local"]) == "submitit_local"
    with pytest.raises(UserError, match="--jobs runs processes on this machine; with hydra/launcher=submitit_local"):
        sweep.run(tiny(tmp_path) + ["hydra/launcher=submitit_local"], jobs=2)


@pytest.mark.parametrize("bad", ["norm=bn,nope", "batch_size=8,eight"])
def test_a_bad_value_in_a_parallel_sweep_stops_it_with_no_worker_left(tmp_path, bad):
    with pytest.raises(UserError, match="nope|eight"):
        sweep.run(tiny(tmp_path, bad), jobs=2)
    assert multiprocessing.active_children() == []


def test_the_terminal_display_counts_planned_runs_then_shows_the_sweep(tmp_path):
    import io

    from rich.console import Console

    from normbench.progress import SweepDisplay

    planned = sweep.plan(tiny(tmp_path, "norm=bn,ln"))
    with SweepDisplay(Console(file=io.StringIO(), force_terminal=True, width=120)) as display:
        for p in planned:
            display.planned(p)
        (task,) = display.bar.tasks
        assert (task.description, task.completed) == ("planning", 2)
        display.start_sweep(planned, retry_failed=False)
        assert [t.description for t in display.bar.tasks] == ["sweep"]
    with SweepDisplay(Console(file=io.StringIO(), force_terminal=False)) as plain:
        plain.planned(planned[0])  # off a terminal: no line per planned run
        assert plain.out.file.getvalue() == ""


# ---- launchers: every documented knob reaches the launcher ---------------------------------------------------


@pytest.mark.parametrize("launcher, knobs", [
    ("submitit_local", ["hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
                        "hydra.launcher.mem_gb=2"]),
    ("slurm", ["hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=8",
               "hydra.launcher.timeout_min=240", "hydra.launcher.gpus_per_node=1"]),
])
def test_launcher_settings_from_the_command_line_are_accepted(tmp_path, launcher, knobs):
    args = [*tiny(tmp_path, "norm=bn,ln"), f"hydra/launcher={launcher}", *knobs]
    result = CliRunner().invoke(app, ["sweep", *args, "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    hydra, primary = sweep.compose_primary(args)
    GlobalHydra.instance().clear()
    for knob in knobs:
        key, value = knob.split("=", 1)
        assert str(primary.hydra.launcher[key.rsplit(".", 1)[1]]) == value


def test_slurm_without_slurm_is_one_line(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = CliRunner().invoke(app, ["sweep", *tiny(tmp_path), "hydra/launcher=slurm",
                                      "hydra.launcher.partition=gpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: hydra/launcher=slurm submits to SLURM") and \
        len(result.output.strip().splitlines()) == 1


# ---- what a sweep records of itself ---------------------------------------------------------------------


def test_a_resumed_sweep_records_what_it_trained_and_what_was_done(tmp_path):
    first = sweep.run(tiny(tmp_path, "seed=0,1"))
    assert first.trained == 2 and first.already_done == 0
    second = sweep.run(tiny(tmp_path, "seed=0,1,2"))
    assert second.trained == 1 and second.already_done == 2
    from normbench import report

    report.after_sweep(second, "normbench sweep seed=0,1,2")
    entry = results.read_sweeps(tmp_path / "default")[-1]
    assert (entry["planned"], entry["trained"], entry["already_done"]) == (3, 1, 2)
    assert "1 trained, 2 already done" in (tmp_path / "default" / "report.md").read_text()


def test_odd_fields_in_sweeps_json_do_not_crash_the_report(tmp_path):
    from normbench import report

    sweep.run(tiny(tmp_path))
    (tmp_path / "default" / "sweeps.json").write_text('[{"command": "x", "seconds": "slow", "trained": true}]')
    text = report.write(report.build(tmp_path / "default")).read_text()
    assert "`x`: ? trained, ? already done, ? failed, ?" in text


def test_dry_run_counts_planned_jobs_on_a_terminal_only():
    import io

    from rich.console import Console

    from normbench.display import planning_count

    live = Console(file=io.StringIO(), force_terminal=True, width=80)
    with planning_count(live) as planned_one:
        for _ in range(3):
            planned_one()
    assert "planning: 3 jobs" in live.file.getvalue()  # drawn when the count stops, then cleared
    plain = Console(file=io.StringIO(), force_terminal=False)
    with planning_count(plain) as planned_one:
        for _ in range(1000):
            planned_one()
    assert plain.file.getvalue() == ""  # off a terminal: no line per planned job


def test_the_recorded_command_runs_the_sweep_again_as_typed(tmp_path):
    import shlex

    configs = Path(__file__).parent.parent / "configs"
    args = [*tiny(tmp_path, "seed=range(2)"), "--config-dir", str(configs), "--retry-failed"]
    assert CliRunner().invoke(app, ["sweep", *args]).exit_code == 0
    recorded = json.loads((tmp_path / "default" / "sweeps.json").read_text())[-1]["command"]
    words = shlex.split(recorded)  # 'seed=range(2)' quoted for the shell, every option kept
    assert words[:2] == ["normbench", "sweep"] and sorted(words[2:]) == sorted(args)


def test_the_closing_line_says_what_became_of_the_runs_planned_to_train():
    from normbench.cli.sweeps import _what_happened

    outcome = sweep.SweepOutcome([], outcomes=[
        {"status": "completed"}, {"status": "failed"}, {"status": "diverged"},
        {"status": "completed", "skipped": True}, {"status": "busy", "skipped": True}])
    assert (outcome.trained, outcome.failed_now, outcome.finished_elsewhere) == (3, 1, 1)
    assert _what_happened(outcome) == "trained 2, 1 failed, 1 finished by another process meanwhile"
    assert _what_happened(sweep.SweepOutcome([], outcomes=[{"status": "completed"}] * 2)) == "trained 2"
