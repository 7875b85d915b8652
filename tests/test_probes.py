"""Probes (normbench/probes/): they never change the run, their numbers match hand computations, and a
probe that does not apply is one clear line."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import one_error_line, tiny_run_overrides
from normbench import runner
from normbench.config import compose
from normbench.data import load_data
from normbench.errors import UserError
from normbench.models import MODELS, build_model
from normbench.probes import MODULES, PROBES, Probes, RunState, StepView, build, columns, validate_probes
from normbench.results import read_summary
from normbench.train import fit, make_optimizer

CPU = torch.device("cpu")
TIMING = ("seconds", "samples_per_s")


def setup(results_dir, model="mlp", norm="bn", *extra):
    cfg = compose([*tiny_run_overrides(results_dir, model, norm), *extra])
    data = load_data(cfg.data, CPU)
    net = build_model(cfg.model, data.input_shape, data.num_classes, runner.norm_factory(cfg), cfg.seed)
    return cfg, data, net


def noisy(model: str) -> list[str]:
    """Noisy BN where it exists (its generator must be put back too); plain BN in recurrent cells."""
    return [] if model == "rnn" else ["norm.noise.mean=0.5", "norm.noise.std=0.5"]


_FITTED: dict = {}


def fitted(results_dir, model, *extra):
    """A 2-epoch BN run's result, final model and torch's generator state after it; runs without probes are
    trained once per model and argument list (probes never change them, which is what the tests check)."""
    key = (model, extra)
    if key in _FITTED:
        return _FITTED[key]
    cfg, data, net = setup(results_dir, model, "bn", "epochs=2", *noisy(model), *extra)
    torch.manual_seed(1234)
    result = fit(cfg, net, data)
    out = (result, net, torch.get_rng_state())
    if not any(e.startswith("probes.") for e in extra):
        _FITTED[key] = out
    return out


def same_records(a, b) -> bool:
    def plain(r):
        return [(k, None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(r).items()
                if k not in TIMING]
    return [plain(r) for r in a.records] == [plain(r) for r in b.records]


CASES = [(m, p) for m in MODELS.names() for p in PROBES]


@pytest.mark.parametrize("model,probe", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_a_probe_never_changes_the_run(results_dir, model, probe):
    """Metrics, final weights, BN buffers and torch's global generator: bit for bit those of the run without it."""
    if MODULES[probe].applies(compose(tiny_run_overrides(results_dir, model, "bn"))):
        with pytest.raises(UserError, match=f"probes.{probe}"):  # refused when the config is composed
            compose([*tiny_run_overrides(results_dir, model, "bn"), f"probes.{probe}.every=3"])
        return
    off, net_off, rng_off = fitted(results_dir, model)
    on, net_on, rng_on = fitted(results_dir, model, f"probes.{probe}.every=3", "probes.batch_stats.samples=32",
                           "probes.batch_stats.sizes=[2,8]")
    assert on.probe_rows[probe], "the probe ran"
    assert {r["step"] for r in on.probe_rows[probe]} == {0, 3, 6, 9, 12, 15}
    assert same_records(off, on)
    state_off, state_on = net_off.state_dict(), net_on.state_dict()
    for k, v in state_off.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state_on[k]), k
    assert torch.equal(rng_off, rng_on)


def test_ghost_bn_and_adam_runs_are_unchanged_by_every_probe(results_dir):
    extra = ("norm_batch_size=4", "optim=adam", "lr=0.001")
    off, net_off, _ = fitted(results_dir, "cnn", *extra)
    on, net_on, _ = fitted(results_dir, "cnn", *extra, *[f"probes.{p}.every=5" for p in PROBES if p != "residual"],
                           "probes.batch_stats.samples=32", "probes.batch_stats.sizes=[2,8]")
    assert same_records(off, on)
    assert all(torch.equal(v, net_on.state_dict()[k]) for k, v in net_off.state_dict().items()
               if isinstance(v, torch.Tensor))


def test_off_by_default_costs_nothing(results_dir, monkeypatch):
    cfg, data, net = setup(results_dir, "mlp", "bn")
    assert build(cfg, net, data) is None
    monkeypatch.setattr(Probes, "at_step", lambda *a, **k: pytest.fail("a probe ran while every probe is off"))
    result = fit(cfg, net, data)
    assert result.probe_rows == {} and result.probe_seconds == {}


def test_no_hook_is_left_behind(results_dir):
    cfg, data, net = setup(results_dir, "rnn", "ln", *[f"probes.{p}.every=4" for p in ("batch_stats", "landscape",
                                                                                      "scales")])
    fit(cfg, net, data)
    for m in net.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks) and "forward" not in vars(m)
        assert "use_loop" not in vars(m)


# ---- the numbers, against hand computations -----------------------------------------------------------


def view_of(cfg, net, data, batch=16):
    """A probe's view of step 0 of `net`, with its optimizer, on the first `batch` training samples."""
    net.train()
    optimizer = make_optimizer(cfg, net)
    x, y = data.train_x[:batch], data.train_y[:batch]
    return StepView(net, x, y, optimizer, contextlib.nullcontext, 0, RunState(net, optimizer))


def measure(name, cfg, net, data, batch=16):
    view = view_of(cfg, net, data, batch)
    rows = PROBES[name](getattr(cfg.probes, name), cfg, net, data).measure(view)
    view.state.restore()
    return pd.DataFrame(rows)


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20"])
def test_ics_first_layer_g_prime_is_g_exactly(results_dir, model):
    cfg, data, net = setup(results_dir, model, "bn", *noisy(model))
    rows = measure("ics", cfg, net, data)
    first = rows[rows.depth == 0].set_index("quantity").value
    assert first["l2_diff"] == 0.0 and first["grad_norm"] > 0
    assert first["cosine"] == pytest.approx(1.0, abs=1e-12)
    later = rows[(rows.depth > 0) & (rows.quantity == "l2_diff")].value
    assert (later > 0).all()  # the earlier layers' update moves every later layer's gradient


def test_ics_matches_a_hand_computation(results_dir):
    """Two linear layers with LN between, plain SGD: G' of the second layer is its gradient after the first
    layer (and LN's scale and shift) took w - lr G."""
    cfg, data, net = setup(results_dir, "mlp", "ln", "model.depth=1", "optim.momentum=0")
    rows = measure("ics", cfg, net, data)
    x, y = data.train_x[:16].flatten(1), data.train_y[:16]
    lin1, ln, lin2 = net[1], net[2][0], net[3]
    lr = make_optimizer(cfg, net).param_groups[0]["lr"]

    def loss(w1, g, b, w2, b2):
        h = F.relu(F.layer_norm(x @ w1.T, (w1.shape[0],), g, b, ln.eps))
        return F.cross_entropy(h @ w2.T + b2, y)

    p = [t.detach().clone().requires_grad_() for t in (lin1.weight, ln.weight, ln.bias, lin2.weight, lin2.bias)]
    grads = torch.autograd.grad(loss(*p), p)
    moved = [(t - lr * gt).detach().requires_grad_() for t, gt in zip(p[:3], grads[:3])]
    g2_shifted = torch.autograd.grad(loss(*moved, *p[3:]), p[3])[0].double()
    g2 = grads[3].double()
    second = rows[rows.depth == 1].set_index("quantity").value
    assert second["l2_diff"] == pytest.approx(float((g2 - g2_shifted).norm()), rel=1e-5)
    cosine = float((g2 * g2_shifted).sum() / (g2.norm() * g2_shifted.norm()))
    assert second["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert second["grad_norm"] == pytest.approx(float(g2.norm()), rel=1e-6)


def test_landscape_matches_a_hand_computation(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "none", "probes.landscape.lr_multiples=[1,3]")
    rows = measure("landscape", cfg, net, data)
    x, y = data.train_x[:16], data.train_y[:16]
    lr = make_optimizer(cfg, net).param_groups[0]["lr"]
    params = list(net.parameters())
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    losses, changes, betas = [], [], []
    for m in (1.0, 3.0):
        other = copy.deepcopy(net)
        with torch.no_grad():
            for p, gp in zip(other.parameters(), g):
                p -= m * lr * gp
        loss = F.cross_entropy(other(x), y)
        moved = torch.autograd.grad(loss, list(other.parameters()))
        change = math.sqrt(sum(float(((a - b).double() ** 2).sum()) for a, b in zip(moved, g)))
        g_norm = math.sqrt(sum(float((b.double() ** 2).sum()) for b in g))
        losses.append(loss.item()), changes.append(change), betas.append(change / (m * lr * g_norm))
    summary = rows[rows.lr_multiple.isna()].set_index("quantity").value
    assert summary["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert summary["grad_predictiveness"] == pytest.approx(max(changes), rel=1e-4)
    assert summary["beta_smoothness"] == pytest.approx(max(betas), rel=1e-4)
    at = rows[rows.quantity == "loss"].set_index("lr_multiple").value
    assert at[3.0] == pytest.approx(losses[1], rel=1e-5)


def test_residual_matches_a_hand_computation(results_dir):
    cfg, data, net = setup(results_dir, "resnet20", "bn")
    rows = measure("residual", cfg, net, data)
    other = copy.deepcopy(net).train()
    x = data.train_x[:16]
    with torch.no_grad():
        h = other.stem(x)
        expected = []
        for block in other.blocks:
            branch = block.norm2(block.conv2(block.act1(block.conv1(h))))
            skip = block.shortcut(h)
            v = [float(t.transpose(0, 1).flatten(1).double().var(1, unbiased=False).mean()) for t in (branch, skip)]
            expected.append(v[0] / v[1])
            h = block(h)
    got = rows[rows.quantity == "ratio"].sort_values("depth").value.tolist()
    assert got == pytest.approx(expected, rel=1e-5)


def test_residual_ratio_is_zero_at_init_with_skipinit(results_dir):
    cfg, data, net = setup(results_dir, "resnet20", "none", "model.residual=skipinit")
    rows = measure("residual", cfg, net, data)
    ratios = rows[rows.quantity == "ratio"].value
    assert len(ratios) == 3 and (ratios == 0).all()
    assert (rows[rows.quantity == "var_skip"].value > 0).all()


def test_scales_match_a_hand_computation(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "bn")
    rows = measure("scales", cfg, net, data)
    x, y = data.train_x[:16], data.train_y[:16]
    other = copy.deepcopy(net).train()
    first = other[1]
    g = torch.autograd.grad(F.cross_entropy(other(x), y), first.weight)[0]
    out = x.flatten(1) @ first.weight.T
    got = rows[rows.depth == 0].set_index("quantity").value
    assert got["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert got["weight_norm"] == pytest.approx(float(first.weight.detach().norm()), rel=1e-6)
    assert got["output_std"] == pytest.approx(float(out.detach().double().std(unbiased=False)), rel=1e-5)
    assert got["input_std"] == pytest.approx(float(x.double().std(unbiased=False)), rel=1e-6)


def test_batch_stats_match_a_hand_computation(results_dir):
    """The first BN's input does not depend on any earlier norm: it is the first linear layer's output."""
    cfg, data, net = setup(results_dir, "mlp", "bn", "probes.batch_stats.samples=96",
                           "probes.batch_stats.sizes=[4,32]", "probes.batch_stats.quantiles=[0.5,0.9]")
    rows = measure("batch_stats", cfg, net, data)
    probe = PROBES["batch_stats"](cfg.probes.batch_stats, cfg, net, data)
    with torch.no_grad():
        a = (probe.inputs.flatten(1) @ net[1].weight.T).double().numpy()  # (96, C)
    mu, sigma = a.mean(0), a.std(0)
    for b in (4, 32):
        chunks = a.reshape(-1, b, a.shape[1])
        mean_err = np.abs(chunks.mean(1) - mu) / sigma
        std_err = np.abs(chunks.std(1) - sigma) / sigma
        for stat, errors in (("mean", mean_err), ("std", std_err)):
            for q in (0.5, 0.9):
                got = rows.query("depth == 0 and batch_size == @b and stat == @stat and quantile == @q").value
                assert got.item() == pytest.approx(np.quantile(errors, q), rel=1e-6)
    assert set(rows.norm) == {"BatchNorm1d"}
    assert (rows["values"] == rows["batch_size"]).all()  # flat features: one value per sample


def test_batch_stats_error_shrinks_like_one_over_sqrt_b(results_dir):
    cfg, data, net = setup(results_dir, "mlp", "bn", "probes.batch_stats.samples=1024",
                           "probes.batch_stats.sizes=[4,64]", "data.num_train=1024")
    rows = measure("batch_stats", cfg, net, data)
    median = rows.query("depth == 0 and stat == 'mean' and quantile == 0.5").set_index("batch_size").value
    assert 2.5 < median[4] / median[64] < 6.5  # sqrt(64 / 4) = 4


def test_batch_stats_counts_values_per_statistic_on_conv_features(results_dir):
    cfg, data, net = setup(results_dir, "cnn", "bn", "probes.batch_stats.samples=32",
                           "probes.batch_stats.sizes=[2]")
    rows = measure("batch_stats", cfg, net, data)
    per_layer = rows.groupby("depth")["values"].first()
    assert per_layer.tolist() == [2 * 28 * 28, 2 * 14 * 14]


# ---- config, CLI and the run folder --------------------------------------------------------------------


@pytest.mark.parametrize("override,phrase", [
    ("probes.ics.every=-1", "probes.ics.every must be >= 0"),
    ("probes.batch_stats.sizes=[]", "probes.batch_stats.sizes must be a non-empty list"),
    ("probes.batch_stats.sizes=[2,4096]", "probes.batch_stats.sizes must be"),
    ("probes.batch_stats.quantiles=[1.5]", "probes.batch_stats.quantiles must be"),
    ("probes.landscape.lr_multiples=[0]", "probes.landscape.lr_multiples must be"),
])
def test_bad_probe_settings_are_refused(override, phrase, results_dir):
    with pytest.raises(UserError, match=phrase):
        validate_probes(compose([*tiny_run_overrides(results_dir), override]))


def test_a_probe_that_does_not_apply_is_one_line_through_the_cli(results_dir):
    from normbench.cli import app

    result = CliRunner().invoke(app, ["run", *tiny_run_overrides(results_dir, "mlp", "bn"), "probes.residual.every=5"])
    one_error_line(result, "probes.residual", "resnet20", "model=mlp")
    assert not results_dir.exists() or not any(results_dir.rglob("summary.json"))


def test_run_folder_has_one_tidy_csv_per_probe_and_their_time(results_dir):
    cfg = compose([*tiny_run_overrides(results_dir, "cnn", "gn"), "probes.landscape.every=4", "probes.ics.every=4"])
    done = runner.execute(cfg)
    for name in ("landscape", "ics"):
        frame = pd.read_csv(done.folder / f"probe_{name}.csv")
        assert list(frame.columns) == columns(name)
        assert sorted(frame.step.unique()) == [0, 4]
    assert not (done.folder / "probe_scales.csv").exists()
    seconds = read_summary(done.folder)["probe_seconds"]
    assert set(seconds) == {"landscape", "ics"} and all(s > 0 for s in seconds.values())


def test_a_resumed_run_continues_its_probe_tables(results_dir):
    extra = ("epochs=2", "probes.landscape.every=3", "probes.scales.every=5")
    cfg, data, net = setup(results_dir, "mlp", "bn", *extra)
    states = []
    whole = fit(cfg, net, data, on_epoch_end=lambda s: states.append(copy.deepcopy(s)))
    _, _, fresh = setup(results_dir, "mlp", "bn", *extra)
    resumed = fit(cfg, fresh, data, resume=states[0])
    assert same_records(whole, resumed)
    for name in ("landscape", "scales"):
        assert pd.DataFrame(resumed.probe_rows[name]).equals(pd.DataFrame(whole.probe_rows[name]))


def test_a_probe_that_does_not_apply_is_refused_when_the_config_is_composed():
    """At compose time (so `sweep --dry-run` calls it invalid), not only when the run starts."""
    from normbench.config import compose
    from normbench.errors import UserError

    with pytest.raises(UserError, match="probes.residual"):
        compose(["model=mlp", "data=synthetic", "probes.residual.every=5"])
