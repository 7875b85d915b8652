"""Speed options: they run, they are part of the run id when they change numbers, and they train."""

import math

import torch

from normbench import runner
from normbench.config import compose, run_id
from normbench.train import autocast, compiled

from conftest import tiny_run_overrides


def test_precision_and_compile_change_the_run_id_channels_last_does_not(tmp_path):
    base = compose(tiny_run_overrides(tmp_path))
    assert run_id(compose([*tiny_run_overrides(tmp_path), "perf.precision=bf16"])) != run_id(base)
    assert run_id(compose([*tiny_run_overrides(tmp_path), "perf.compile=default"])) != run_id(base)
    assert run_id(compose([*tiny_run_overrides(tmp_path), "perf.channels_last=false"])) == run_id(base)


def test_bf16_autocast_trains(tmp_path):
    cfg = compose([*tiny_run_overrides(tmp_path, "cnn", "bn"), "perf.precision=bf16", "epochs=2"])
    with autocast(cfg, torch.device("cpu"))():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    summary = runner.execute(cfg).summary
    assert summary["status"] == "completed" and math.isfinite(summary["final"]["test_acc"])


def test_torch_compile_trains_and_evaluates_the_plain_module(tmp_path):
    cfg = compose([*tiny_run_overrides(tmp_path, "mlp", "bn"), "perf.compile=default", "model.width=16"])
    data, model = runner.prepare(cfg, torch.device("cpu"))
    assert compiled(cfg, model) is not model
    summary = runner.execute(cfg).summary
    assert summary["status"] == "completed"
    assert math.isfinite(summary["final"]["test_acc_batch_stats"]) and math.isfinite(summary["final"]["test_acc_precise"])
