"""SkipInit (model.residual=skipinit): every resnet20 block is its shortcut at init, and alpha learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DATA, small_overrides, tiny_run_overrides
from normbench import runner
from normbench.config import compose
from normbench.data import load_data
from normbench.errors import UserError
from normbench.models import build_model, count_parameters
from normbench.models.resnet import BasicBlock
from normbench.train import fit

CPU = torch.device("cpu")


def resnet(norm: str, *extra: str):
    cfg = compose([*TINY_DATA, *small_overrides("resnet20", norm), *extra])
    return build_model(cfg.model, (1, 28, 28), 10, runner.norm_factory(cfg), cfg.seed)


def block_io(net, x: torch.Tensor) -> list[tuple[BasicBlock, torch.Tensor, torch.Tensor]]:
    """(block, its input, its output) for every residual block, from one forward of `x`."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o)))
             for m in net.modules() if isinstance(m, BasicBlock)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("norm", ["none", "bn", "gn", "ln"])
@pytest.mark.parametrize("train", [True, False])
def test_every_block_is_its_shortcut_at_init(norm, train):
    net = resnet(norm, "model.residual=skipinit", "model.depth=14")
    net.train(train)
    io = block_io(net, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert len(io) == 6
    reshaping = 0
    for block, x, out in io:
        assert (x >= 0).all()  # a ReLU precedes every block
        if block.stride == 1 and block.pad == 0:
            assert torch.equal(out, x)  # the identity
        else:  # option A: every other pixel, and zero channels up to the new width
            reshaping += 1
            expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, out.shape[1] - x.shape[1]))
            assert torch.equal(out, expected)
    assert reshaping == 2


def test_alpha_is_one_learnable_zero_per_block():
    net = resnet("none", "model.residual=skipinit")
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    alphas = [p for name, p in net.named_parameters() if name.endswith("alpha")]
    assert len(alphas) == len(blocks) == 3
    assert all(a.shape == () and a.item() == 0 and a.requires_grad for a in alphas)
    assert count_parameters(net) == count_parameters(resnet("none")) + 3
    net(torch.randn(4, 1, 28, 28)).logsumexp(1).sum().backward()
    assert all(a.grad is not None and a.grad.abs().item() > 0 for a in alphas)  # the branch can switch on


def test_standard_residual_has_no_alpha():
    net = resnet("bn")
    assert compose([*TINY_DATA, "model=resnet20"]).model.residual == "standard"
    assert not any("alpha" in name for name in net.state_dict())
    assert all(m.alpha is None for m in net.modules() if isinstance(m, BasicBlock))
    # the default ResNet-20 for 10 classes (He et al. 2016: 0.27M parameters), as before SkipInit existed
    cfg = compose(["data=synthetic", "model=resnet20"])
    assert count_parameters(build_model(cfg.model, (3, 32, 32), 10, runner.norm_factory(cfg), 0)) == 269722


def test_skipinit_trains_without_normalization(results_dir):
    cfg = compose([*tiny_run_overrides(results_dir, "resnet20", "none"), "model.residual=skipinit"])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    result = fit(cfg, net, data)
    assert result.status == "completed"
    assert any(m.alpha.item() != 0 for m in net.modules() if isinstance(m, BasicBlock))


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet20", "model.residual=fixup"], "model.residual: Invalid value 'fixup', expected one of "
                                                 r"\[standard, skipinit\]"),
    (["model=mlp", "model.residual=skipinit"], "unknown key 'model.residual'"),
    (["model=cnn", "model.residual=skipinit"], "unknown key 'model.residual'"),
])
def test_bad_residual_values_are_refused_at_compose_time(overrides, message):
    with pytest.raises(UserError, match=message):
        compose(["data=synthetic", *overrides])
