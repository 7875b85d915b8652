"""The experiment report from a tiny real sweep: CSV tables, figures, report.md, rebuilt from the folders alone."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import analysis, plots, report, results, sweep
from normbench.cli import app
from normbench.results import METRIC_COLUMNS

SWEEP = ["data=synthetic", "data.num_train=64", "data.num_test=32", "model=mlp", "model.width=16", "epochs=1",
         "eval.precise_bn_samples=64", "device=cpu", "norm=bn,ln", "batch_size=4,16", "seed=0,1", "name=tiny"]
AGGREGATES = ["runs.csv", "summary.csv", "pivot.csv", "delta_vs_bn.csv", "degradation.csv", "report.md"]
FIGURES = ["accuracy_vs_batch", "bn_eval_modes", "training_curves"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One tiny real sweep for the whole module (8 runs); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("sweep")

    def no_connect(*args, **kwargs):
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_connect)
        mp.setattr(socket, "create_connection", no_connect)
        outcome = sweep.run([*SWEEP, f"results_dir={root}"])
    assert outcome.trained == 8 and outcome.failures == []
    return root / "tiny"


@pytest.fixture
def experiment(swept, tmp_path) -> Path:
    """A private copy of the swept experiment."""
    return Path(shutil.copytree(swept, tmp_path / "tiny"))


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


def run_folder_names(experiment: Path) -> list[str]:
    return sorted(p.name for p in experiment.iterdir() if p.is_dir() and not p.name.startswith("."))


def summaries_on_disk(experiment: Path) -> list[dict]:
    return [json.loads((experiment / name / "summary.json").read_text()) for name in run_folder_names(experiment)]


# ---- tables and figures ------------------------------------------------------------------------------------


def test_report_writes_tables_with_documented_columns(experiment):
    rep = report.build(experiment)
    assert rep.warnings == []
    path = report.write(rep)
    assert path == experiment / "report.md"
    for name in AGGREGATES:
        assert (experiment / name).is_file(), name

    runs = pd.read_csv(experiment / "runs.csv")
    assert len(runs) == 8 and set(runs.status) == {"completed"}
    assert list(runs.columns[:10]) == ["run_id", "status", "data", "model", "norm", "batch_size", "seed",
                                       "effective_lr", "epochs", "steps"]
    assert sorted(runs.run_id) == run_folder_names(experiment)
    for s in summaries_on_disk(experiment):
        row = runs[runs.run_id == s["run_id"]].iloc[0]
        assert row.test_acc == pytest.approx(s["final"]["test_acc"])
        assert row.norm == s["config"]["norm"]["name"] and row.batch_size == s["config"]["batch_size"]

    summary = pd.read_csv(experiment / "summary.csv")
    for col in ["data", "model", "norm", "batch_size", "n", "n_diverged", "n_failed", "test_acc_mean",
                "test_acc_std", "test_acc_ci95", "test_acc_min", "test_acc_max", "test_acc_batch_stats_mean",
                "test_acc_precise_mean", "train_loss_mean"]:
        assert col in summary.columns, col
    assert sorted(zip(summary.norm, summary.batch_size)) == [("bn", 4), ("bn", 16), ("ln", 4), ("ln", 16)]
    assert list(summary.n) == [2, 2, 2, 2]
    for _, row in summary.iterrows():
        accs = runs[(runs.norm == row.norm) & (runs.batch_size == row.batch_size)].test_acc.to_numpy()
        mean, half, _ = analysis.mean_ci(accs)
        assert row.test_acc_mean == pytest.approx(mean)
        assert row.test_acc_std == pytest.approx(np.std(accs, ddof=1))
        assert row.test_acc_ci95 == pytest.approx(half)
        assert (row.test_acc_min, row.test_acc_max) == (pytest.approx(accs.min()), pytest.approx(accs.max()))
    bn_rows, ln_rows = summary[summary.norm == "bn"], summary[summary.norm == "ln"]
    assert bn_rows.test_acc_precise_mean.notna().all() and bn_rows.test_acc_batch_stats_mean.notna().all()
    assert ln_rows.test_acc_precise_mean.isna().all()  # LN has no batch statistics to recompute

    pivot = pd.read_csv(experiment / "pivot.csv")
    assert list(pivot.columns) == ["data", "model", "norm", "4", "16"]
    for _, row in summary.iterrows():
        cell = pivot[pivot.norm == row.norm][str(row.batch_size)].iloc[0]
        assert cell == analysis.cell_text(row)
        assert "± 0.0" not in cell

    delta = pd.read_csv(experiment / "delta_vs_bn.csv")
    assert set(delta.columns) >= {"data", "model", "batch_size", "norm", "delta", "delta_ci95"}
    assert sorted(zip(delta.norm, delta.batch_size)) == [("ln", 4), ("ln", 16)]
    for _, row in delta.iterrows():
        means = summary[summary.batch_size == row.batch_size].set_index("norm").test_acc_mean
        assert row.delta == pytest.approx(means["ln"] - means["bn"])

    degr = pd.read_csv(experiment / "degradation.csv")
    assert list(degr.columns) == ["data", "model", "norm", "small_batch", "large_batch", "acc_small", "acc_large",
                                  "drop", "drop_ci95"]
    for _, row in degr.iterrows():
        means = summary[summary.norm == row.norm].set_index("batch_size").test_acc_mean
        assert (row.small_batch, row.large_batch) == (4, 16)
        assert row["drop"] == pytest.approx(means[16] - means[4])


@pytest.mark.real_figures
def test_report_figures_are_real_images(experiment):
    report.write(report.build(experiment))
    for name in FIGURES:
        png, svg = experiment / f"{name}.png", experiment / f"{name}.svg"
        assert png.stat().st_size > 5_000, name
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        pixels = image.reshape(-1, image.shape[-1])
        assert len(np.unique(pixels, axis=0)) > 10, f"{name}.png is (nearly) a single colour"
        assert np.ptp(pixels[:, :3]) > 0.5
        text = svg.read_text()
        assert svg.stat().st_size > 5_000 and text.lstrip().startswith("<?xml") and "<svg" in text


def test_report_markdown(experiment):
    rep = report.build(experiment)
    text = report.write(rep).read_text()
    assert text.startswith("# normbench report: tiny\n")
    assert "8 runs: 8 completed." in text
    assert "## Verdict" in text
    assert "**synthetic / mlp**" in text
    for sentence in rep.verdict["synthetic / mlp"]:
        assert f"- {sentence}" in text
    assert any(s.startswith("bn ") or s.startswith("bn:") for s in rep.verdict["synthetic / mlp"])
    assert "| data | model | norm | 4 | 16 |" in text  # the pivot table
    for cell in rep.pivot.to_numpy().ravel():
        assert f" {cell} " in text
    assert "## Difference from batch norm (points)" in text
    for name in FIGURES:
        assert f"![{name}]({name}.png)" in text
    assert "Layer Normalization (Ba et al. 2016)" in text  # the anchor for the MLP
    assert "## Provenance" in text and "- runs: 8;" in text
    assert "Run folders skipped" not in text


def test_report_command_rebuilds_the_same_tables_from_the_folders(experiment):
    report.write(report.build(experiment))
    before = {name: (experiment / name).read_bytes() for name in AGGREGATES if name.endswith(".csv")}
    for name in AGGREGATES:
        (experiment / name).unlink()
    for name in FIGURES:
        for ext in ("png", "svg"):
            (experiment / f"{name}.{ext}").unlink()

    result = CliRunner().invoke(app, ["report", str(experiment)])
    assert result.exit_code == 0, result.output
    assert f"report: {experiment / 'report.md'}" in result.output
    assert (experiment / "summary.csv").read_bytes() == before["summary.csv"]
    for name, data in before.items():
        assert (experiment / name).read_bytes() == data, name
    for name in FIGURES:
        assert (experiment / f"{name}.png").is_file()
    assert "## Verdict" in (experiment / "report.md").read_text()

    # the results folder above works too
    result = CliRunner().invoke(app, ["report", str(experiment.parent)])
    assert result.exit_code == 0, result.output
    assert (experiment / "summary.csv").read_bytes() == before["summary.csv"]


def test_report_command_on_a_folder_without_runs(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run folders under" in result.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "typo")])
    assert missing.exit_code == 2 and "no folder at" in missing.output
    (tmp_path / "a_file").write_text("x")
    not_folder = CliRunner().invoke(app, ["report", str(tmp_path / "a_file")])
    assert not_folder.exit_code == 2 and "is not a folder" in not_folder.output
    run = tmp_path / "exp" / "mlp-bn-b8-s0-abc"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    one_run = CliRunner().invoke(app, ["report", str(run)])
    assert one_run.exit_code == 2 and f"is one run's folder; report reads the experiment folder that holds the " \
        f"runs: normbench report {run.parent}" in " ".join(one_run.output.split())


# ---- malformed run folders -------------------------------------------------------------------------------


def _victim(experiment: Path) -> Path:
    return experiment / run_folder_names(experiment)[0]


def _garbage_summary_alone(experiment: Path) -> Path:
    folder = experiment / "stray"
    folder.mkdir()
    (folder / "summary.json").write_text("{ this is not json")
    return folder


def _summary_missing_keys(experiment: Path) -> Path:
    folder = _victim(experiment)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["config_hash"], summary["config"]
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _metrics_wrong_columns(experiment: Path) -> Path:
    folder = _victim(experiment)
    (folder / "metrics.csv").write_text("epoch,loss,accuracy\n1,0.5,90\n")
    return folder


def _metrics_unreadable(experiment: Path) -> Path:
    folder = _victim(experiment)
    (folder / "metrics.csv").unlink()
    return folder


def _summary_of_another_run(experiment: Path) -> Path:
    folder = _victim(experiment)
    renamed = folder.with_name(folder.name + "-copy")
    folder.rename(renamed)
    return renamed


@pytest.mark.parametrize("damage, why", [
    (_garbage_summary_alone, "no readable summary.json"),
    (_summary_missing_keys, "summary.json lacks config_hash, config"),
    (_summary_of_another_run, "summary.json belongs to run"),
])
def test_a_malformed_run_folder_is_skipped_with_a_warning(experiment, damage, why):
    folder = damage(experiment)
    expected_runs = 8 if damage is _garbage_summary_alone else 7
    rep = report.build(experiment)
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith(f"skipped {folder}: {why}"), rep.warnings
    assert len(rep.runs) == expected_runs
    assert folder.name not in set(rep.runs.run_id)
    assert int(rep.summary.n.sum()) == expected_runs
    text = report.write(rep).read_text()
    assert "Run folders skipped or read in part:" in text and str(folder) in text
    assert (experiment / "summary.csv").is_file()


def _metrics_a_fifo(experiment: Path) -> Path:
    import os

    folder = _victim(experiment)
    (folder / "metrics.csv").unlink()
    os.mkfifo(folder / "metrics.csv")  # opened for reading, it would wait for a writer for ever
    return folder


@pytest.mark.parametrize("damage, why", [
    (_metrics_wrong_columns, "metrics.csv has 3 columns, not normbench's 11"),
    (_metrics_unreadable, "metrics.csv unreadable (No such file"),
    (_metrics_a_fifo, "metrics.csv unreadable (metrics.csv is not a regular file"),
])
def test_a_finished_run_with_a_damaged_training_curve_keeps_its_result(experiment, damage, why):
    """Its final accuracy is in summary.json: the run stays in every table (a sweep counts it as done, so its report
    must not call it missing), and only the training curve is left out, with a warning."""
    folder = damage(experiment)
    rep = report.build(experiment)
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith(f"{folder}: {why}"), rep.warnings
    assert "its training curve is left out (its final result is used)" in rep.warnings[0]
    assert len(rep.runs) == 8 and folder.name in set(rep.runs.run_id) and int(rep.summary.n.sum()) == 8
    assert folder.name not in rep.curves
    text = report.write(rep).read_text()
    assert str(folder) in text and (experiment / "training_curves.png").is_file()


def test_report_command_prints_the_warning(experiment):
    folder = _summary_missing_keys(experiment)
    result = CliRunner().invoke(app, ["report", str(experiment)])
    assert result.exit_code == 0, result.output
    assert f"warning: skipped {folder}: summary.json lacks" in result.output
    assert len(pd.read_csv(experiment / "runs.csv")) == 7


def test_a_garbage_summary_in_a_real_run_folder_is_warned_about(experiment):
    folder = _victim(experiment)
    assert (folder / "config.yaml").is_file()
    (folder / "summary.json").write_text("{ this is not json")
    rep = report.build(experiment)
    assert len(rep.runs) == 7
    assert rep.warnings == [f"skipped {folder}: no readable summary.json"]


def test_runs_still_running_are_left_out_without_a_warning(experiment):
    folder = _victim(experiment)
    summary = json.loads((folder / "summary.json").read_text())
    summary["status"] = "running"
    (folder / "summary.json").write_text(json.dumps(summary))
    started = experiment / "started-never-summarized"
    started.mkdir()
    (started / "config.yaml").write_text("name: tiny\n")
    summaries, curves, warnings = results.scan(experiment)
    assert len(summaries) == 7 and warnings == []
    assert folder.name not in curves and all(list(c.columns) == METRIC_COLUMNS for c in curves.values())


def test_report_with_failed_and_diverged_runs(experiment):
    names = run_folder_names(experiment)
    failed, diverged = experiment / names[0], experiment / names[1]
    for folder, status in ((failed, "failed"), (diverged, "diverged")):
        summary = json.loads((folder / "summary.json").read_text())
        summary["status"] = status
        if status == "failed":
            summary.update(final=None, error="RuntimeError: boom")
        (folder / "summary.json").write_text(json.dumps(summary))
    rep = report.build(experiment)
    assert rep.warnings == []
    row = rep.summary[(rep.summary.n_failed + rep.summary.n_diverged) > 0]
    assert len(row) == 1  # names[0] and names[1] are the two seeds of one condition
    row = row.iloc[0]
    assert (row.n, row.n_failed, row.n_diverged) == (0, 1, 1)
    assert np.isnan(row.test_acc_mean)
    cell = rep.pivot.loc[("synthetic", "mlp", row.norm), row.batch_size]
    assert cell == "1/2 diverged, 1/2 failed"
    lines = rep.verdict["synthetic / mlp"]
    assert f"{row.norm}: 1 of 2 seeds diverged at batch {row.batch_size}." in lines
    assert f"{row.norm}: 1 of 2 seeds failed at batch {row.batch_size}." in lines
    text = report.write(rep).read_text()
    assert "8 runs: 6 completed, 1 diverged, 1 failed." in text
    assert f" {cell} " in text


def test_lost_seeds_are_marked_in_every_layer(experiment):
    names = run_folder_names(experiment)
    summary = json.loads((experiment / names[0] / "summary.json").read_text())
    norm, batch = summary["config"]["norm"]["name"], summary["config"]["batch_size"]
    summary.update(status="diverged", diverged_step=3)
    (experiment / names[0] / "summary.json").write_text(json.dumps(summary))
    rep = report.build(experiment)
    row = rep.summary[(rep.summary.norm == norm) & (rep.summary.batch_size == batch)].iloc[0]
    assert (row.n_planned, row.n, row.n_diverged, row.n_failed, row.n_missing) == (2, 1, 1, 0, 0)

    cell = rep.pivot.loc[("synthetic", "mlp", norm), batch]
    assert cell == f"{row.test_acc_mean:.1f} (1/2 diverged)"  # the survivor, and the seed it lost
    assert f"{norm}: 1 of 2 seeds diverged at batch {batch}." in rep.verdict["synthetic / mlp"]

    text = report.write(rep).read_text()
    assert f" {cell} " in text
    assert "## Seeds without a result" in text
    assert f"| synthetic | mlp | {norm} | {batch} | 2 | 1 | 1 | 0 | 0 |" in text
    assert f"- {norm}: 1 of 2 seeds diverged at batch {batch}." in text
    pivot_csv = pd.read_csv(experiment / "pivot.csv")
    assert pivot_csv[pivot_csv.norm == norm][str(batch)].iloc[0] == cell

    table = report.rich_pivot(rep)
    cells = [c for column in table.columns for c in column._cells]
    assert any(str(c) == cell and c.style == "yellow" for c in cells)

    fig = plots.accuracy_vs_batch(rep.summary, "tiny")
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert labels == ["1/2 diverged"]


def test_a_condition_without_completed_seeds_is_marked_not_dropped(experiment):
    names = run_folder_names(experiment)
    for name in names[:2]:  # the two seeds of one condition
        summary = json.loads((experiment / name / "summary.json").read_text())
        summary.update(status="diverged", diverged_step=3)
        (experiment / name / "summary.json").write_text(json.dumps(summary))
    rep = report.build(experiment)
    norm, batch = summary["config"]["norm"]["name"], summary["config"]["batch_size"]
    assert rep.pivot.loc[("synthetic", "mlp", norm), batch] == "2/2 diverged"
    assert rep.verdict["synthetic / mlp"][0] == f"{norm}: 2 of 2 seeds diverged at batch {batch}."
    fig = plots.accuracy_vs_batch(rep.summary, "tiny")
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["2/2 diverged"]


# ---- what a report covers ----------------------------------------------------------------------------------


def test_a_sweep_reports_the_runs_it_planned_and_the_folder_report_says_what_it_mixes(experiment, monkeypatch):
    from normbench.runner import execute
    from normbench.config import compose

    root = experiment.parent
    lone = [o for o in SWEEP if not o.startswith(("norm=", "batch_size=", "seed=", "epochs="))]
    execute(compose([*lone, "norm=ln", "batch_size=16", "epochs=2", f"results_dir={root}"]))  # a lone run, 2 epochs
    outcome = sweep.run([*SWEEP, f"results_dir={root}"])  # the sweep again: its 8 runs are done
    assert outcome.trained == 0 and outcome.already_done == 8
    [(rep, path)] = report.after_sweep(outcome, "normbench sweep " + " ".join(SWEEP))

    assert len(rep.runs) == 8 and rep.runs.epochs.eq(1).all()
    assert list(rep.pivot.index.names) == ["data", "model", "norm"]  # no epochs column
    text = path.read_text()
    assert "This report covers the 8 finished runs of the sweep `normbench sweep " in text
    assert "the folder holds 1 other finished run (`normbench report" in text and "differ in settings" not in text
    assert len(pd.read_csv(experiment / "runs.csv")) == 8
    assert json.loads((experiment / "sweeps.json").read_text())[-1]["runs"] == sorted(rep.runs.run_id)

    result = CliRunner().invoke(app, ["report", str(experiment)])
    assert result.exit_code == 0, result.output
    warning = ("The runs in this folder differ in settings that no sweep recorded here varies (epochs 1 or 2): "
               "they come from different runs or sweeps, and the tables keep them apart by those settings.")
    assert f"warning: {warning}" in result.output
    text = (experiment / "report.md").read_text()
    assert f"This report covers all 9 finished runs in {experiment}. {warning}" in text
    assert "| data | model | epochs | norm | 4 | 16 |" in text
    assert "- epochs per run: 1, 2;" in text and "Run folders skipped" not in text
    assert len(pd.read_csv(experiment / "runs.csv")) == 9


def test_a_folder_whose_runs_differ_only_in_what_its_sweeps_vary_has_no_warning(experiment):
    from normbench.runner import execute
    from normbench.config import compose

    root = experiment.parent
    lone = [o for o in SWEEP if not o.startswith(("norm=", "batch_size=", "seed=", "epochs="))]
    execute(compose([*lone, "norm=ln", "batch_size=16", "epochs=2", f"results_dir={root}"]))
    planned = sorted(p.name for p in experiment.iterdir() if p.is_dir() and not p.name.startswith("."))
    results.record_sweep(experiment, {"command": "normbench sweep epochs=1,2", "runs": planned})
    rep = report.build(experiment)
    assert rep.warnings == [] and rep.scope == f"This report covers all 9 finished runs in {experiment}."


def test_a_results_folder_reports_every_experiment_it_can(experiment):
    """`report results/`: an experiment with no finished run (its first run still training) is a warning, and the
    experiments after it are still reported; only when none can be is it an error."""
    root = experiment.parent
    early = root / "a_early"  # sorts before "tiny"
    early.mkdir()
    run = shutil.copytree(experiment / run_folder_names(experiment)[0], early / run_folder_names(experiment)[0])
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running", "final": None}))
    (experiment / "report.md").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert f"warning: no report for {early}: no finished runs" in result.output.replace("\n", " ")
    assert (experiment / "report.md").exists()
    shutil.copytree(early, root / "b_early")
    shutil.rmtree(experiment)
    none = CliRunner().invoke(app, ["report", str(root)])
    assert none.exit_code == 2 and "no experiment under" in none.output and "could be reported (2)" in none.output
