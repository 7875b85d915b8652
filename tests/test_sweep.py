"""Sweeps: Hydra's multirun internals, expansion and validation, resume, failures, the CLI, --jobs.

Every sweep here is tiny (synthetic data, a 16-unit MLP, one epoch of 64 samples) and writes under tmp_path.
"""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from typer.testing import CliRunner

import normbench.runner
from normbench import results, sweep
from normbench.cli import app
from normbench.config import compose, run_id
from normbench.errors import UserError

from conftest import write_idx_dataset

TINY = ["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=16", "epochs=1",
        "eval.precise_bn_samples=64", "device=cpu"]


def tiny(results_dir: Path, *sweep_args: str) -> list[str]:
    return [*TINY, *sweep_args, f"results_dir={results_dir}"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # Rich reads it on every print: no wrapped run ids


@pytest.fixture
def trained(monkeypatch) -> list[str]:
    """Run ids of every training started (sweep._Train imports runner.execute at call time)."""
    calls: list[str] = []
    real = normbench.runner.execute

    def counting(cfg, progress=None):
        calls.append(run_id(cfg))
        return real(cfg, progress)

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

    assert sweep.Hydra is Hydra and sweep.create_config_search_path is create_config_search_path
    create = inspect.signature(Hydra.create_main_hydra2)  # classmethod: cls is bound
    assert list(create.parameters) == ["task_name", "config_search_path"]
    multirun = inspect.signature(Hydra.multirun)
    assert list(multirun.parameters)[:4] == ["self", "config_name", "task_function", "overrides"]
    assert all(p.default is not inspect.Parameter.empty for p in list(multirun.parameters.values())[4:])
    search = inspect.signature(create_config_search_path)
    assert list(search.parameters) == ["search_path_dir"]
    # what hydra_multirun reads back from the jobs
    from hydra.core.utils import JobReturn

    assert isinstance(inspect.getattr_static(JobReturn, "return_value"), property)
    # what the grids sweeper plugin builds on
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    assert list(inspect.signature(BasicSweeper.split_arguments).parameters) == ["overrides", "max_batch_size"]
    assert {"get_job_batch", "is_done", "setup"} <= set(dir(BasicSweeper))


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


def test_quick_preset_expands_to_the_documented_grid(tmp_path, monkeypatch):
    """MLP: 4 norms x 7 batch sizes, CNN: 2 norms x 3 batch sizes, 3 seeds each (launch stubbed)."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.plugins.sweeper import Sweeper

    def launch(self, job_overrides, initial_job_idx):
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=list(o))
                for o in job_overrides]

    monkeypatch.setattr(BasicLauncher, "launch", launch)
    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", lambda self, batch: None)
    jobs = sweep.plan(["experiment=quick", f"results_dir={tmp_path}"])
    assert len(jobs) == 102

    def value(job, key):
        return next(o.split("=", 1)[1] for o in job if o.startswith(f"{key}="))

    grid = [(value(j, "model"), value(j, "norm"), int(value(j, "batch_size")), int(value(j, "seed"))) for j in jobs]
    assert len(set(grid)) == 102
    assert set(grid) == (set(itertools.product(["mlp"], ["bn", "ln", "gn", "none"], [2, 4, 8, 16, 32, 64, 128],
                                               [0, 1, 2]))
                         | set(itertools.product(["cnn"], ["bn", "gn"], [2, 8, 32], [0, 1, 2])))


def _stub_launch(monkeypatch):
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.plugins.sweeper import Sweeper

    def launch(self, job_overrides, initial_job_idx):
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=sorted(o))
                for o in job_overrides]

    monkeypatch.setattr(BasicLauncher, "launch", launch)
    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", lambda self, batch: None)


def test_grids_sweeper_runs_the_union_once_and_the_command_line_wins(tmp_path, monkeypatch):
    _stub_launch(monkeypatch)
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "g.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /hydra/sweeper: grids\n"
        "hydra:\n  sweeper:\n    params:\n      seed: 0,1\n    grids:\n"
        "      - {norm: 'bn,ln', batch_size: '2,4'}\n"
        "      - {norm: 'ln,gn', batch_size: '4'}\n")
    base = ["experiment=g", f"results_dir={tmp_path / 'r'}"]
    jobs = sweep.plan(base, config_dir=tmp_path)
    keys = {tuple(sorted(o for o in j if o.split("=")[0] in ("norm", "batch_size", "seed"))) for j in jobs}
    # (bn, ln) x (2, 4) plus (ln, gn) x 4: 4 + 2 conditions, (ln, 4) shared once; x 2 seeds
    assert len(jobs) == 10 == len(keys)
    narrowed = sweep.plan(base + ["seed=7"], config_dir=tmp_path)
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


def test_local_parallel_jobs_each_get_their_own_gpu(tmp_path, monkeypatch):
    """With several GPUs, job k trains on cuda:(k mod GPUs); Hydra's launchers do not do this themselves."""
    import torch

    seen = []

    def fake_execute(cfg, progress=None):
        seen.append(cfg.device)
        return type("R", (), {"summary": {"status": "completed"}})()

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(normbench.runner, "execute", fake_execute)
    overrides = ["data=synthetic", "data.num_train=64", "model=mlp", "norm=bn,ln,gn", f"results_dir={tmp_path}"]
    sweep.hydra_multirun(overrides, sweep._Train(spread_gpus=True))
    assert seen == ["cuda:0", "cuda:1", "cuda:0"]
    seen.clear()
    sweep.hydra_multirun(overrides + ["device=cpu"], sweep._Train(spread_gpus=True))
    assert seen == ["cpu", "cpu", "cpu"]  # an explicit device is left alone


def test_invalid_jobs_are_not_counted_as_trained(tmp_path):
    outcome = sweep.run(["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=16",
                         "norm=ln,in", "batch_size=16", "epochs=1", f"results_dir={tmp_path}"])
    assert outcome.trained == 1
    assert [what for what, _ in outcome.failures] == [p.label for p in outcome.planned if p.state == "invalid"]
