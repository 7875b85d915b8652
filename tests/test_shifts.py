"""Test-time input shifts (eval.shifts): the transforms, their validation, and their evaluation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import tiny_run_overrides
from normbench import runner, shifts
from normbench.config import SHIFT_SEVERITY, compose, parse_shift, shift_name
from normbench.data import load_data
from normbench.errors import UserError
from normbench.models import build_model
from normbench.evaluation import evaluate, recomputed_statistics
from normbench.train import fit

CPU = torch.device("cpu")


def images(n=6, c=3, h=5, w=4, seed=0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def setup(results_dir, model="cnn", norm="bn", *extra):
    cfg = compose([*tiny_run_overrides(results_dir, model, norm), *extra])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    return cfg, data, net


# ---- the transforms -----------------------------------------------------------------------------------------


def test_every_kind_the_config_accepts_has_a_transform():
    assert set(shifts.SHIFTS) == set(SHIFT_SEVERITY)


def test_contrast_scales_each_image_and_channel_around_its_own_mean():
    x = images()
    out = shifts.shifted(x, "contrast:0.5", seed=0)
    mean = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    torch.testing.assert_close(out.mean(dim=(2, 3), keepdim=True), mean)  # each image keeps its means
    torch.testing.assert_close(out - mean, 0.5 * (x - mean))
    torch.testing.assert_close(out.std(dim=(2, 3)), 0.5 * x.std(dim=(2, 3)))
    torch.testing.assert_close(shifts.shifted(x, "contrast:1", seed=0), x)


def test_brightness_adds_an_offset():
    x = images()
    torch.testing.assert_close(shifts.shifted(x, "brightness:-0.25", seed=0), x - 0.25)
    assert torch.equal(shifts.shifted(x, "brightness:0", seed=0), x)


def test_noise_is_seeded_gaussian_shared_across_severities():
    x = images(n=64, h=16, w=16)
    e1 = shifts.shifted(x, "noise:0.1", seed=3) - x
    e2 = shifts.shifted(x, "noise:0.2", seed=3) - x
    torch.testing.assert_close(e2, 2 * e1)  # one draw, scaled: the severity curve is smooth
    assert e1.std().item() == pytest.approx(0.1, rel=0.05) and abs(e1.mean().item()) < 0.005
    assert torch.equal(shifts.shifted(x, "noise:0.1", seed=3), shifts.shifted(x, "noise:0.1", seed=3))
    assert not torch.equal(shifts.shifted(x, "noise:0.1", seed=4), shifts.shifted(x, "noise:0.1", seed=3))
    assert torch.equal(shifts.shifted(x, "noise:0", seed=3), x)


def test_shifts_leave_their_input_alone():
    x = images()
    before = x.clone()
    for text in ("contrast:2", "brightness:1", "noise:0.5"):
        shifts.shifted(x, text, seed=0)
    assert torch.equal(x, before)


# ---- the config ------------------------------------------------------------------------------------------------


def test_names_are_canonical():
    assert parse_shift("contrast:0.50") == ("contrast", 0.5)
    assert shift_name(*parse_shift("contrast:0.50")) == "contrast:0.5"
    assert shift_name(*parse_shift("noise:2.0")) == "noise:2"
    assert shift_name(*parse_shift("brightness:-1e-1")) == "brightness:-0.1"


def test_shifts_compose_from_the_command_line():
    cfg = compose(["data=synthetic", "eval.shifts=[contrast:0.5,brightness:-0.2,noise:0.1]"])
    assert cfg.eval.shifts == ["contrast:0.5", "brightness:-0.2", "noise:0.1"]
    assert compose(["data=synthetic"]).eval.shifts == []


@pytest.mark.parametrize("value", ["[blur:1]", "[contrast]", "[contrast:]", "[contrast:x]", "[contrast:0]",
                                   "[contrast:-1]", "[noise:-0.1]", "[brightness:nan]", "[noise:inf]",
                                   "[contrast:0.5,contrast:0.50]", "[0.5]", "[CONTRAST:0.5]"])
def test_bad_shifts_are_refused_at_compose_time(value):
    with pytest.raises(UserError, match=r"^eval\.shifts must be a list of distinct KIND:SEVERITY, KIND one of "
                                        r"contrast .*, got \["):
        compose(["data=synthetic", f"eval.shifts={value}"])


def test_a_single_string_is_refused_by_type():
    with pytest.raises(UserError, match="eval.shifts"):
        compose(["data=synthetic", "eval.shifts=contrast:0.5"])


# ---- the evaluation -------------------------------------------------------------------------------------------


def test_evaluation_adds_both_accuracies_and_restores_bn(results_dir):
    cfg, data, net = setup(results_dir, "cnn", "bn", "eval.shifts=[contrast:0.5,noise:1]")
    fit(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, shifts=[])), net, data)
    before = {k: b.clone() for k, b in net.named_buffers()}
    out = shifts.evaluate_shifts(net, data, cfg)
    assert list(out) == ["contrast:0.5", "noise:1"]
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k  # the running averages are back
    x = shifts.shifted(data.test_x, "noise:1", cfg.seed)
    assert out["noise:1"]["test_acc"] == evaluate(net, x, data.test_y, cfg.eval_batch_size)[1]
    with recomputed_statistics(net, x, cfg.eval_batch_size):  # BN adapted to the shifted test inputs
        adapted = evaluate(net, x, data.test_y, cfg.eval_batch_size)[1]
    assert out["noise:1"]["test_acc_adapted"] == adapted
    assert all(0 <= v <= 100 for r in out.values() for v in r.values())


@pytest.mark.parametrize("norm,extra", [("gn", ()), ("bn", ("norm.track_running_stats=false",))])
def test_no_adaptation_without_running_averages(results_dir, norm, extra):
    cfg, data, net = setup(results_dir, "cnn", norm, "eval.shifts=[brightness:1]", *extra)
    out = shifts.evaluate_shifts(net, data, cfg)
    assert out["brightness:1"]["test_acc_adapted"] is None and math.isfinite(out["brightness:1"]["test_acc"])


def test_no_shifts_evaluates_nothing(results_dir, monkeypatch):
    cfg, data, net = setup(results_dir)
    monkeypatch.setattr("normbench.shifts.evaluate", lambda *a, **k: pytest.fail("evaluated with no shift"))
    assert shifts.evaluate_shifts(net, data, cfg) == {}


def test_shifts_change_no_training_metric(results_dir):
    """The same run with and without shifts: identical records, and results only in summary['shifts']."""
    plain = runner.execute(compose(tiny_run_overrides(results_dir, "cnn", "bn")))
    shifted = runner.execute(compose([*tiny_run_overrides(results_dir, "cnn", "bn"),
                                      "eval.shifts=[contrast:2,brightness:0.5]"]))
    assert "shifts" not in plain.summary
    assert set(shifted.summary["shifts"]) == {"contrast:2", "brightness:0.5"}
    assert set(shifted.summary["shifts"]["contrast:2"]) == {"test_acc", "test_acc_adapted"}
    timing = ("seconds", "samples_per_s")
    strip = lambda s: {k: v for k, v in s["final"].items() if k not in timing}  # noqa: E731
    assert strip(plain.summary) == strip(shifted.summary)
    assert plain.folder != shifted.folder  # a different result: a different run id
