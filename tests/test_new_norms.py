"""Batch renorm, weight standardization, FRN/EvoNorm in the models, and norm.noise (docs/protocol.md §1.4, §5.1).

Each norm's statistics axes are checked against hand-written formulas in test_norms.py; here are the
parts that have state or touch the model around the norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import REFUSED, set_affine, small_overrides
from normbench.config import compose, config_hash
from normbench.errors import UserError
from normbench.models import MODELS, build_model
from normbench.norms import (FLAT, NORMS, SPATIAL, NormFactory, NormNoise, NormOptions, WSConv2d, WSLinear,
                             create_norm, is_norm, standardized)
from normbench.runner import norm_factory

N, C, H, W = 6, 4, 3, 5
SHAPES = {FLAT: (N, C), SPATIAL: (N, C, H, W)}


def sample(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[kind], generator=g, dtype=torch.float64) * 1.5 + 0.7


def build(model: str, norm: str, *extra: str, seed: int = 0) -> nn.Module:
    cfg = compose(["data=synthetic", *small_overrides(model, norm), *extra])
    return build_model(cfg.model, (1, 28, 28), 10, norm_factory(cfg), seed)


# ---- batch renormalization ---------------------------------------------------------------------------------


def brn(kind: str, r_max=3.0, d_max=5.0, warmup=0, momentum=0.1) -> nn.Module:
    opts = NormOptions(eps=1e-3, momentum=momentum, r_max=r_max, d_max=d_max, warmup_steps=warmup)
    return create_norm("brn", C, kind, opts).double()


def brn_reference(x, layer, r_max, d_max):
    """Ioffe 2017, Algorithm 1, with r and d held constant for backprop."""
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    sigma_b = torch.sqrt(var + layer.eps)
    sigma = torch.sqrt(layer.running_var + layer.eps).view(shape)
    r = (sigma_b / sigma).detach().clamp(1 / r_max, r_max)
    d = ((mean - layer.running_mean.view(shape)) / sigma).detach().clamp(-d_max, d_max)
    return ((x - mean) / sigma_b * r + d) * layer.weight.view(shape) + layer.bias.view(shape)


@pytest.mark.parametrize("kind", [FLAT, SPATIAL])
def test_brn_with_r_max_1_and_d_max_0_is_bn_exactly(kind):
    renorm = brn(kind, r_max=1.0, d_max=0.0).train()
    set_affine(renorm)
    plain = (nn.BatchNorm1d if kind == FLAT else nn.BatchNorm2d)(C, eps=1e-3).double().train()
    plain.load_state_dict({k: v for k, v in renorm.state_dict().items() if k != "steps"})
    for seed in range(3):
        x = sample(kind, seed).requires_grad_()
        x_plain = x.detach().clone().requires_grad_()
        out, ref = renorm(x), plain(x_plain)
        assert torch.equal(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad), ref.backward(grad)
        assert torch.equal(x.grad, x_plain.grad)
    for k, v in plain.state_dict().items():
        assert torch.equal(renorm.state_dict()[k], v), k
    renorm.eval(), plain.eval()
    assert torch.equal(renorm(sample(kind, 9)), plain(sample(kind, 9)))


@pytest.mark.parametrize("kind", [FLAT, SPATIAL])
def test_brn_matches_its_formula_and_updates_running_averages_as_bn(kind):
    layer = brn(kind).train()
    set_affine(layer)
    with torch.no_grad():  # running averages far from the batch's, so that r and d are clipped
        layer.running_mean.fill_(-0.5)
        layer.running_var.fill_(0.1)
    x = sample(kind).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref_layer = copy.deepcopy(layer)
    expected = brn_reference(x_ref, ref_layer, 3.0, 5.0)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad), expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)  # r and d are constants for backprop
    dims = (0,) if kind == FLAT else (0, 2, 3)
    torch.testing.assert_close(layer.running_mean, 0.9 * -0.5 + 0.1 * x.detach().mean(dims))
    torch.testing.assert_close(layer.running_var, 0.9 * 0.1 + 0.1 * x.detach().var(dims, unbiased=True))
    assert layer.steps.item() == 1 and layer.num_batches_tracked.item() == 1


def test_brn_limits_warm_up_linearly_from_bn():
    layer = brn(FLAT, r_max=3.0, d_max=5.0, warmup=10).train()
    seen = []
    for _ in range(12):
        seen.append(tuple(round(v.item(), 6) for v in layer.limits()))
        layer(sample(FLAT))
    assert seen[0] == (1.0, 0.0) and seen[5] == (2.0, 2.5) and seen[10] == seen[11] == (3.0, 5.0)
    layer.eval()
    layer(sample(FLAT))
    assert layer.steps.item() == 12  # only training forwards count


def test_brn_eval_is_bn_eval():
    layer = brn(SPATIAL).train()
    layer(sample(SPATIAL))
    layer.eval()
    plain = nn.BatchNorm2d(C, eps=1e-3).double().eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "steps"})
    assert torch.equal(layer(sample(SPATIAL, 1)), plain(sample(SPATIAL, 1)))


# ---- weight standardization ------------------------------------------------------------------------------


def test_standardized_filters_have_zero_mean_and_unit_variance():
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64) * 0.2 + 0.1
    s = standardized(w)
    torch.testing.assert_close(s.mean((1, 2, 3)), torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(s.var((1, 2, 3), unbiased=False), torch.ones(8, dtype=torch.float64))
    conv = WSConv2d(3, 8, 3, padding=1, bias=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, standardized(conv.weight), padding=1))
    lin = WSLinear(6, 4, bias=False).double()
    sw = standardized(lin.weight)
    torch.testing.assert_close(sw.mean(1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(sw.var(1, unbiased=False), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20"])
def test_ws_gn_standardizes_every_layer_that_feeds_a_norm(model):
    net = build(model, "ws_gn")
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    standard = [m for m in layers if isinstance(m, (WSLinear, WSConv2d))]
    assert len(standard) == len(layers) - 1  # all but the classifier head
    assert not isinstance(layers[-1], (WSLinear, WSConv2d))
    assert not any(isinstance(m, (WSLinear, WSConv2d)) for m in build(model, "gn").modules())


# ---- norms that replace the activation ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["frn", "evonorm_s0"])
@pytest.mark.parametrize("model", ["cnn", "resnet20"])
def test_fused_norms_replace_the_relu_in_blocks(model, norm):
    relus = sum(isinstance(m, nn.ReLU) for m in build(model, norm).modules())
    assert relus == 0
    assert sum(isinstance(m, nn.ReLU) for m in build(model, "gn").modules()) > 0


@pytest.mark.parametrize("norm", ["frn", "evonorm_s0"])
def test_fused_norms_refuse_post_act(norm):
    with pytest.raises(UserError, match=f"norm={norm} replaces the activation, so norm.position must be pre_act"):
        compose(["model=cnn", f"norm={norm}", "norm.position=post_act"])


def test_evonorm_groups_checked_like_group_norm():
    with pytest.raises(UserError, match=r"norm.num_groups=3 does not divide layer '1.0' \(8 channels\).*: 1, 2, 4, 8$"):
        build("cnn", "evonorm_s0", "norm.num_groups=3")


@pytest.mark.parametrize("model,norm", sorted(REFUSED), ids=[f"{m}-{n}" for m, n in sorted(REFUSED)])
def test_refused_pairs_say_why_in_one_line(model, norm):
    with pytest.raises(UserError, match=f"norm '{norm}' .* is undefined on") as e:
        build(model, norm)
    assert "\n" not in str(e.value)


def test_every_registered_norm_has_a_config_and_builds_on_a_conv_net():
    for name in NORMS.names():
        assert compose([f"norm={name}"]).norm.name == name
        net = build("cnn", name)
        assert any(is_norm(m) for m in net.modules()) or name == "none"
    assert set(MODELS.names()) == {"mlp", "cnn", "resnet20", "rnn"}  # REFUSED lists pairs for these


# ---- norm.noise ------------------------------------------------------------------------------------------


def noisy(model="mlp", *extra, seed=0) -> nn.Module:
    return build(model, "bn", "norm.noise.mean=0.5", "norm.noise.std=2.0", *extra, seed=seed)


def noise_layers(net: nn.Module) -> list[NormNoise]:
    return [m for m in net.modules() if isinstance(m, NormNoise)]


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20"])
def test_noise_follows_every_norm_and_is_redrawn_every_training_step(model):
    net = noisy(model)
    layers = noise_layers(net)
    assert len(layers) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    noise = layers[0]
    x = torch.randn(N, 8, 5, 5) if model != "mlp" else torch.randn(N, 32)
    noise.train()
    first, second = noise(x) - x, noise(x) - x
    assert not torch.allclose(first, second)
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    # the distribution itself moves: the per-channel mean of the noise differs between steps
    assert (first.mean(dims) - second.mean(dims)).abs().max() > 0.1
    noise.eval()
    assert torch.equal(noise(x), x)


def test_noise_is_off_by_default_and_off_at_eval():
    plain, net = build("mlp", "bn"), noisy()
    assert not noise_layers(plain)
    x = torch.randn(N, 1, 28, 28)
    plain.eval(), net.eval()
    assert torch.equal(plain(x), net(x))  # same weights by seed; no noise at evaluation


def test_noise_comes_from_its_own_seeded_stream():
    x = torch.randn(N, 1, 28, 28)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, other = noisy(seed=1).train(), noisy(seed=1).train(), noisy(seed=2).train()
    torch.set_rng_state(state)
    out_a = a(x)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream did not move
    assert torch.equal(out_a, b(x)) and not torch.equal(out_a, other(x))
    resumed = noisy(seed=1).train()
    resumed.load_state_dict(a.state_dict())  # the generator state travels with the model
    assert torch.equal(a(x), resumed(x))


def test_noise_magnitudes_bound_the_drawn_mean():
    layer = NormNoise(C, mean=0.3, std=0.0)
    layer.reseed(0, "x")
    x = torch.zeros(1000, C)
    for _ in range(5):
        drawn = layer(x)
        assert torch.allclose(drawn, drawn[:1].expand_as(drawn))  # std 0: one constant per channel
        assert drawn.abs().max() <= 0.3


def test_noise_config_is_validated_and_hashed_only_when_on():
    with pytest.raises(UserError, match="norm.noise.std must be >= 0"):
        compose(["norm.noise.std=-1"])
    with pytest.raises(UserError, match="norm.noise is not available inside recurrent cells"):
        compose(["model=rnn", "norm.noise.mean=0.1"])
    assert config_hash(compose(["norm.noise.mean=0"])) == config_hash(compose([]))
    assert config_hash(compose(["norm.noise.mean=0.1"])) != config_hash(compose([]))
    assert NormFactory("bn", NormOptions(noise=(0.1, 0.0)))(C, FLAT)[1].mean == 0.1


@pytest.mark.parametrize("model", ["mlp", "rnn"])
def test_batch_renorm_at_batch_1_on_flat_features_is_refused(model):
    """One value per statistic has no variance: BRN, like BN, would silently output zeros."""
    from normbench.config import compose
    from normbench.errors import UserError

    with pytest.raises(UserError, match="norm=brn with batch_size=1"):
        compose([f"model={model}", "data=synthetic", "norm=brn", "batch_size=1"])
