"""The command line, end to end through Typer's CliRunner: runs, config, list, version, and bad input."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

import normbench
from conftest import TINY_DATA, tiny_run_overrides
from normbench.cli import app
from normbench.config import compose, config_hash, run_id, to_dict
from normbench.data import DATASETS
from normbench.errors import DataError, UserError
from normbench.models import MODELS, build_model, count_parameters
from normbench.norms import NORMS
from normbench.results import METRIC_COLUMNS
from normbench.runner import norm_factory

cli = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the console width; pin it so output does not depend on the terminal running the tests."""
    monkeypatch.setenv("COLUMNS", "1000")


def invoke(*args: str):
    return cli.invoke(app, [str(a) for a in args])


def files_under(path: Path) -> list[Path]:
    """Result files (the runs' lock files under .locks/ are bookkeeping, not results)."""
    return [p for p in path.rglob("*") if p.is_file() and ".locks" not in p.parts] if path.exists() else []


# ---- run ------------------------------------------------------------------------------------------------


def test_run_end_to_end(results_dir):
    overrides = [*tiny_run_overrides(results_dir, "cnn", "bn"), "epochs=2", "name=exp1"]
    result = invoke("run", *overrides)
    assert result.exit_code == 0, result.output
    cfg = compose(overrides)
    folder = results_dir / "exp1" / run_id(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.csv", "summary.json"]
    assert sorted(files_under(results_dir)) == [folder / n for n in ("config.yaml", "metrics.csv", "summary.json")]
    assert f"results: {folder}" in result.output

    assert yaml.safe_load((folder / "config.yaml").read_text()) == to_dict(cfg)

    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == [1, 2] and metrics["step"].tolist() == [8, 16]
    assert metrics[METRIC_COLUMNS].notna().all().all()  # BN: all three test accuracies are there

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["run_id"] == folder.name
    assert summary["config_hash"] == config_hash(cfg) and summary["config_hash"] in folder.name
    assert summary["versions"] == {"python": summary["versions"]["python"], "torch": torch.__version__,
                                   "torchvision": __import__("torchvision").__version__,
                                   "normbench": normbench.__version__}
    net = build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), cfg.seed)
    assert summary["num_parameters"] == count_parameters(net) > 0
    assert isinstance(summary["wall_seconds"], float) and summary["wall_seconds"] > 0
    assert summary["epochs_completed"] == 2 and summary["steps"] == 16 and summary["steps_per_epoch"] == 8
    assert summary["effective_lr"] == pytest.approx(0.1 * 16 / 32)
    assert summary["final"]["test_acc"] == pytest.approx(metrics["test_acc"].iloc[-1])
    assert summary["best_test_acc"] == pytest.approx(metrics["test_acc"].max())
    assert summary["device"] == "cpu" and summary["config"] == to_dict(cfg)


def test_run_without_bn_writes_empty_bn_columns(results_dir):
    result = invoke("run", *tiny_run_overrides(results_dir, "mlp", "ln"))
    assert result.exit_code == 0, result.output
    (folder,) = (p for p in (results_dir / "default").iterdir() if not p.name.startswith("."))
    metrics = pd.read_csv(folder / "metrics.csv")
    assert metrics["test_acc_batch_stats"].isna().all() and metrics["test_acc_precise"].isna().all()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final"]["test_acc_batch_stats"] is None  # NaN becomes null in JSON
    assert summary["status"] == "completed"


# ---- config, list, version ------------------------------------------------------------------------------


def test_config_prints_yaml_with_run_id():
    overrides = ["model=cnn", "norm=gn", "norm.num_groups=8", "batch_size=4", "seed=3"]
    result = invoke("config", *overrides)
    assert result.exit_code == 0, result.output
    cfg = compose(overrides)
    first = result.output.splitlines()[0]
    assert first == f"# run_id: {run_id(cfg)}"
    assert yaml.safe_load(result.output) == to_dict(cfg)
    assert run_id(cfg).startswith("cnn-gn8-b4-s3-")  # gn with 8 groups is the packaged gn8 (config.ids.norm_label)


def test_list_names_every_registry_entry():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    words = set(result.output.split())
    for registry in (NORMS, MODELS, DATASETS):
        for name in registry.names():
            assert name in words, name
    for name in ("sgd", "adam", "adamw", "bn_shared"):
        assert name in words
    for group in ("data", "model", "norm", "optim", "experiment"):
        assert f"{group}=NAME" in result.output


def test_every_config_choice_maps_to_a_registry_entry():
    for group, registry in (("norm", NORMS), ("model", MODELS), ("data", DATASETS)):
        choices = [e.name[:-5] for e in (resources.files("normbench.conf") / group).iterdir()
                   if e.name.endswith(".yaml")]
        assert choices
        for choice in choices:
            assert getattr(compose([f"{group}={choice}"]), group).name in registry


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"normbench {normbench.__version__}"


def test_user_config_dir(tmp_path):
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "gn4.yaml").write_text(
        "# Group norm with 4 groups.\ndefaults:\n  - schema_gnconfig\n  - _self_\nname: gn\nnum_groups: 4\n")
    result = invoke("config", "-c", tmp_path, "norm=gn4")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["norm"]["num_groups"] == 4
    listed = invoke("list", "--config-dir", tmp_path)
    assert "gn4" in listed.output.split()
    missing = invoke("config", "-c", tmp_path / "nope")
    assert missing.exit_code == 2 and "no such directory" in missing.output


# ---- bad input: exit code 2, one clear line, nothing written ------------------------------------------------


def assert_user_error(result, *phrases: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def run_bad(results_dir, *overrides: str):
    result = invoke("run", f"results_dir={results_dir}", "device=cpu", *overrides)
    assert files_under(results_dir) == [], "a refused run must not write anything"
    return result


def test_unknown_group_option_lists_valid_ones(results_dir):
    line = assert_user_error(run_bad(results_dir, "norm=xx"), "unknown norm 'xx'; valid: ")
    packaged = {e.name[:-5] for e in (resources.files("normbench.conf") / "norm").iterdir()
                if e.name.endswith(".yaml")}
    listed, hint = line.split("valid: ")[1].split("; ")
    listed = listed.split(", ")
    assert hint == "a norm from a plugin needs --plugin"
    assert set(listed) == packaged and set(NORMS.names()) <= packaged
    assert "schema" not in line


def test_unknown_key(results_dir):
    line = assert_user_error(run_bad(results_dir, "norm.num_groupz=3"), "unknown key 'norm.num_groupz'")
    assert "valid keys here:" in line and "momentum" in line
    line = assert_user_error(run_bad(results_dir, "norm=gn", "norm.num_groupz=3"), "unknown key 'norm.num_groupz'")
    assert "num_groups" in line
    assert_user_error(run_bad(results_dir, "+norm.extra=1"), "unknown key 'norm.extra'")


def test_wrong_type(results_dir):
    assert_user_error(run_bad(results_dir, "batch_size=abc"), "batch_size", "'abc'", "Integer")


@pytest.mark.parametrize("override,phrase", [("epochs=0", "epochs must be > 0, got 0"),
                                             ("batch_size=-1", "batch_size must be > 0, got -1"),
                                             ("lr=0", "lr must be > 0"),
                                             ("device=gpu", "device must be")])
def test_bad_value(results_dir, override, phrase):
    assert_user_error(run_bad(results_dir, override), phrase)


def test_incompatible_norm_and_model(results_dir):
    assert_user_error(run_bad(results_dir, *TINY_DATA, "model=mlp", "norm=in"),
                      "norm 'in' (instance norm) is undefined on flat features", "model=cnn")
    assert_user_error(run_bad(results_dir, *TINY_DATA, "model=rnn", "norm=in"), "undefined on recurrent features")
    assert not (results_dir / "default").exists() or not any((results_dir / "default").iterdir())


def test_gn_groups_not_dividing(results_dir):
    assert_user_error(run_bad(results_dir, *TINY_DATA, "model=cnn", "model.channels=[8,12]", "norm=gn",
                              "norm.num_groups=8"),
                      "norm.num_groups=8 does not divide layer", "(12 channels)",
                      "num_groups values that work for every layer: 1, 2, 4")


def test_bn_at_batch_one_on_mlp(results_dir):
    assert_user_error(run_bad(results_dir, *TINY_DATA, "model=mlp", "batch_size=1"),
                      "norm=bn with batch_size=1 on model=mlp", "batch_size >= 2")
    assert_user_error(run_bad(results_dir, *TINY_DATA, "model=rnn", "batch_size=1"), "model=rnn")


def test_bn_at_batch_one_is_fine_on_conv_nets(results_dir):
    result = invoke("run", *tiny_run_overrides(results_dir, "cnn", "bn"), "batch_size=1", "data.num_train=8",
                    "data.num_test=4")
    assert result.exit_code == 0, result.output
    (folder,) = (p for p in (results_dir / "default").iterdir() if not p.name.startswith("."))
    assert json.loads((folder / "summary.json").read_text())["steps"] == 8


def test_batch_larger_than_training_set(results_dir):
    assert_user_error(run_bad(results_dir, *TINY_DATA, "batch_size=256"), "larger than the training set (128")


def test_missing_data(results_dir, tmp_path, offline):
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert_user_error(run_bad(results_dir, "data=mnist", f"data.root={empty}"),
                      f"under {empty / 'MNIST' / 'raw'},", "download failed")
    assert offline  # a download was tried, and refused at once


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden"])
def test_bad_experiment_name(results_dir, name):
    assert_user_error(run_bad(results_dir, *TINY_DATA, f"name={name}"), f"name '{name}' must be")
    assert not (results_dir.parent / "x").exists()


def test_debug_env_propagates_the_exception(results_dir, monkeypatch):
    monkeypatch.setenv("NORMBENCH_DEBUG", "1")
    result = invoke("run", f"results_dir={results_dir}", "norm=xx")
    assert isinstance(result.exception, UserError)
    assert "unknown norm 'xx'" in str(result.exception)
    result = invoke("run", f"results_dir={results_dir}", "data=cifar10", f"data.root={results_dir.parent}")
    assert isinstance(result.exception, DataError)


# ---- one-line errors off a terminal ---------------------------------------------------------------------

# Off a terminal (CI logs, pipes, `> log`) Rich's console is 80 columns wide; errors must not wrap.
BAD_INPUTS = [
    pytest.param(["norm=xx"], id="unknown-group-option"),
    pytest.param(["batch_size=abc"], id="wrong-type"),
    pytest.param(["epochs=0"], id="bad-value"),
    pytest.param(["norm.num_groupz=3"], id="unknown-key"),
    pytest.param([*TINY_DATA, "model=mlp", "norm=in"], id="incompatible"),
    pytest.param([*TINY_DATA, "model=cnn", "model.channels=[8,12]", "norm=gn", "norm.num_groups=8"],
                 id="gn-groups"),
    pytest.param([*TINY_DATA, "model=mlp", "batch_size=1"], id="bn-batch-1"),
    pytest.param([*TINY_DATA, "name=../x"], id="bad-name"),
    pytest.param(["data=mnist", "data.root={empty}"], id="missing-data"),
]


@pytest.mark.parametrize("overrides", BAD_INPUTS)
def test_error_is_one_line_in_an_80_column_log(results_dir, tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_bad(results_dir, *(o.format(empty=tmp_path / "empty") for o in overrides))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_config_output_is_valid_yaml_for_long_values(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    root = "/data/" + "a-long-folder-name/" * 6
    result = invoke("config", f"data.root={root}")
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["data"]["root"] == root


def test_config_output_keeps_brackets():
    result = invoke("config", "data.root='/data/[bold]x'")
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["data"]["root"] == "/data/[bold]x"


@pytest.mark.parametrize("norm", ["in", "gn"])
def test_one_value_per_group_on_1x1_maps_is_refused_before_training(results_dir, norm):
    # five stages on 28x28: 28, 14, 7, 3, 1 -> the last stage's norm sees a single position per channel
    overrides = [*TINY_DATA, "data.num_train=32", "data.num_test=16", "model=cnn", "model.channels=[4,4,4,4,4]",
                 f"norm={norm}", "batch_size=16", "epochs=1"] + (["norm.num_groups=4"] if norm == "gn" else [])
    result = run_bad(results_dir, *overrides)
    assert_user_error(result, "norm")


# ---- run ids ---------------------------------------------------------------------------------------------


def test_run_id_is_stable_and_ignores_locations(tmp_path):
    base = ["model=cnn", "norm=gn", "batch_size=8"]
    rid = run_id(compose(base))
    assert rid == run_id(compose(base))
    assert rid.startswith("cnn-gn-b8-s0-") and len(rid.rsplit("-", 1)[1]) == 12
    for extra in (f"results_dir={tmp_path}", "name=other", f"data.root={tmp_path}", "device=cpu"):
        assert run_id(compose([*base, extra])) == rid, extra
    changed = {run_id(compose([*base, extra])) for extra in ("batch_size=16", "seed=1", "norm=bn", "lr=0.2",
                                                             "epochs=3", "norm.num_groups=2")}
    assert len(changed) == 6 and rid not in changed
    assert run_id(compose([*base, "norm=bn"])).startswith("cnn-bn-b8-s0-")


def test_shell_completion_is_offered():
    result = invoke("--help")
    assert result.exit_code == 0 and "--install-completion" in result.output


def test_config_of_a_preset_says_its_sweep_is_not_expanded_on_stderr_and_stays_yaml_on_stdout():
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "normbench", "config", "experiment=quick", "hydra.run.dir=x"],
                           capture_output=True, text=True, check=True)
    assert yaml.safe_load(shown.stdout)["name"] == "quick"
    note = " ".join(shown.stderr.split())
    assert note.startswith("note: hydra.run.dir: Hydra's settings") and "without expanding its sweep" in note
    plain = subprocess.run([sys.executable, "-m", "normbench", "config", "norm=gn"], capture_output=True, text=True,
                           check=True)
    assert plain.stderr == ""
