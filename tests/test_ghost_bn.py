"""Ghost batch norm: BN statistics over sub-batches of norm_batch_size within each SGD batch.

The comparisons with plain BN per sub-batch run on normbench's C kernel for flat features and on
PyTorch's kernels alone (the `kernels` fixture of conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import set_affine, tiny_run_overrides
from normbench import runner
from normbench.config import compose, config_hash
from normbench.data import load_data
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import ghost as ghost_module
from normbench.norms import FLAT, RECURRENT, SPATIAL, NormOptions, RecurrentBatchNorm, create_norm, norm_batches
from normbench.evaluation import evaluate_batch_stats
from normbench.train import fit

N, NBS, C, H, W, T = 12, 3, 5, 3, 4, 4
CPU = torch.device("cpu")


def sample(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {FLAT: (N, C), SPATIAL: (N, C, H, W), RECURRENT: (T, N, C)}[kind]
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()


def run_ghost(layer: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    with norm_batches(layer, NBS):
        return layer(x)


def run_sub_batches(layer: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference: one plain BN forward per sub-batch, in order, as training at batch NBS would do.

    Recurrent: step by step, each step's sub-batches in order (with shared statistics that is the
    order in which ghost BN updates the shared running averages)."""
    if kind == RECURRENT:
        return torch.stack([torch.cat([layer(part, t) for part in x_t.split(NBS)]) for t, x_t in enumerate(x)])
    return torch.cat([layer(part) for part in x.split(NBS)])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("kind,shared", [(FLAT, False), (SPATIAL, False), (RECURRENT, False), (RECURRENT, True)],
                         ids=["flat", "spatial", "recurrent-per_step", "recurrent-shared"])
def test_ghost_bn_is_bn_at_batch_nbs_on_each_sub_batch(kind, shared, momentum, kernels, monkeypatch):
    calls = []
    apply = ghost_module._NativeGhostNorm.apply
    monkeypatch.setattr(ghost_module._NativeGhostNorm, "apply", lambda *a: calls.append(1) or apply(*a))
    opts = NormOptions(momentum=momentum, recurrent_stats="shared" if shared else "per_step")
    ghost = create_norm("bn", C, kind, opts, steps=T).double().train()
    set_affine(ghost)
    plain = copy.deepcopy(ghost)
    for seed in range(2):  # two batches: the running averages mix old and new values
        x = sample(kind, seed)
        out = run_ghost(ghost, x, kind)
        x_ref = x.detach().clone().requires_grad_()
        ref = run_sub_batches(plain, x_ref, kind)
        torch.testing.assert_close(out, ref)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, a), (_, b) in zip(ghost.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(ghost.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)  # one running-average update per sub-batch
    assert not hasattr(ghost, "norm_batch_size") or ghost.norm_batch_size is None  # off outside the context
    assert bool(calls) == (kernels == "c")  # every layout took C where it was built


@pytest.mark.parametrize("kind", [FLAT, SPATIAL, RECURRENT])
def test_norm_batch_size_equal_to_the_batch_is_the_plain_forward(kind):
    layer = create_norm("bn", C, kind, NormOptions(), steps=T).double().train()
    plain = copy.deepcopy(layer)
    x = sample(kind)
    batch = x.shape[1] if kind == RECURRENT else x.shape[0]
    with norm_batches(layer, batch):
        out = layer(x)
    assert torch.equal(out, plain(x))
    for a, b in zip(layer.buffers(), plain.buffers()):
        assert torch.equal(a, b)


def test_eval_mode_ignores_the_norm_batch():
    layer = create_norm("bn", C, SPATIAL).double().eval()
    x = sample(SPATIAL)
    with norm_batches(layer, NBS):
        assert torch.equal(layer(x), copy.deepcopy(layer)(x))


def test_recurrent_ghost_keeps_one_hooked_call_per_sequence():
    bn = create_norm("bn", C, RECURRENT, NormOptions(), steps=T)
    assert isinstance(bn, RecurrentBatchNorm)
    calls = []
    bn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    with norm_batches(bn, NBS):
        bn(torch.randn(T, N, C))
    assert calls == [(T, N, C)]


# ---- config and training loop ---------------------------------------------------------------------------


def _fit(results_dir, model="mlp", *extra):
    cfg = compose([*tiny_run_overrides(results_dir, model, "bn"), "epochs=2", *extra])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    return cfg, data, net, fit(cfg, net, data)


def _numbers(result):
    return [{k: v for k, v in vars(r).items() if k not in ("seconds", "samples_per_s")} for r in result.records]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_norm_batch_size_equal_to_batch_size_is_bit_identical(results_dir, model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identity needs one summation order, in loading the data too
    try:
        *_, off_net, off = _fit(results_dir, model)
        *_, on_net, on = _fit(results_dir, model, "norm_batch_size=16")  # tiny runs train at batch 16
    finally:
        torch.set_num_threads(threads)
    assert _numbers(on) == _numbers(off)
    for (k, a), (_, b) in zip(off_net.state_dict().items(), on_net.state_dict().items()):
        assert torch.equal(a, b), k


def test_ghost_training_differs_and_batch_stats_eval_uses_the_norm_batch(results_dir):
    cfg, data, net, result = _fit(results_dir, "mlp", "norm_batch_size=4")
    record = result.records[-1]
    assert record.test_acc_batch_stats == evaluate_batch_stats(net, data.test_x, data.test_y, 4,
                                                               cfg.eval_batch_size)
    assert net[2][0].num_batches_tracked.item() == 2 * 8 * 4  # 2 epochs x 8 steps x 4 sub-batches
    *_, plain = _fit(results_dir, "mlp")
    assert _numbers(plain) != _numbers(result)


def test_config_checks_the_norm_batch():
    base = ["data=synthetic", "batch_size=16"]
    with pytest.raises(UserError, match=r"norm_batch_size=5 does not divide batch_size=16.*1, 2, 4, 8, 16$"):
        compose([*base, "norm_batch_size=5"])
    with pytest.raises(UserError, match="norm_batch_size applies to batch norm"):
        compose([*base, "norm=gn", "norm_batch_size=4"])
    with pytest.raises(UserError, match="norm_batch_size=1 on model=mlp"):
        compose([*base, "norm_batch_size=1"])
    with pytest.raises(UserError, match="norm_batch_size must be > 0"):
        compose([*base, "norm_batch_size=0"])
    assert compose([*base, "model=cnn", "norm_batch_size=1"]).norm_batch_size == 1  # conv BN: H x W values


def test_run_id_changes_only_when_the_norm_batch_changes_the_result():
    base = ["data=synthetic", "batch_size=16"]
    plain = config_hash(compose(base))
    assert config_hash(compose([*base, "norm_batch_size=null"])) == plain
    assert config_hash(compose([*base, "norm_batch_size=16"])) == plain
    assert config_hash(compose([*base, "norm_batch_size=4"])) != plain


def test_norm_batch_preset_composes():
    cfg = compose(["experiment=norm_batch", "model=cnn", "batch_size=64", "norm_batch_size=2"])
    assert cfg.name == "norm_batch" and cfg.norm.name == "bn"


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("kind", [FLAT, SPATIAL])
def test_ghost_batch_norm_gradients_are_exact(kind, affine, kernels):
    """The flat path's hand-written backward (and the spatial path) against finite differences."""
    from normbench.norms import ghost_batch_norm

    g = torch.Generator().manual_seed(3)
    x = sample(kind)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine[0] else None
    bias = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_() if affine[1] else None
    inputs = (x, weight, bias)
    assert torch.autograd.gradcheck(lambda *a: ghost_batch_norm(a[0], NBS, a[1], a[2], 1e-5)[0], inputs)


def test_ghost_batch_norm_refuses_a_second_derivative_but_not_create_graph(kernels):
    """create_graph=True still gives the first derivative; differentiating it again says why it cannot
    (the C backward has no graph of its own), instead of returning a wrong zero."""
    from normbench.norms import ghost_batch_norm

    x = sample(FLAT)
    weight = torch.full((C,), 1.5, dtype=torch.float64, requires_grad=True)
    out = ghost_batch_norm(x, NBS, weight, None, 1e-5)[0]
    first = torch.autograd.grad((out * out).sum(), (x, weight), retain_graph=True)
    again = torch.autograd.grad((out * out).sum(), (x, weight), create_graph=True)
    torch.testing.assert_close(again, first)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        again[0].sum().backward()
