"""The training loop: records, the three BN evaluations, determinism, divergence, lr scaling and schedules."""

from __future__ import annotations

import copy
import dataclasses
import math

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import tiny_run_overrides
from normbench import runner
from normbench.config import compose, effective_lr
from normbench.data import load_data
from normbench.models import build_model
from normbench.norms import NORMS
from normbench.results import METRIC_COLUMNS, read_metrics, read_summary
from normbench.evaluation import batch_statistics, evaluate, evaluate_batch_stats, recomputed_statistics
from normbench.train import EpochRecord, decay_groups, fit, lr_factor, make_optimizer

CPU = torch.device("cpu")
TIMING = ["seconds", "samples_per_s"]


def setup(results_dir, model="mlp", norm="bn", *extra):
    cfg = compose([*tiny_run_overrides(results_dir, model, norm), *extra])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    return cfg, data, net


def test_records_have_every_field(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "bn", "epochs=2")
    result = fit(cfg, net, data)
    assert [f.name for f in dataclasses.fields(EpochRecord)] == METRIC_COLUMNS
    assert result.status == "completed" and result.diverged_step is None
    assert result.steps_per_epoch == 128 // 16
    assert [r.epoch for r in result.records] == [1, 2]
    assert [r.step for r in result.records] == [8, 16]
    for r in result.records:
        for key in METRIC_COLUMNS:
            assert math.isfinite(getattr(r, key)), key
        assert r.lr == pytest.approx(effective_lr(cfg)) == pytest.approx(0.1 * 16 / 32)
        assert r.train_loss > 0 and r.test_loss > 0
        assert 0 <= r.train_acc <= 100 and 0 <= r.test_acc <= 100
        assert r.samples_per_s > 0
    assert 0 < result.records[0].seconds < result.records[1].seconds
    assert result.records[1].train_loss < result.records[0].train_loss  # it learns the synthetic classes
    # test metrics are those of the final model in eval mode
    loss, acc = evaluate(net, data.test_x, data.test_y, 1000)
    assert (loss, acc) == pytest.approx((result.records[-1].test_loss, result.records[-1].test_acc))


FIT_CASES = [("cnn", n) for n in NORMS.names()] + [("mlp", "bn"), ("mlp", "ln"), ("rnn", "bn"), ("rnn", "ln")]


@pytest.mark.parametrize("model,norm", FIT_CASES, ids=[f"{m}-{n}" for m, n in FIT_CASES])
def test_bn_only_metrics_are_nan_without_bn(results_dir, model, norm):
    cfg, data, net = setup(results_dir, model, norm)
    record = fit(cfg, net, data).records[-1]
    assert math.isfinite(record.test_acc)
    if norm in ("bn", "brn"):  # the batch-dependent norms, whose extra evaluations exist
        assert math.isfinite(record.test_acc_batch_stats) and math.isfinite(record.test_acc_precise)
    else:
        assert math.isnan(record.test_acc_batch_stats) and math.isnan(record.test_acc_precise)


def test_bn_without_running_stats_has_no_precise_accuracy(results_dir):
    cfg, data, net = setup(results_dir, "cnn", "bn", "norm.track_running_stats=false")
    record = fit(cfg, net, data).records[-1]
    assert math.isfinite(record.test_acc_batch_stats)
    assert math.isnan(record.test_acc_precise)


def test_bn_evaluations_can_be_switched_off(results_dir):
    cfg, data, net = setup(results_dir, "cnn", "bn", "eval.batch_stats=false", "eval.precise_bn=false")
    record = fit(cfg, net, data).records[-1]
    assert math.isnan(record.test_acc_batch_stats) and math.isnan(record.test_acc_precise)


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in net.named_buffers()}


def _trained_bn_mlp(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "bn")
    net.train()
    with torch.no_grad():
        for s in range(0, 128, 16):  # move the running averages away from their initial values
            net(data.train_x[s:s + 16])
    return cfg, data, net


def test_evaluate_batch_stats_uses_batch_statistics_and_leaves_running_stats(results_dir):
    cfg, data, net = _trained_bn_mlp(results_dir)
    x, y = data.test_x[:50], data.test_y[:50]  # 50 = 3 batches of 16 + 2: the last batch is filled up
    before = _buffers(net)
    acc = evaluate_batch_stats(net, x, y, 16)
    after = _buffers(net)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # reference: train-mode forward of a copy, over batches of exactly 16 wrapping around the test set
    ref = copy.deepcopy(net).train()
    idx = torch.arange(64) % 50
    with torch.no_grad():
        hits = torch.cat([ref(x[idx[s:s + 16]]).argmax(1) == y[idx[s:s + 16]] for s in range(0, 64, 16)])
    assert acc == pytest.approx(100.0 * hits[:50].sum().item() / 50)
    # and it differs from eval mode here (the running averages are from a few batches only)
    with torch.no_grad():
        eval_logits = net.eval()(x)
        train_logits = copy.deepcopy(net).train()(x[:16])
    assert not torch.allclose(eval_logits[:16], train_logits)


def test_batch_statistics_context_restores_modes(results_dir):
    _, _, net = _trained_bn_mlp(results_dir)
    net.train()
    bn = net[2][0]
    with batch_statistics(net, 16):
        assert "forward" in vars(bn)  # the ghost-batch forward
        assert not net[1].training
    assert "forward" not in vars(bn)
    assert bn.training and bn.track_running_stats and net[1].training


@pytest.mark.parametrize("norm", ["bn", "bn_shared"])
def test_evaluate_batch_stats_matches_train_mode_forwards_in_the_rnn(results_dir, norm):
    cfg, data, net = setup(results_dir, "rnn", norm)
    x, y = data.test_x[:40], data.test_y[:40]
    acc = evaluate_batch_stats(net, x, y, 8, eval_batch_size=16)
    ref = copy.deepcopy(net)
    for m in ref.modules():  # train-mode BN without touching its running averages
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False
    ref.train()
    with torch.no_grad():
        hits = torch.cat([ref(x[s:s + 8]).argmax(1) == y[s:s + 8] for s in range(0, 40, 8)])
    assert acc == pytest.approx(100.0 * hits.sum().item() / 40)


def test_recomputed_statistics_are_population_statistics_and_restored(results_dir):
    _, data, net = _trained_bn_mlp(results_dir)
    bn = net[2][0]
    before = _buffers(net)
    x = data.train_x[:96]
    with torch.no_grad():
        z = net[1](net[0](x))  # the first BN's input, (96, width)
    with recomputed_statistics(net, x, 32):
        # the statistics of all 96 values, not an average of the three chunks' variances
        torch.testing.assert_close(bn.running_mean, z.mean(0))
        torch.testing.assert_close(bn.running_var, z.var(0))
        assert torch.equal(bn.num_batches_tracked, before["2.0.num_batches_tracked"])
        assert not net.training
        inside = evaluate(net, data.test_x, data.test_y, 1000)
    after = _buffers(net)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert bn.momentum == 0.1
    assert inside != evaluate(net, data.test_x, data.test_y, 1000)


def test_recomputed_mean_is_population_mean_with_uneven_chunks(results_dir):
    _, data, net = _trained_bn_mlp(results_dir)
    x = data.train_x[:70]  # chunks of 32, 32, 6
    with torch.no_grad():
        z = net[1](net[0](x))
    with recomputed_statistics(net, x, 32):
        torch.testing.assert_close(net[2][0].running_mean, z.mean(0))


def test_precise_bn_with_trailing_chunk_of_one(results_dir):
    # 129 training samples, recomputed in chunks of eval_batch_size=64: 64 + 64 + 1
    cfg, data, net = setup(results_dir, "mlp", "bn", "data.num_train=129", "eval_batch_size=64")
    record = fit(cfg, net, data).records[-1]
    assert math.isfinite(record.test_acc_precise)


# ---- reproducibility and divergence -------------------------------------------------------------------


def _metrics_without_timing(folder) -> pd.DataFrame:
    return read_metrics(folder).drop(columns=TIMING)


def test_same_seed_same_metrics(tmp_path):
    def run(results, seed):
        cfg = compose([*tiny_run_overrides(tmp_path / results, "cnn", "bn"), "epochs=2", f"seed={seed}"])
        return runner.execute(cfg).folder

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.name == b.name and a != b
    pd.testing.assert_frame_equal(_metrics_without_timing(a), _metrics_without_timing(b))
    assert len(read_metrics(a)) == 2
    assert not _metrics_without_timing(a).equals(_metrics_without_timing(c))
    sa, sb = read_summary(a), read_summary(b)
    assert {k: v for k, v in sa["final"].items() if k not in TIMING} == \
        {k: v for k, v in sb["final"].items() if k not in TIMING}


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_huge_lr_diverges_cleanly(results_dir, norm):
    cfg = compose([*tiny_run_overrides(results_dir, "mlp", norm), "lr=1e6", "epochs=3"])
    result = runner.execute(cfg)  # no exception
    summary = result.summary
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_step"], int) and 1 <= summary["diverged_step"] <= 8
    assert summary["epochs_completed"] == 0 and summary["final"] is None and summary["steps"] == 0
    assert read_summary(result.folder)["status"] == "diverged"
    metrics = read_metrics(result.folder)
    assert len(metrics) == 1  # training stopped in the first epoch
    assert metrics["step"].iloc[0] == summary["diverged_step"]
    assert math.isnan(metrics["train_loss"].iloc[0]) and math.isnan(metrics["test_acc"].iloc[0])


def test_diverged_step_is_the_first_non_finite_loss(results_dir, monkeypatch):
    cfg, data, net = setup(results_dir, "mlp", "ln", "epochs=2")
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(logits, y, *a, **k):
        loss = real(logits, y, *a, **k)
        if logits.requires_grad:  # training steps only
            calls["n"] += 1
            if calls["n"] == 11:  # the 3rd step of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr("normbench.train.F.cross_entropy", poisoned)
    result = fit(cfg, net, data)
    assert result.status == "diverged" and result.diverged_step == 11
    assert [r.epoch for r in result.records] == [1, 2]
    assert math.isfinite(result.records[0].test_acc) and math.isnan(result.records[1].test_acc)


# ---- learning rate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling,expected", [("linear", 0.1 * 128 / 32), ("sqrt", 0.1 * 2.0), ("none", 0.1)])
def test_effective_lr(scaling, expected):
    cfg = compose(["batch_size=128", "base_batch_size=32", "lr=0.1", f"lr_scaling={scaling}"])
    assert effective_lr(cfg) == pytest.approx(expected)
    small = compose(["batch_size=2", "lr=0.1", f"lr_scaling={scaling}"])
    assert effective_lr(small) == pytest.approx({"linear": 0.1 / 16, "sqrt": 0.1 / 4, "none": 0.1}[scaling])


def _factors(*overrides, total=100, per_epoch=10):
    cfg = compose(list(overrides))
    return [lr_factor(cfg, s, total, per_epoch) for s in range(total)]


def test_lr_schedule_constant():
    assert _factors() == [1.0] * 100


def test_lr_schedule_warmup():
    f = _factors("optim.warmup_epochs=1")
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10:] == [1.0] * 90
    f = _factors("optim.warmup_epochs=0.5")  # 5 steps
    assert f[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_lr_schedule_cosine():
    f = _factors("optim.schedule=cosine")
    assert f[0] == 1.0 and f[50] == pytest.approx(0.5) and f[25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in zip(f, f[1:]))
    cfg = compose(["optim.schedule=cosine"])
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.0)
    f = _factors("optim.schedule=cosine", "optim.warmup_epochs=1", total=110)
    assert f[9] == 1.0 and f[10] == 1.0 and f[60] == pytest.approx(0.5)


def test_lr_schedule_step():
    f = _factors("optim.schedule=step")  # milestones at 0.5 and 0.75 of training, gamma 0.1
    assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
    assert f[75] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)
    f = _factors("optim.schedule=step", "optim.step_milestones=[0.3]", "optim.step_gamma=0.5")
    assert f[29] == 1.0 and f[30] == 0.5 and f[99] == 0.5


def test_schedule_is_applied_during_fit(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "ln", "epochs=2", "optim.schedule=step", "lr_scaling=none",
                           "optim.step_milestones=[0.5]")
    records = fit(cfg, net, data).records
    # the lr after each epoch is the one the next step uses: the decay sets in at step 8 of 16
    assert records[0].lr == pytest.approx(0.1 * 0.1)
    assert records[1].lr == pytest.approx(0.1 * 0.1)
    cfg, data, net = setup(results_dir, "mlp", "ln", "optim=adam", "lr=0.001", "optim.warmup_epochs=2",
                           "epochs=1")
    record = fit(cfg, net, data).records[0]
    assert record.lr == pytest.approx(effective_lr(cfg) * lr_factor(cfg, 8, 8, 8)) == pytest.approx(0.0005 * 9 / 16)


# ---- weight decay of norm parameters and biases ---------------------------------------------------------


OPTIM_CASES = [("mlp", "bn"), ("mlp", "ln"), ("mlp", "gn"), ("cnn", "in"), ("cnn", "none"), ("resnet20", "bn"),
               ("resnet20", "gn"), ("rnn", "bn"), ("rnn", "bn_shared"), ("rnn", "ln")]


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_unset_norm_weight_decay_keeps_one_group(results_dir, optim):
    cfg, _, net = setup(results_dir, "cnn", "bn", f"optim={optim}", "optim.weight_decay=5e-4")
    assert cfg.optim.norm_weight_decay is None
    opt = make_optimizer(cfg, net)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(net.parameters())
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    # the same state layout as an optimizer over model.parameters(), so older checkpoints resume
    plain = type(opt)(net.parameters(), **{k: v for k, v in opt.defaults.items()})
    assert opt.state_dict() == plain.state_dict()


@pytest.mark.parametrize("model,norm", OPTIM_CASES, ids=[f"{m}-{n}" for m, n in OPTIM_CASES])
def test_norm_weight_decay_groups_norm_parameters_and_biases(results_dir, model, norm):
    extra = ["model.cell=gru"] if norm == "ln" and model == "rnn" else []  # the GRU has bias_hn too
    cfg, _, net = setup(results_dir, model, norm, "optim.weight_decay=5e-4", "optim.norm_weight_decay=0", *extra)
    opt = make_optimizer(cfg, net)
    by_id = {id(p): name for name, p in net.named_parameters()}
    groups = {g["weight_decay"]: [by_id[id(p)] for p in g["params"]] for g in opt.param_groups}
    # in these models, the norms' scales and shifts and the biases are exactly the 1-D parameters
    one_d = [name for name, p in net.named_parameters() if p.dim() == 1]
    assert groups[0.0] == one_d
    assert groups[5e-4] == [name for name, p in net.named_parameters() if p.dim() > 1]


def test_norm_weight_decay_applies_per_group(results_dir):
    cfg, _, net = setup(results_dir, "mlp", "bn", "optim.weight_decay=0.5", "optim.norm_weight_decay=0",
                        "lr_scaling=none", "lr=0.1")
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    opt = make_optimizer(cfg, net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # with no gradient, only weight decay moves a parameter
    for name, p in net.named_parameters():
        expected = before[name] if p.dim() == 1 else before[name] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_decay_groups_leave_out_an_empty_group():
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    groups = decay_groups(net, 1e-4, 0.0)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
