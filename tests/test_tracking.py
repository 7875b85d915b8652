"""tensorboard=true: every epoch's metrics as TensorBoard events in the run folder, read back here."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from normbench import results, runner
from normbench.cli import app
from normbench.config import compose, config_hash, run_id
from normbench.train import Progress

from conftest import one_error_line, tiny_run_overrides

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def events(folder) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_epoch_is_logged_with_the_metrics_csv_values(results_dir):
    cfg = compose(tiny_run_overrides(results_dir, "mlp", "bn", epochs=3, tensorboard="true"))
    runner.execute(cfg)
    folder = results.run_dir(cfg)
    logged, metrics = events(folder), results.read_metrics(folder)
    assert {"loss/train", "loss/test", "accuracy/test", "accuracy/test_batch_stats", "lr"} <= set(logged)
    for column, tag in (("train_loss", "loss/train"), ("test_acc", "accuracy/test"), ("lr", "lr")):
        assert [step for step, _ in logged[tag]] == [1, 2, 3]
        assert [v for _, v in logged[tag]] == pytest.approx(metrics[column].tolist(), rel=1e-6)


class KilledBeforeItsEvents(Progress):
    """A kill after epoch 2's checkpoint, in the middle of logging it."""

    def epoch_end(self, record) -> None:
        if record.epoch == 2:
            raise KeyboardInterrupt


def test_a_resumed_run_logs_every_epoch_once(results_dir):
    cfg = compose(tiny_run_overrides(results_dir, "mlp", "ln", epochs=3, tensorboard="true"))
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cfg, KilledBeforeItsEvents())
    runner.execute(cfg)  # resumes from the epoch-2 checkpoint
    logged = events(results.run_dir(cfg))
    assert [step for step, _ in logged["loss/train"]] == [1, 2, 3]


def test_off_by_default_writes_nothing_and_never_changes_the_run_id(results_dir):
    plain = compose(tiny_run_overrides(results_dir))
    assert plain.tensorboard is False
    runner.execute(plain)
    assert not (results.run_dir(plain) / "tensorboard").exists()
    logged = compose(tiny_run_overrides(results_dir, tensorboard="true"))
    assert run_id(logged) == run_id(plain) and config_hash(logged) == config_hash(plain)


def test_without_the_extra_it_is_one_line_before_training(results_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    result = CliRunner().invoke(app, ["run", *tiny_run_overrides(results_dir, tensorboard="true")])
    assert result.exit_code == 2
    one_error_line(result, "normbench[tensorboard]")
    assert not results_dir.exists() or not any(results_dir.rglob("summary.json"))


def test_a_tensorboard_folder_that_leads_out_of_results_dir_is_never_written_through(results_dir, tmp_path):
    cfg = compose(tiny_run_overrides(results_dir, "mlp", "ln", epochs=2, tensorboard="true"))
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cfg, KilledBeforeItsEvents())  # interrupted: resumed below
    folder = results.run_dir(cfg)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / "tensorboard").rename(tmp_path / "kept")
    (folder / "tensorboard").symlink_to(outside, target_is_directory=True)
    result = CliRunner().invoke(app, ["run", *tiny_run_overrides(results_dir, "mlp", "ln", epochs=2,
                                                                 tensorboard="true")])
    one_error_line(result, "tensorboard leads to", "outside results_dir")
    assert list(outside.iterdir()) == []
