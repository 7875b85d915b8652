"""PreciseBN: population statistics recomputed over training samples (docs/protocol.md §3.2).

The recomputed buffers are checked against an independent computation: every BN layer's input,
captured over all chunks, concatenated, and its mean and (unbiased) variance taken at once.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import set_affine, tiny_run_overrides
from normbench import runner
from normbench.config import compose
from normbench.data import load_data
from normbench.models import build_model
from normbench.norms import RecurrentBatchNorm
from normbench.evaluation import is_batch_norm, precise_bn_inputs, recomputed_statistics
from normbench.train import fit

CPU = torch.device("cpu")
TIMING = {"seconds", "samples_per_s"}

CASES = [("mlp", "bn", ()), ("cnn", "bn", ()), ("resnet20", "bn", ()), ("rnn", "bn", ()),
         ("rnn", "bn_shared", ()), ("rnn", "bn", ("model.cell=gru",)), ("rnn", "bn_shared", ("model.cell=gru",))]
IDS = ["mlp", "cnn", "resnet20", "rnn-per_step", "rnn-shared", "gru-per_step", "gru-shared"]


def setup(results_dir, model, norm, *extra):
    cfg = compose([*tiny_run_overrides(results_dir, model, norm), *extra])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    for i, m in enumerate(m for m in net.modules() if is_batch_norm(m)):
        set_affine(m, seed=i)  # so each layer's input depends on how the layers before normalized
    return cfg, data, net


def step_rows(bn: RecurrentBatchNorm, t: int) -> int:
    return 0 if bn.shared else min(t, bn.running_var.shape[0] - 1)


def reference_statistics(model: nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, tuple]:
    """Each BN layer's (mean, unbiased var), shaped like its buffers, over every value of its input,
    with the chunks' train-mode forwards of a copy (BN on batch statistics, running averages off)."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list] = {}

    def capture(name):
        def hook(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs.get("t")
            seen.setdefault(name, []).append((args[0].double(), t))
        return hook

    bns = {name: m for name, m in ref.named_modules() if is_batch_norm(m)}
    for name, m in bns.items():
        m.train()
        m.track_running_stats = False
        m.register_forward_pre_hook(capture(name), with_kwargs=True)
    with torch.no_grad():
        for chunk in torch.tensor_split(x, math.ceil(len(x) / batch_size)):
            ref(chunk)
    out = {}
    for name, m in bns.items():
        if isinstance(m, RecurrentBatchNorm):
            rows: dict[int, list] = {}
            for z, t in seen[name]:
                steps = [(z, t)] if z.dim() == 2 else [(z[s], s) for s in range(len(z))]
                for zs, s in steps:
                    rows.setdefault(step_rows(m, s), []).append(zs)
            values = [torch.cat(rows[r]) for r in range(m.running_mean.shape[0])]  # (values, C) per row
            out[name] = (torch.stack([v.mean(0) for v in values]), torch.stack([v.var(0) for v in values]))
        else:
            values = torch.cat([z.transpose(0, 1).flatten(1) for z, _ in seen[name]], dim=1)  # (C, values)
            out[name] = (values.mean(1), values.var(1))
    return out


@pytest.mark.parametrize("model,norm,extra", CASES, ids=IDS)
@pytest.mark.parametrize("batch_size", [1000, 32], ids=["one_chunk", "chunks"])
def test_recomputed_statistics_are_exact_population_statistics(results_dir, model, norm, extra, batch_size):
    _, data, net = setup(results_dir, model, norm, *extra)
    x = data.train_x[:100]  # in chunks of 32: 25 samples each
    expected = reference_statistics(net, x, batch_size)
    bns = {name: m for name, m in net.named_modules() if is_batch_norm(m)}
    assert bns and set(expected) == set(bns)
    with recomputed_statistics(net, x, batch_size):
        for name, m in bns.items():
            mean, var = expected[name]
            torch.testing.assert_close(m.running_mean, mean.float(), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(m.running_var, var.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model,norm,extra", [c for c in CASES if c[1] == "bn"],
                         ids=[i for i, c in zip(IDS, CASES) if c[1] == "bn"])
def test_one_chunk_equals_pytorch_batch_norm_over_all_samples(results_dir, model, norm, extra):
    """With one chunk, the buffers are those a train-mode forward of all samples leaves at momentum 1."""
    _, data, net = setup(results_dir, model, norm, *extra)
    x = data.train_x[:100]
    ref = copy.deepcopy(net).eval()
    for m in ref.modules():
        if is_batch_norm(m):
            m.train()
            m.momentum = 1.0
    with torch.no_grad():
        ref(x)
    ref_bns = dict(ref.named_modules())
    with recomputed_statistics(net, x, len(x)):
        for name, m in net.named_modules():
            if is_batch_norm(m):
                torch.testing.assert_close(m.running_mean, ref_bns[name].running_mean, msg=name)
                torch.testing.assert_close(m.running_var, ref_bns[name].running_var, msg=name)


def test_shared_recurrent_statistics_weight_every_step_alike(results_dir):
    """Shared recurrent BN: one mean over all steps and samples, not a running average that
    favours the last steps."""
    _, data, net = setup(results_dir, "rnn", "bn_shared")
    x = data.train_x[:64]
    bn = net.cell.norm_x
    with torch.no_grad():
        z = net.cell.w_x(x.permute(2, 0, 1, 3).flatten(2))  # the input projection of every step, (T, N, 4H)
    with recomputed_statistics(net, x, 16):
        torch.testing.assert_close(bn.running_mean[0], z.flatten(0, 1).mean(0))
        torch.testing.assert_close(bn.running_var[0], z.flatten(0, 1).var(0))
        assert not torch.allclose(bn.running_mean[0], z[-8:].flatten(0, 1).mean(0), atol=1e-3)


def test_recomputed_statistics_are_used_in_eval_and_restored(results_dir):
    _, data, net = setup(results_dir, "rnn", "bn")
    before = {k: b.clone() for k, b in net.named_buffers()}
    x = data.train_x[:64]
    with recomputed_statistics(net, x, 16):
        assert not net.training
        assert all(m.track_running_stats for m in net.modules() if is_batch_norm(m))
        with torch.no_grad():
            inside = net(data.test_x[:8])
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k
    with torch.no_grad():
        assert not torch.allclose(inside, net(data.test_x[:8]))


# ---- which samples -------------------------------------------------------------------------------------


def _is_padded_crop(image: torch.Tensor, source: torch.Tensor, pad: int = 4) -> bool:
    c, h, w = source.shape
    padded = F.pad(source, (pad, pad, pad, pad))
    return any(torch.equal(image, padded[:, dy:dy + h, dx:dx + w])
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1))


def _sample_indices(cfg, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval.precise_bn_samples]


def test_precise_bn_inputs_are_training_samples_without_augmentation(results_dir):
    cfg, data, _ = setup(results_dir, "cnn", "bn", "eval.precise_bn_samples=40")
    x = precise_bn_inputs(data, cfg)
    assert torch.equal(x, data.train_x[_sample_indices(cfg, len(data.train_y))])


def test_precise_bn_inputs_are_augmented_when_training_is(results_dir):
    cfg, data, _ = setup(results_dir, "cnn", "bn", "data.augment=true", "eval.precise_bn_samples=40")
    rng = torch.random.get_rng_state()
    x = precise_bn_inputs(data, cfg)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global stream is not drawn from
    sources = data.train_x[_sample_indices(cfg, len(data.train_y))]
    assert all(_is_padded_crop(image, source) for image, source in zip(x, sources))
    assert sum(not torch.equal(image, source) for image, source in zip(x, sources)) > 30
    assert torch.equal(precise_bn_inputs(data, cfg), x)  # the same samples after every epoch


def test_evaluate_precise_recomputes_over_the_augmented_samples(results_dir, monkeypatch):
    cfg, data, net = setup(results_dir, "cnn", "bn", "data.augment=true", "eval.precise_bn_samples=40")
    used = []
    real = recomputed_statistics

    def spy(model, x, batch_size):
        used.append(x)
        return real(model, x, batch_size)

    monkeypatch.setattr("normbench.evaluation.recomputed_statistics", spy)
    fit(cfg, net, data)
    assert len(used) == 1 and torch.equal(used[0], precise_bn_inputs(data, cfg))


def test_precise_bn_leaves_the_run_otherwise_unchanged(results_dir):
    """Augmented recomputation draws from a generator of its own: training is the same with it on or off."""
    def run(*extra):
        cfg, data, net = setup(results_dir, "cnn", "bn", "data.augment=true", "epochs=2", *extra)
        return [dataclasses.asdict(r) for r in fit(cfg, net, data).records]

    on, off = run(), run("eval.precise_bn=false")
    for a, b in zip(on, off, strict=True):
        assert math.isfinite(a["test_acc_precise"]) and math.isnan(b["test_acc_precise"])
        keys = set(a) - TIMING - {"test_acc_precise"}
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
