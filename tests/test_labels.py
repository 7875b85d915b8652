"""One label per norm setting (`normbench.config.ids.norm_label`): run ids, terminal, CSV, figures, report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from normbench import plots, report
from normbench.cli import app
from normbench.config import compose, config_hash, run_id, to_dict
from normbench.config.ids import norm_label, packaged_norms

PACKAGED = sorted(packaged_norms())


@pytest.mark.parametrize("option", PACKAGED)
def test_packaged_norm_settings_are_what_hydra_composes(option):
    assert packaged_norms()[option] == to_dict(compose([f"norm={option}"]))["norm"]


@pytest.mark.parametrize("option", PACKAGED)
def test_a_packaged_option_is_labelled_by_its_name(option):
    assert norm_label(to_dict(compose([f"norm={option}"]))["norm"]) == option


@pytest.mark.parametrize("option", [o for o in PACKAGED if packaged_norms()[o]["name"] == o])
def test_runs_of_a_plain_norm_keep_their_run_id(option):
    cfg = compose(["model=cnn", f"norm={option}", "batch_size=8", "seed=2"])
    assert run_id(cfg) == f"cnn-{cfg.norm.name}-b8-s2-{config_hash(cfg)}"  # the id before labels existed


def test_settings_that_differ_are_named_as_overrides_set_them():
    def label(*overrides: str) -> str:
        return norm_label(to_dict(compose(list(overrides)))["norm"])

    assert label("norm=gn", "norm.num_groups=4") == "gn(num_groups=4)"
    assert label("norm=gn", "norm.num_groups=8") == "gn8"  # exactly the packaged option gn8
    assert label("norm=gn8", "norm.num_groups=32") == "gn"
    assert label("norm=ws_gn", "norm.num_groups=8") == "ws_gn(num_groups=8)"  # gn8 is a gn, not a ws_gn
    assert label("norm=bn", "norm.momentum=null", "norm.track_running_stats=false") == \
        "bn(momentum=null,track_running_stats=false)"
    assert label("norm=bn_shared", "norm.eps=0.001") == "bn(eps=0.001,recurrent_stats=shared)"
    assert label("norm=bn", "norm.noise.std=0.1") == "bn(noise.std=0.1)"
    assert label("norm=frn", "norm.eps=1e-5") == "frn(eps=1e-05)"  # frn's own default is 1e-6


def test_a_summary_written_before_a_setting_existed_keeps_its_label():
    norm = to_dict(compose(["norm=gn", "norm.num_groups=4"]))["norm"]
    del norm["noise"]
    assert norm_label(norm) == "gn(num_groups=4)"


@pytest.fixture
def user_configs(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    (folder / "norm").mkdir(parents=True)
    (folder / "norm" / "gn4.yaml").write_text("defaults:\n  - gn\n  - _self_\nnum_groups: 4\n")
    return folder


def test_a_user_option_and_the_packaged_one_are_told_apart_everywhere(tmp_path, user_configs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    results_dir = tmp_path / "results"
    base = ["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=64", "epochs=1",
            "batch_size=16", "device=cpu", "eval_batch_size=32", f"results_dir={results_dir}", "name=variants"]
    titles, outputs = [], []
    for norm in ("gn", "gn4"):
        result = CliRunner().invoke(app, ["run", "--config-dir", str(user_configs), *base, f"norm={norm}"])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        titles += [line.strip() for line in result.output.splitlines() if line.strip().startswith("mlp / ")]
    # terminal: the run's table title names the variant
    assert len(titles) == 2
    assert titles[0].startswith("mlp / gn / synthetic") and titles[1].startswith("mlp / gn(num_groups=4) / synthetic")

    experiment = results_dir / "variants"
    folders = {p.name.rsplit("-", 1)[0]: p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert sorted(folders) == sorted(["mlp-gn-b16-s0", "mlp-gn(num_groups=4)-b16-s0"])
    for prefix, output in zip(["mlp-gn-b16-s0", "mlp-gn(num_groups=4)-b16-s0"], outputs):
        assert f"results: {folders[prefix]}" in output  # the whole id, as Rich prints it

    rep = report.build(experiment)
    report.write(rep)
    labels = {"gn", "gn(num_groups=4)"}
    assert set(pd.read_csv(experiment / "runs.csv").norm) == labels
    assert set(pd.read_csv(experiment / "summary.csv").norm) == labels
    assert set(pd.read_csv(experiment / "pivot.csv").norm) == labels
    text = (experiment / "report.md").read_text()
    assert "| synthetic | mlp | gn | " in text and "| synthetic | mlp | gn(num_groups=4) | " in text

    console = Console(record=True, width=400)
    console.print(report.rich_pivot(rep))
    rows = [line for line in console.export_text().splitlines() if "synthetic" in line]
    assert sorted(line.split("│")[3].strip() for line in rows) == sorted(labels)

    figure = plots.accuracy_vs_batch(rep.summary, "variants")
    legend = {t.get_text() for legend in figure.legends for t in legend.get_texts()}
    assert legend == labels
    curves = plots.training_curves(rep.runs, rep.curves, "variants")
    assert {ax.get_title().rsplit(" / ", 1)[1] for ax in curves.axes if ax.get_visible()} == labels
