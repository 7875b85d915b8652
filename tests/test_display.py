"""What people read while work runs and after: the sweep's time left from cost estimates, each worker's
run, plain lines off a terminal, no wrapping at 80 columns, `list` and `report` output."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from normbench import progress, runner
from normbench import sweep as sweeps
from normbench.cli import app
from normbench.config import compose
from normbench.sweep.planning import Planned
from normbench.train import EpochRecord

from conftest import tiny_run_overrides


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def planned_runs(costs: dict[str, float]) -> list[Planned]:
    cfg = compose(["data=synthetic"])
    return [Planned([f"seed={i}"], cfg, "new", cost=c, run_id=rid) for i, (rid, c) in enumerate(costs.items())]


def finished(acc: float = 90.0) -> dict:
    return {"status": "completed", "final": {"test_acc": acc}}


def test_time_left_comes_from_the_cost_of_what_is_left_not_the_run_count(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    display = progress.SweepDisplay(Console(file=out, width=200))
    display.start_sweep(planned_runs({"small": 1.0, "big": 8.0, "mid": 3.0}), retry_failed=False)
    assert display.time_left() is None  # nothing finished yet: no rate to go by
    clock.now += 10.0
    display.runs_changed({"small": finished(), "big": None, "mid": None})
    assert display.time_left() == 11.0 * 10.0 / 1.0  # 11 cost units left at 1 unit per 10 s
    assert "[1/3] small: completed test_acc 90.00%  (2 min left)" in out.getvalue()


def test_workers_runs_have_their_own_lines_and_no_bar_says_loss_without_one():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with progress.SweepDisplay(console) as display:
        display.planned(None)
        display.start_sweep(planned_runs({"a": 1.0, "b": 1.0, "c": 1.0}), retry_failed=False)
        display.runs_changed({"a": None, "b": None, "c": None}, training=["a", "b"])
        shown = {t.description.strip() for t in display.bar.tasks}
        assert {"training a", "training b"} <= shown
        display.runs_changed({"a": finished(), "b": None, "c": None}, training=["b", "c"])
        shown = {t.description.strip() for t in display.bar.tasks}
        assert "training a" not in shown and {"training b", "training c"} <= shown
        assert all("loss" not in str(t.fields.get("info", "")) for t in display.bar.tasks)


def test_off_a_terminal_a_long_epoch_says_where_it_is(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = progress.EpochProgress(epochs=3, batch_size=8, out=Console(file=out, width=200))
    bar.epoch_start(1, steps=1000)
    bar.update(10, 2.0)
    assert out.getvalue() == ""  # not yet a minute
    clock.now += progress.PLAIN_EVERY_SECONDS
    bar.update(500, 1.25)
    assert "epoch 1/3: step 500/1000, loss 1.2500" in out.getvalue()


def test_off_a_terminal_a_sweep_prints_each_epoch_of_long_runs_only():
    out = io.StringIO()
    display = progress.SweepDisplay(Console(file=out, width=200))
    display.run_start("r", 2, 8)
    nan = float("nan")
    display.epoch_end(EpochRecord(1, 10, 0.1, 1.0, 50.0, 1.0, 50.0, nan, nan, 2.0, 100.0))
    assert out.getvalue() == ""
    display.epoch_end(EpochRecord(2, 20, 0.1, 1.0, 50.0, 1.0, 50.0, nan, nan, 2 * progress.LONG_RUN_SECONDS, 100.0))
    assert "r epoch 2/2" in out.getvalue()


def test_workers_only_where_the_estimated_training_pays_for_them(monkeypatch):
    monkeypatch.setattr(sweeps.planning, "SECONDS_PER_COST", 1.0)
    tiny = planned_runs({"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0})  # 8 s of training in all
    jobs, note = sweeps.paying_jobs(tiny, 2, retry_failed=False)
    assert jobs == 1 and "trains sequentially" in note
    big = planned_runs({"a": 600.0, "b": 600.0})
    assert sweeps.paying_jobs(big, 2, retry_failed=False) == (2, None)


def test_plain_output_is_not_cut_at_80_columns(results_dir, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    args = tiny_run_overrides(results_dir)
    for seed in (0, 1):
        runner.execute(compose([*args, f"seed={seed}", "batch_size=8"]))
        runner.execute(compose([*args, f"seed={seed}"]))
    result = CliRunner().invoke(app, ["report", str(results_dir / "default")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(len(line) > 80 for line in lines)
    for line in lines:  # a cell "94.0 ± 2.6" is never split over two lines
        if "±" in line:
            assert line.split("±")[1].strip()[:1].isdigit(), line


def test_report_prints_the_verdict_as_sweep_does(results_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    args = tiny_run_overrides(results_dir)
    for seed in (0, 1):
        for batch in (8, 16):
            runner.execute(compose([*args, f"seed={seed}", f"batch_size={batch}"]))
    result = CliRunner().invoke(app, ["report", str(results_dir / "default")])
    assert result.exit_code == 0, result.output
    assert "synthetic / mlp" in result.output and "points" in result.output  # a panel and its sentences


def test_list_shows_whole_descriptions_run_counts_and_your_options(tmp_path):
    mine = tmp_path / "configs" / "norm"
    mine.mkdir(parents=True)
    (mine / "gn4.yaml").write_text("# Group norm with 4 groups, for my narrow layers; a second sentence.\n"
                                   "defaults:\n  - gn\n  - _self_\nnum_groups: 4\n")
    result = CliRunner().invoke(app, ["list", "--config-dir", str(tmp_path / "configs")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "gn4 *" in result.output and "for my narrow layers; a second sentence." in result.output
    assert "* from your config folder" in result.output
    assert "[102 runs" in result.output  # quick: 3 seeds x (4 x 7 + 2 x 3)
    packaged = Path(__file__).parent.parent / "normbench" / "conf" / "experiment" / "why_bn.yaml"
    first_paragraph = packaged.read_text().split("\n#\n")[0]
    last_words = first_paragraph.splitlines()[-1].split()[-3:]
    assert " ".join(last_words) in result.output  # the whole paragraph, not its first line


def test_list_says_which_of_your_files_make_every_command_refuse_your_config_folder(tmp_path):
    configs = tmp_path / "configs"
    for group, name, text in [("norm", "broken", "defaults:\n  - bn\nmomentum: [\n"),
                              ("model", "evil", "defaults:\n  - mlp\n  - _self_\n_target_: os.system\n"),
                              ("experiment", "mine", "# @package _global_\n# My one config.\nepochs: 3\n")]:
        (configs / group).mkdir(parents=True, exist_ok=True)
        (configs / group / f"{name}.yaml").write_text(text)
    result = CliRunner().invoke(app, ["list", "--config-dir", str(configs)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = {ln.split()[0]: ln for ln in result.output.splitlines() if ln.strip()}
    assert "UNUSABLE" in lines["broken"] and "YAML syntax error" in lines["broken"]
    assert "UNUSABLE" in lines["evil"] and "_target_ is refused" in lines["evil"]
    assert "My one config. [1 run]" in lines["mine"]


def test_dry_run_gives_the_estimated_training_time(results_dir):
    result = CliRunner().invoke(app, ["sweep", "--dry-run", *tiny_run_overrides(results_dir), "seed=0,1"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "estimated training time: about" in result.output


def test_dry_run_says_what_jobs_would_do_and_refuses_what_the_sweep_refuses(results_dir):
    args = ["sweep", "--dry-run", "--jobs", "2", *tiny_run_overrides(results_dir), "seed=0,1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "too little to pay for starting 1 more worker process" in result.output
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300", "NORMBENCH_WORKER_START_SECONDS": "soon"})
    assert result.exit_code == 2 and "NORMBENCH_WORKER_START_SECONDS must be a number" in result.output
    assert result.output.count("\n") == 1  # refused before planning, as the sweep itself does
    empty = CliRunner().invoke(app, args, env={"COLUMNS": "300", "NORMBENCH_WORKER_START_SECONDS": ""})
    assert empty.exit_code == 0 and "about 6 s each" in empty.output  # empty: unset
    result = CliRunner().invoke(app, [*args, "hydra/launcher=slurm"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "--jobs runs processes on this machine" in result.output
    assert "runs:" not in result.output  # refused before planning


def test_progress_lines_name_the_varied_settings_a_run_id_does_not():
    out = io.StringIO()
    display = progress.SweepDisplay(Console(file=out, width=300))
    cfg = compose(["data=synthetic"])
    runs = [Planned(["model=mlp", f"norm_batch_size={n}", "seed=0"], cfg, "new", cost=1.0, run_id=f"mlp-bn-{n}")
            for n in (2, 8)]
    display.start_sweep(runs, retry_failed=False)
    display.runs_changed({"mlp-bn-2": finished(), "mlp-bn-8": None})
    assert "mlp-bn-2 (norm_batch_size=2): completed" in out.getvalue()


def test_the_worker_start_cost_can_be_set_and_is_checked(monkeypatch):
    from normbench.errors import UserError

    monkeypatch.setattr(sweeps.planning, "SECONDS_PER_COST", 1.0)
    tiny = planned_runs({"a": 2.0, "b": 2.0})
    monkeypatch.setenv("NORMBENCH_WORKER_START_SECONDS", "0")
    assert sweeps.paying_jobs(tiny, 2, retry_failed=False) == (2, None)
    monkeypatch.setenv("NORMBENCH_WORKER_START_SECONDS", "soon")
    try:
        sweeps.paying_jobs(tiny, 2, retry_failed=False)
    except UserError as e:
        assert "NORMBENCH_WORKER_START_SECONDS" in str(e)
    else:
        raise AssertionError("a bad value was accepted")


def test_list_refuses_a_config_folder_that_does_not_exist(tmp_path):
    result = CliRunner().invoke(app, ["list", "--config-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such directory" in result.output


def test_a_sweep_with_invalid_jobs_says_so_before_training(tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    args = ["data=synthetic", "data.num_train=64", "data.num_test=32", "model.width=16", "epochs=1", "norm=bn",
            "batch_size=1,16", f"results_dir={tmp_path}"]
    out = CliRunner().invoke(app, ["sweep", *args]).output
    note = out.index("1 of the sweep's 2 jobs cannot run")
    assert note < out.index("[1/1]")  # before the first run's line


def test_tables_stay_aligned_where_the_output_cannot_encode_plus_minus():
    """PYTHONIOENCODING=ascii: "±" is written "+/-", and the columns are measured in what is written."""
    from rich.table import Table

    from normbench.display import TRANSLITERATE, _Console

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors=TRANSLITERATE)
    table = Table(title="accuracy, mean ± 95% interval")
    table.add_column("norm")
    table.add_column("2")
    table.add_row("bn", "94.0 ± 2.6")
    table.add_row("ln", "-")
    _Console(file=out, width=60, highlight=False).print(table)
    out.seek(0)
    lines = out.read().splitlines()
    assert "+/-" in lines[0] and any("94.0 +/- 2.6" in line for line in lines)
    body = [line for line in lines[1:] if line.strip()]
    assert len({len(line) for line in body}) == 1, "\n".join(body)
