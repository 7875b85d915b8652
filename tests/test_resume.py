"""A killed run continues from its last checkpoint with exactly the metrics of an uninterrupted run."""

import pandas as pd
import pytest
import torch

from normbench import results, runner
from normbench.config import compose
from normbench.train import Progress

from conftest import tiny_run_overrides

TIMING = ["seconds", "samples_per_s"]


class StopAfter(Progress):
    """Simulates a kill right after epoch `epoch` was checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def epoch_end(self, record) -> None:
        if record.epoch == self.epoch:
            raise KeyboardInterrupt


def metrics(cfg) -> pd.DataFrame:
    return results.read_metrics(results.run_dir(cfg)).drop(columns=TIMING)


@pytest.mark.parametrize("model,norm", [("mlp", "bn"), ("cnn", "gn"), ("rnn", "bn")])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, model, norm):
    extra = ["epochs=3", "optim.schedule=cosine", "data.augment=true"]
    whole = compose([*tiny_run_overrides(tmp_path / "a", model, norm), *extra])
    runner.execute(whole)

    cut = compose([*tiny_run_overrides(tmp_path / "b", model, norm), *extra])
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cut, StopAfter(2))
    folder = results.run_dir(cut)
    assert results.read_summary(folder)["status"] == "running"
    assert torch.load(folder / results.CHECKPOINT, weights_only=True)["epoch"] == 2

    trained = []
    real_fit = runner.fit

    def counting_fit(cfg, model_, data, progress=None, resume=None, on_epoch_end=None):
        trained.append(resume["epoch"] if resume else 0)
        return real_fit(cfg, model_, data, progress, resume, on_epoch_end)

    runner.fit = counting_fit
    try:
        summary = runner.execute(cut).summary
    finally:
        runner.fit = real_fit
    assert trained == [2]  # resumed after epoch 2, not from scratch
    assert summary["status"] == "completed"
    pd.testing.assert_frame_equal(metrics(cut), metrics(whole))
    assert not (folder / results.CHECKPOINT).exists()  # removed once the run completed


def test_keep_checkpoint_keeps_it(tmp_path):
    cfg = compose([*tiny_run_overrides(tmp_path, "mlp", "bn"), "keep_checkpoint=true"])
    runner.execute(cfg)
    state = torch.load(results.run_dir(cfg) / results.CHECKPOINT, weights_only=True)
    assert state["epoch"] == cfg.epochs and state["config_hash"] == results.read_summary(results.run_dir(cfg))["config_hash"]


def test_a_damaged_checkpoint_means_a_fresh_start_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    overrides = [*tiny_run_overrides(tmp_path, "mlp", "bn"), "epochs=2"]
    cfg = compose(overrides)
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cfg, StopAfter(1))
    (results.run_dir(cfg) / results.CHECKPOINT).write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["run", *overrides])
    assert result.exit_code == 0, result.output
    assert "warning: its checkpoint is damaged or not this run's; training again from epoch 1/2" in result.output
    assert results.read_summary(results.run_dir(cfg))["status"] == "completed"
    assert len(results.read_metrics(results.run_dir(cfg))) == 2


def test_temp_files_of_a_killed_write_are_removed_when_the_run_starts_again(tmp_path):
    """SIGKILL between atomic_write's temp file and its rename leaves the temp file; the next start clears it."""
    from normbench import report

    cfg = compose([*tiny_run_overrides(tmp_path, "mlp", "bn"), "epochs=2"])
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cfg, StopAfter(1))
    folder = results.run_dir(cfg)
    metrics_before = (folder / "metrics.csv").read_bytes()
    (folder / f".metrics.csv.k1ll3d{results.TEMP_SUFFIX}").write_text("epoch,st")  # what a kill mid-write leaves
    experiment = folder.parent
    (experiment / f".runs.csv.k1ll3d{results.TEMP_SUFFIX}").write_text("run_id,")
    (experiment / ".notes.tmp").write_text("the user's own file")
    assert results.read_metrics(folder).shape[0] == 1 and (folder / "metrics.csv").read_bytes() == metrics_before

    assert runner.execute(cfg).summary["status"] == "completed"
    assert not list(folder.glob(f".*{results.TEMP_SUFFIX}"))
    report.write(report.build(experiment))
    assert not list(experiment.glob(f".*{results.TEMP_SUFFIX}"))
    assert (experiment / ".notes.tmp").read_text() == "the user's own file"  # not ours: never removed


def test_a_resumed_run_says_so(tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    overrides = [*tiny_run_overrides(tmp_path, "mlp", "bn"), "epochs=3"]
    with pytest.raises(KeyboardInterrupt):
        runner.execute(compose(overrides), StopAfter(1))
    result = CliRunner().invoke(app, ["run", *overrides])
    assert result.exit_code == 0, result.output
    assert "resuming from its checkpoint at epoch 2/3" in result.output


def test_a_run_killed_after_its_last_checkpoint_finishes_without_training_again(tmp_path, monkeypatch):
    import json

    import normbench.train

    cfg = compose([*tiny_run_overrides(tmp_path, "mlp", "bn"), "epochs=2", "keep_checkpoint=true"])
    before = runner.execute(cfg).summary
    folder = results.run_dir(cfg)
    (folder / "summary.json").write_text(json.dumps({**before, "status": "running"}))  # killed before this write
    epochs = []
    real = normbench.train.train_one_epoch
    monkeypatch.setattr(normbench.train, "train_one_epoch", lambda *a, **k: epochs.append(1) or real(*a, **k))
    after = runner.execute(cfg).summary
    assert epochs == [] and after["status"] == "completed" and after["final"] == before["final"]
    # its wall time is the training's (in the checkpoint), not the moment this process took to finish it
    state = torch.load(folder / results.CHECKPOINT, weights_only=True)
    assert after["wall_seconds"] >= state["seconds"] > 0


def test_a_resumed_runs_wall_time_counts_the_epochs_of_the_process_before(tmp_path):
    cfg = compose([*tiny_run_overrides(tmp_path, "mlp", "bn"), "epochs=2"])
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cfg, StopAfter(1))
    path = results.run_dir(cfg) / results.CHECKPOINT
    state = torch.load(path, weights_only=True)
    torch.save({**state, "seconds": 1000.0}, path)  # the first process trained its epoch for 1000 s
    assert runner.execute(cfg).summary["wall_seconds"] >= 1000.0
