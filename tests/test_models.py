"""Every model with every norm: builds (or is refused as documented), runs, trains, initializes by seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REFUSED, small_overrides
from normbench.config import compose
from normbench.data import DATASETS
from normbench.errors import UserError
from normbench import runner
from normbench.models import MODELS, build_model, count_parameters
from normbench.norms import NORMS, RecurrentBatchNorm
from normbench.runner import norm_factory

PAIRS = [(m, n) for m in MODELS.names() for n in NORMS.names()]
IDS = [f"{m}-{n}" for m, n in PAIRS]
GREY, COLOUR = (1, 28, 28), (3, 32, 32)


def build(model: str, norm: str, *extra: str, shape=GREY, seed: int | None = None) -> nn.Module:
    cfg = compose(["data=synthetic", *small_overrides(model, norm), *extra])
    return build_model(cfg.model, shape, 10, norm_factory(cfg), cfg.seed if seed is None else seed)


def batch(shape, n=8, seed=0):
    """Images made of one smooth prototype per class plus noise (the synthetic dataset), normalized."""
    raw = DATASETS.get("synthetic")(compose(["data=synthetic", f"data.shape=[{','.join(map(str, shape))}]",
                                              f"data.num_train={n}", "data.num_test=1",
                                              f"data.data_seed={seed}"]).data)
    x = raw.train_x.float() / 255
    return (x - x.mean()) / x.std(), raw.train_y


@pytest.mark.parametrize("model,norm", PAIRS, ids=IDS)
def test_builds_runs_and_learns_or_is_refused(model, norm):
    if (model, norm) in REFUSED:
        with pytest.raises(UserError, match=f"norm '{norm}'.*undefined"):
            build(model, norm)
        return
    torch.manual_seed(0)
    net = build(model, norm)
    x, y = batch(GREY)
    net.train()
    assert net(x[:4]).shape == (4, 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        before = F.cross_entropy(net(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert after < 0.9 * before, (before, after)
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


@pytest.mark.parametrize("model,norm", [p for p in PAIRS if p not in REFUSED],
                         ids=[i for p, i in zip(PAIRS, IDS) if p not in REFUSED])
def test_colour_32x32_input(model, norm):
    net = build(model, norm, shape=COLOUR)
    x, _ = batch(COLOUR, n=4)
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            out = net(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def _execution_order(net: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Leaf modules in the order the forward pass runs them."""
    order, handles = [], []
    for name, m in net.named_modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, mod))))
    try:
        net.train()
        net(x)
    finally:
        for h in handles:
            h.remove()
    return order


IS_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, RecurrentBatchNorm)


def _is_norm(m: nn.Module) -> bool:
    from normbench.norms import GroupNorm
    return isinstance(m, IS_NORM + (GroupNorm,))


@pytest.mark.parametrize("model", MODELS.names())
@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("position", ["pre_act", "post_act"])
def test_layer_followed_by_norm_has_no_bias(model, norm, position):
    net = build(model, norm, f"norm.position={position}")
    order = [(n, m) for n, m in _execution_order(net, batch(GREY, n=4)[0]) if not isinstance(m, nn.Identity)]
    into_norm = into_relu = 0
    for (name, m), (_, nxt) in zip(order, order[1:]):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if _is_norm(nxt):  # a norm right after removes any bias: it would only waste a parameter
            into_norm += 1
            assert m.bias is None, f"{name} is followed by a norm but has a bias"
        elif isinstance(nxt, nn.ReLU):  # nothing normalizes in between: the bias matters
            into_relu += 1
            assert m.bias is not None, f"{name} is followed by a ReLU but has no bias"
    if norm == "none":
        assert into_norm == 0
    elif position == "pre_act":
        assert into_norm > 0  # the check really ran
    if model in ("mlp", "cnn") and (norm == "none" or position == "post_act"):
        assert into_relu > 0


@pytest.mark.parametrize("model", MODELS.names())
def test_same_seed_same_weights_across_norms(model):
    norms = [n for n in NORMS.names() if (model, n) not in REFUSED]
    assert len(norms) >= 3

    def weights(norm, seed):
        net = build(model, norm, seed=seed)
        return {k: m.weight.detach().clone() for k, m in net.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))}

    reference = weights(norms[0], seed=1)
    assert len(reference) >= 2
    for norm in norms[1:]:
        other = weights(norm, seed=1)
        assert other.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(other[k], reference[k], rtol=0, atol=0, msg=f"{norm}: {k}")
    different = weights(norms[0], seed=2)
    assert all(not torch.equal(different[k], reference[k]) for k in reference)


def test_seeded_init_ignores_global_rng():
    torch.manual_seed(123)
    a = build("cnn", "bn", seed=5)
    torch.manual_seed(456)
    b = build("cnn", "bn", seed=5)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka


def test_lstm_cell_has_recurrent_bn_on_input_hidden_and_cell():
    net = build("rnn", "bn")
    cell = net.cell
    hidden, steps = 16, 28  # one step per image row
    assert isinstance(cell.norm_x, RecurrentBatchNorm) and cell.norm_x.running_mean.shape == (steps, 4 * hidden)
    assert isinstance(cell.norm_h, RecurrentBatchNorm) and cell.norm_h.running_mean.shape == (steps, 4 * hidden)
    assert isinstance(cell.norm_c, RecurrentBatchNorm) and cell.norm_c.running_mean.shape == (steps, hidden)
    assert cell.norm_x is not cell.norm_h
    torch.testing.assert_close(cell.bias[hidden:2 * hidden].detach(), torch.ones(hidden))  # forget gate open
    # one training forward fills every per-step row
    net.train()
    net(batch(GREY, n=4)[0])
    assert (cell.norm_h.num_batches_tracked == 1).all()
    assert (cell.norm_c.running_mean != 0).any(dim=1).all()
    shared = build("rnn", "bn_shared")
    assert shared.cell.norm_h.running_mean.shape == (1, 4 * hidden)


def test_gru_cell_builds_with_every_norm():
    for norm in NORMS.names():
        if ("rnn", norm) in REFUSED:
            continue
        net = build("rnn", norm, "model.cell=gru")
        assert net.cell.w_x.out_features == 3 * 16
        assert net(batch(GREY, n=4)[0]).shape == (4, 10)


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(UserError, match="6n\\+2"):
        build("resnet20", "bn", "model.depth=21")
    assert count_parameters(build("resnet20", "bn", "model.depth=8")) < count_parameters(build("resnet20", "bn", "model.depth=14"))


def test_resnet20_has_the_papers_size():
    cfg = compose(["model=resnet20"])
    net = build_model(cfg.model, COLOUR, 10, norm_factory(cfg), 0)
    assert 0.26e6 < count_parameters(net) < 0.28e6  # He et al. 2016: 0.27M


def test_plain_lstm_fast_path_equals_the_step_loop():
    """norm=none: the fused torch.lstm path gives the loop's outputs and gradients."""
    from normbench.models.rnn import NormLSTM

    cfg = compose(["model=rnn", "norm=none", "data=synthetic", "model.hidden_size=16"])
    net = build_model(cfg.model, (1, 28, 28), 10, runner.norm_factory(cfg), 0)
    assert net.cell.plain
    x = torch.randn(5, 1, 28, 28)
    out_fused = net(x)
    out_fused.sum().backward()
    grads_fused = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    NormLSTM.use_loop = True
    try:
        out_loop = net(x)
        out_loop.sum().backward()
    finally:
        NormLSTM.use_loop = False
    torch.testing.assert_close(out_fused, out_loop, rtol=1e-5, atol=1e-5)
    for a, p in zip(grads_fused, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)
