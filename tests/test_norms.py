"""Numerical checks of every norm against hand-written references (docs/protocol.md §1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import set_affine
from normbench import conformance
from normbench.config import compose
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import (FLAT, KINDS, NORMS, RECURRENT, SPATIAL, NormFactory, NormOptions,
                             RecurrentBatchNorm, batch_moments, create_norm, is_norm)
from normbench.runner import norm_factory

EPS = 1e-3  # large enough that leaving eps out, or putting it outside the sqrt, is caught
N, C, H, W, T, G = 4, 8, 3, 5, 6, 4


def normalize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) over `dims`."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


def rms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over `dims`: no mean subtracted."""
    return x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + EPS)


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per sample, per group of C/G channels (and all positions)."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    return normalize(xg, tuple(range(2, xg.dim()))).reshape(x.shape)


# The set of values each norm takes its statistics over, written out per kind of input.
# x is (N, C) for flat and for one recurrent step, (N, C, H, W) for spatial.
REFERENCE = {
    ("bn", FLAT): lambda x: normalize(x, (0,)),
    ("bn", SPATIAL): lambda x: normalize(x, (0, 2, 3)),
    ("bn", RECURRENT): lambda x: normalize(x, (0,)),
    ("ln", FLAT): lambda x: normalize(x, (1,)),
    ("ln", SPATIAL): lambda x: normalize(x, (1, 2, 3)),
    ("ln", RECURRENT): lambda x: normalize(x, (1,)),
    ("in", SPATIAL): lambda x: normalize(x, (2, 3)),
    ("gn", FLAT): lambda x: grouped(x, G),
    ("gn", SPATIAL): lambda x: grouped(x, G),
    ("gn", RECURRENT): lambda x: grouped(x, G),
    ("brn", FLAT): lambda x: normalize(x, (0,)),  # at step 0 the clip limits are (1, 0): BN exactly
    ("brn", SPATIAL): lambda x: normalize(x, (0, 2, 3)),
    ("ws_gn", FLAT): lambda x: grouped(x, G),  # the norm itself is GN; the feeding layers are standardized
    ("ws_gn", SPATIAL): lambda x: grouped(x, G),
    ("rms", FLAT): lambda x: rms(x, (1,)),
    ("rms", SPATIAL): lambda x: rms(x, (1, 2, 3)),
    ("rms", RECURRENT): lambda x: rms(x, (1,)),
    ("none", FLAT): lambda x: x,
    ("none", SPATIAL): lambda x: x,
    ("none", RECURRENT): lambda x: x,
}


def channel(p: nn.Parameter) -> torch.Tensor:
    return p.detach().reshape(1, -1, 1, 1)


def frn_tlu(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    y = x / torch.sqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + EPS) * channel(m.weight) + channel(m.bias)
    return torch.maximum(y, channel(m.tau))


def evonorm_s0(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    n, c, h, w = x.shape
    std = torch.sqrt(x.reshape(n, G, -1).var(dim=2, unbiased=False) + EPS)  # (N, G)
    std = std.repeat_interleave(c // G, dim=1).reshape(n, c, 1, 1)
    return x * torch.sigmoid(channel(m.v) * x) / std * channel(m.weight) + channel(m.bias)


# Norms whose output is not reference * gamma + beta: the whole output, from the layer's parameters.
FULL = {("frn", SPATIAL): frn_tlu, ("evonorm_s0", SPATIAL): evonorm_s0}
UNDEFINED = {("in", FLAT), ("in", RECURRENT), ("brn", RECURRENT), ("ws_gn", RECURRENT),
             ("frn", FLAT), ("frn", RECURRENT), ("evonorm_s0", FLAT), ("evonorm_s0", RECURRENT)}
BATCH_DEPENDENT = {"bn", "brn"}
ACTIVATION = {"frn", "evonorm_s0"}  # bring their own nonlinearity: no ReLU in their block
NOT_CENTERING = {"none", "rms", "frn", "evonorm_s0"}  # a bias before them is not removed

OPTIONS = NormOptions(eps=EPS, num_groups=G)


def sample(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (N, C, H, W) if kind == SPATIAL else (N, C)
    # A small spread makes eps matter; an offset makes a missing mean subtraction show.
    return (0.05 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.3)


def apply(layer: nn.Module, x: torch.Tensor, kind: str, t: int = 0) -> torch.Tensor:
    return layer(x, t) if kind == RECURRENT else layer(x)


def affine_of(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(layer.named_parameters())
    weight = next((p for k, p in params.items() if k.endswith("weight")), None)
    bias = next((p for k, p in params.items() if k.endswith("bias")), None)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is None:
        return torch.ones(1, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)
    if bias is None:  # RMSNorm has no shift
        return weight.detach().reshape(shape), torch.zeros(1, dtype=x.dtype)
    return weight.detach().reshape(shape), bias.detach().reshape(shape)


CASES = [(name, kind) for name in NORMS.names() for kind in KINDS]


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_statistics_axes_match_reference(name, kind):
    if (name, kind) in UNDEFINED:
        with pytest.raises(UserError, match="undefined"):
            create_norm(name, C, kind, OPTIONS, steps=T)
        return
    assert (name, kind) in REFERENCE or (name, kind) in FULL, f"add a reference for the new norm {name!r} on {kind}"
    layer = create_norm(name, C, kind, OPTIONS, steps=T).double()
    set_affine(layer)
    layer.train()
    x = sample(kind)
    if (name, kind) in FULL:
        expected = FULL[name, kind](x, layer)
    else:
        gamma, beta = affine_of(layer, x)
        expected = REFERENCE[name, kind](x) * gamma + beta
    out = apply(layer, x, kind, t=2)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if name != "none":  # the norm really changed something (the reference is not trivially the input)
        assert not torch.allclose(out, x)


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_every_norm_passes_the_conformance_battery(name, kind):
    """One definition of a well-behaved norm (normbench/conformance.py, what `normbench check` runs on a plugin's):
    builds, finite, shape, state_dict, deterministic, train≈eval; and batch dependence, measured: only BN's kin."""
    row = conformance.norm_on_kind(name, kind)
    if (name, kind) in UNDEFINED:
        assert row.results["builds"].status == "refused" and "undefined" in row.results["builds"].detail
        return
    assert not row.failed, conformance.notes([row])
    assert row.results["batch-dependent"].status == ("yes" if name in BATCH_DEPENDENT else "no")


@pytest.mark.parametrize("name,kind", [c for c in CASES if c not in UNDEFINED and c[0] not in BATCH_DEPENDENT],
                         ids=[f"{n}-{k}" for n, k in CASES if (n, k) not in UNDEFINED and n not in BATCH_DEPENDENT])
def test_a_batch_independent_norm_is_the_same_in_train_and_eval_mode(name, kind):
    """Exactly, where the battery allows a tolerance (it also judges norms with running statistics)."""
    layer = create_norm(name, C, kind, OPTIONS, steps=T).double()
    x = sample(kind)
    torch.testing.assert_close(apply(layer.eval(), x, kind), apply(layer.train(), x, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_bn_running_stats_after_one_step(kind):
    layer = create_norm("bn", C, kind, OPTIONS, steps=T).double().train()
    x = sample(kind, seed=3)
    t = 1
    apply(layer, x, kind, t=t)
    dims = (0, 2, 3) if kind == SPATIAL else (0,)
    mean = x.mean(dim=dims)
    unbiased = x.var(dim=dims, unbiased=True)
    running_mean = layer.running_mean[t] if kind == RECURRENT else layer.running_mean
    running_var = layer.running_var[t] if kind == RECURRENT else layer.running_var
    torch.testing.assert_close(running_mean, 0.9 * 0 + 0.1 * mean)
    torch.testing.assert_close(running_var, 0.9 * 1 + 0.1 * unbiased)
    # and eval mode uses them
    layer.eval()
    set_affine(layer, seed=5)
    gamma, beta = affine_of(layer, x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    expected = (x - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + EPS) * gamma + beta
    torch.testing.assert_close(apply(layer, x, kind, t=t), expected)


def test_bn_momentum_option_is_used():
    layer = create_norm("bn", C, FLAT, NormOptions(momentum=0.5)).double().train()
    x = sample(FLAT)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.5 * x.mean(0))


@pytest.mark.parametrize("kind", [FLAT, RECURRENT])
def test_instance_norm_refused_without_spatial_positions(kind):
    with pytest.raises(UserError, match=r"norm 'in'.*undefined on " + kind):
        create_norm("in", C, kind, OPTIONS, steps=T)


def test_instance_norm_is_affine_without_running_stats():
    layer = create_norm("in", C, SPATIAL, OPTIONS)
    assert isinstance(layer, nn.InstanceNorm2d)
    assert layer.affine and not layer.track_running_stats


def test_unknown_norm_lists_valid_ones():
    with pytest.raises(UserError) as e:
        create_norm("xx", C, FLAT)
    for name in NORMS.names():
        assert name in str(e.value)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        create_norm("bn", C, "volumetric")


# ---- group counts that cannot work, found in the built model ---------------------------------------------


def _build(overrides, shape=(1, 28, 28)):
    cfg = compose(["data=synthetic", *overrides])
    return build_model(cfg.model, shape, 10, norm_factory(cfg), cfg.seed)


def test_gn_groups_not_dividing_names_layer_and_valid_counts():
    with pytest.raises(UserError) as e:
        _build(["model=cnn", "model.channels=[8,12]", "norm=gn", "norm.num_groups=8"])
    msg = str(e.value)
    assert "norm.num_groups=8" in msg and "does not divide" in msg
    assert "'4.0' (12 channels)" in msg  # the conv stage's norm, as named in the model
    assert msg.endswith("num_groups values that work for every layer: 1, 2, 4")
    assert "\n" not in msg
    for g in (1, 2, 4):  # the listed counts really work
        _build(["model=cnn", "model.channels=[8,12]", "norm=gn", f"norm.num_groups={g}"])


def test_gn_one_value_per_group_refused_on_recurrent_layers():
    # hidden 8: the gate norms have 32 channels (4 per group: fine), the cell-state norm 8 (1 per group)
    with pytest.raises(UserError) as e:
        _build(["model=rnn", "model.hidden_size=8", "norm=gn", "norm.num_groups=8"])
    msg = str(e.value)
    assert "leaves one value per group" in msg and "cell.norm_c" in msg
    assert msg.endswith(": 1, 2, 4")
    for g in (1, 2, 4):
        _build(["model=rnn", "model.hidden_size=8", "norm=gn", f"norm.num_groups={g}"])


def test_gn_too_many_groups_on_mlp():
    with pytest.raises(UserError, match=r"num_groups=32 does not divide layer '2.0' \(12 channels\)"):
        _build(["model=mlp", "model.width=12", "norm=gn"])


# ---- recurrent batch norm (Cooijmans et al. 2016) ------------------------------------------------------


def rbn(shared=False, momentum=0.1, steps=T) -> RecurrentBatchNorm:
    return RecurrentBatchNorm(C, steps, eps=EPS, momentum=momentum, track_running_stats=True,
                              shared=shared).double()


def seq(seed=0, steps=T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # each step has its own offset and spread, so per-step statistics differ
    offsets = torch.arange(steps, dtype=torch.float64).reshape(steps, 1, 1)
    return torch.randn(steps, N, C, generator=g, dtype=torch.float64) * (1 + offsets) + 3 * offsets


def test_recurrent_bn_gamma_starts_at_0_1():
    layer = create_norm("bn", C, RECURRENT, NormOptions(), steps=T)
    assert isinstance(layer, RecurrentBatchNorm)
    torch.testing.assert_close(layer.weight.detach(), torch.full((C,), 0.1))
    torch.testing.assert_close(layer.bias.detach(), torch.zeros(C))
    assert layer.running_mean.shape == (T, C)
    shared = create_norm("bn", C, RECURRENT, NormOptions(recurrent_stats="shared"), steps=T)
    assert shared.running_mean.shape == (1, C)


def test_per_step_updates_only_row_t():
    layer = rbn().train()
    x = seq()
    layer(x[2], 2)
    changed = (layer.running_mean != 0).any(dim=1)
    assert changed.tolist() == [t == 2 for t in range(T)]
    assert layer.num_batches_tracked.tolist() == [int(t == 2) for t in range(T)]
    torch.testing.assert_close(layer.running_mean[2], 0.1 * x[2].mean(0))
    torch.testing.assert_close(layer.running_var[2], 0.9 + 0.1 * x[2].var(0, unbiased=True))
    torch.testing.assert_close(layer.running_var[[0, 1, 3, 4, 5]], torch.ones(T - 1, C, dtype=torch.float64))


def test_per_step_rows_differ_for_different_data():
    layer = rbn().train()
    x = seq()
    for t in range(T):
        layer(x[t], t)
    for t in range(T):
        torch.testing.assert_close(layer.running_mean[t], 0.1 * x[t].mean(0))
    assert not torch.allclose(layer.running_mean[0], layer.running_mean[1])
    assert not torch.allclose(layer.running_var[0], layer.running_var[T - 1])


@pytest.mark.parametrize("shared", [False, True], ids=["per_step", "shared"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_whole_sequence_equals_step_by_step(shared, momentum):
    whole, stepwise = rbn(shared, momentum).train(), rbn(shared, momentum).train()
    set_affine(whole)
    stepwise.load_state_dict(whole.state_dict())
    for seed in range(2):  # two batches, so the running averages mix old and new
        x = seq(seed)
        out_whole = whole(x)
        out_steps = torch.stack([stepwise(x[t], t) for t in range(T)])
        torch.testing.assert_close(out_whole, out_steps)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(whole, key), getattr(stepwise, key), msg=key)
    whole.eval(), stepwise.eval()
    x = seq(7)
    torch.testing.assert_close(whole(x), torch.stack([stepwise(x[t], t) for t in range(T)]))


def test_whole_sequence_normalizes_each_step_over_the_batch():
    layer = rbn().train()
    set_affine(layer)
    x = seq()
    gamma, beta = layer.weight.detach(), layer.bias.detach()
    expected = torch.stack([normalize(x[t], (0,)) for t in range(T)]) * gamma + beta
    torch.testing.assert_close(layer(x), expected)


def test_shared_mode_updates_one_row_at_every_step():
    layer = rbn(shared=True).train()
    x = seq()
    layer(x)
    assert layer.running_mean.shape == (1, C)
    assert layer.num_batches_tracked.tolist() == [T]
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for t in range(T):
        mean = 0.9 * mean + 0.1 * x[t].mean(0)
        var = 0.9 * var + 0.1 * x[t].var(0, unbiased=True)
    torch.testing.assert_close(layer.running_mean[0], mean)
    torch.testing.assert_close(layer.running_var[0], var)


def test_eval_uses_row_of_step_t():
    layer = rbn().eval()
    set_affine(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.arange(T, dtype=torch.float64).reshape(T, 1).expand(T, C))
        layer.running_var.copy_((1 + torch.arange(T, dtype=torch.float64)).reshape(T, 1).expand(T, C))
    x = seq()[0]
    gamma, beta = layer.weight.detach(), layer.bias.detach()
    for t in range(T):
        expected = (x - t) / torch.sqrt(torch.tensor(1.0 + t, dtype=torch.float64) + EPS) * gamma + beta
        torch.testing.assert_close(layer(x, t), expected)
    # steps past the last row reuse the last row
    torch.testing.assert_close(layer(x, T + 3), layer(x, T - 1))
    before = layer.running_mean.clone()
    layer(seq(1))
    torch.testing.assert_close(layer.running_mean, before)  # eval never updates


def test_longer_sequence_than_steps_reuses_last_row():
    layer = rbn(steps=3).train()
    x = seq(steps=5)
    out = layer(x)
    assert out.shape == x.shape
    assert layer.num_batches_tracked.tolist() == [1, 1, 3]


# ---- the factory models receive ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NORMS.names())
@pytest.mark.parametrize("position", ["pre_act", "post_act"])
def test_factory_bias_and_block_order(name, position):
    factory = NormFactory(name, OPTIONS, position)
    assert factory.bias is (name in NOT_CENTERING or position == "post_act")
    kind = SPATIAL if (name, FLAT) in UNDEFINED else FLAT
    block = factory.block(C, kind)
    if name in ACTIVATION:  # the norm is its own activation: the block is the norm alone
        assert len(block) == 1 and not any(isinstance(m, nn.ReLU) for m in block.modules())
        return
    assert len(block) == 2
    relu_at = 1 if position == "pre_act" else 0
    assert isinstance(block[relu_at], nn.ReLU)
    assert not isinstance(block[1 - relu_at], nn.ReLU)
    # functionally: pre_act is relu(norm(x)), post_act is norm(relu(x))
    block = block.double().train()
    norm = copy.deepcopy(block[1 - relu_at])  # a copy: brn's own state moves at every training forward
    x = sample(kind) - 0.3  # about half negative
    expected = torch.relu(norm(x)) if position == "pre_act" else norm(torch.relu(x))
    torch.testing.assert_close(block(x), expected)


def test_norm_factory_from_config():
    cfg = compose(["norm=bn_shared", "norm.eps=0.01", "norm.momentum=0.2", "norm.position=post_act"])
    factory = norm_factory(cfg)
    assert factory == NormFactory("bn", NormOptions(eps=0.01, momentum=0.2, recurrent_stats="shared"), "post_act")
    cfg = compose(["norm=gn", "norm.num_groups=4"])
    assert norm_factory(cfg).options.num_groups == 4


@pytest.mark.parametrize("name,kind", [c for c in CASES if c not in UNDEFINED],
                         ids=[f"{n}-{k}" for n, k in CASES if (n, k) not in UNDEFINED])
def test_every_norm_the_factory_builds_is_recognized_as_a_norm(name, kind):
    """optim.norm_weight_decay finds norm parameters with `is_norm`: a new norm class must be added to it."""
    layer = create_norm(name, C, kind, OPTIONS, steps=T)
    assert is_norm(layer) or not list(layer.parameters()), f"add {type(layer).__name__} to norms.NORM_TYPES"


@pytest.mark.parametrize("shared", [False, True], ids=["per_step", "shared"])
def test_batch_moments_of_a_recurrent_sequence_are_per_step(shared):
    bn = RecurrentBatchNorm(C, 4, EPS, 0.1, True, shared=shared)
    x = torch.randn(6, N, C, dtype=torch.float64)  # 6 steps, 2 more than rows
    rows, n, mean, var = batch_moments(bn, x)
    assert rows == ((0,) * 6 if shared else (0, 1, 2, 3, 3, 3)) and n == N
    torch.testing.assert_close(mean, x.mean(1))
    torch.testing.assert_close(var, x.var(1, unbiased=False))
    rows, n, mean, var = batch_moments(bn, x[5], 5)
    assert rows == (0 if shared else 3,) and n == N and mean.shape == (1, C)


def test_batch_moments_of_spatial_bn_are_over_batch_and_positions():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    rows, n, mean, var = batch_moments(nn.BatchNorm2d(C), x)
    assert rows == (0,) and n == N * H * W
    torch.testing.assert_close(mean[0], x.mean((0, 2, 3)))
    torch.testing.assert_close(var[0], x.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("shared", [False, True], ids=["per_step", "shared"])
def test_a_whole_sequence_is_one_call_for_hooks(shared):
    bn = RecurrentBatchNorm(C, T, EPS, 0.1, True, shared=shared)
    calls = []
    bn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    bn(torch.randn(T, N, C))
    assert calls == [(T, N, C)]
