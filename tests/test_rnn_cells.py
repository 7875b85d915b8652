"""The recurrent cells' fast paths give the step loop's numbers.

A cell with a norm inside runs its recurrence as one autograd node with a hand-written backward;
a cell without one runs PyTorch's fused LSTM/GRU kernel. Both are checked against the plain
per-step loop written out below (the implementation every cell ran before the fast paths), and
against the cell's own step loop (`use_loop`), which stays for hooked or unknown norms: outputs,
the gradients of every parameter and BN's running averages. In float64 they agree to rounding;
in float32 to float32 tolerances. Each comparison runs twice: on the C step kernels that a CPU LSTM
takes where a C compiler is at hand (`normbench/models/rnn/native.py`), and on the PyTorch kernels
it takes where none is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import small_overrides
from normbench import runner
from normbench.config import compose
from normbench.models import build_model, forward_work
from normbench.models.rnn import NormGRU, NormLSTM, native

NORMS = ["none", "bn", "bn_shared", "ln", "gn"]
CELLS = ["lstm", "gru"]
SHAPE = (1, 12, 10)  # 12 steps of 10 features


def reference_lstm(cell: NormLSTM, x: torch.Tensor) -> torch.Tensor:
    """The LSTM step loop through the norm modules, as the cells ran it before the fast paths."""
    xs = cell.norm_x(cell.w_x(x)) + cell.bias
    h = c = xs.new_zeros(xs.shape[1], cell.hidden_size)
    hid = cell.hidden_size
    for t, x_t in enumerate(xs.unbind(0)):
        gates = x_t + cell.norm_h(cell.w_h(h), t)  # i, f, o, g
        i, f, o = torch.sigmoid(gates[:, : 3 * hid]).chunk(3, dim=1)
        c = f * c + i * torch.tanh(gates[:, 3 * hid:])
        h = o * torch.tanh(cell.norm_c(c, t))
    return h


def reference_gru(cell: NormGRU, x: torch.Tensor) -> torch.Tensor:
    """The GRU step loop through the norm modules, as the cells ran it before the fast paths."""
    xs = cell.norm_x(cell.w_x(x)) + cell.bias
    h = xs.new_zeros(xs.shape[1], cell.hidden_size)
    hid = cell.hidden_size
    for t, x_t in enumerate(xs.unbind(0)):
        h_t = cell.norm_h(cell.w_h(h), t)
        r, z = torch.sigmoid(x_t[:, : 2 * hid] + h_t[:, : 2 * hid]).chunk(2, dim=1)
        n = torch.tanh(x_t[:, 2 * hid:] + r * (h_t[:, 2 * hid:] + cell.bias_hn))
        h = (1 - z) * n + z * h
    return h


REFERENCE = {"lstm": reference_lstm, "gru": reference_gru}


@pytest.fixture
def c_calls(kernels, monkeypatch) -> dict:
    """On each of the `kernels` (conftest.py), counts the LSTM recurrences that went through C."""
    calls = {"kernels": kernels, "c": 0}
    apply = native.NativeLSTMRecurrence.apply

    def counted(*args):
        calls["c"] += 1
        return apply(*args)

    monkeypatch.setattr(native.NativeLSTMRecurrence, "apply", counted)
    return calls


def took_c(calls: dict, cell: str, norm: str) -> None:
    """An LSTM with LN, GN or BN inside ran its recurrence in C exactly when C kernels were given."""
    expected = calls["kernels"] == "c" and cell == "lstm" and norm != "none"
    assert (calls["c"] > 0) == expected, calls


def make_cell(cell: str, norm: str, *extra: str, dtype=torch.float32, seed: int = 0):
    cfg = compose(["data=synthetic", *small_overrides("rnn", norm), f"model.cell={cell}", *extra])
    net = build_model(cfg.model, SHAPE, 10, runner.norm_factory(cfg), 0).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every parameter off its initial value, so each one matters
        for p in net.cell.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
    return net.cell


def run(cell, forward, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Output, parameter gradients and buffers after one forward + backward of `forward(cell, x)`."""
    cell.zero_grad(set_to_none=True)
    out = forward(cell, x)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    grads = {k: p.grad.clone() for k, p in cell.named_parameters()}
    return out.detach(), grads, {k: b.clone() for k, b in cell.named_buffers()}


def assert_same(a, b, rtol: float, atol: float) -> None:
    """Close in every tensor; `atol` is relative to the largest value of each tensor."""
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = a, b
    assert grads_a.keys() == grads_b.keys() and bufs_a.keys() == bufs_b.keys()
    for k, (x, y) in {"output": (out_a, out_b), **{k: (grads_a[k], grads_b[k]) for k in grads_a},
                      **{k: (bufs_a[k], bufs_b[k]) for k in bufs_a}}.items():
        scale = max(1.0, y.abs().max().item())
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale, msg=k)


def compare(cell: str, norm: str, *extra: str, dtype, rtol: float, atol: float, steps: int = 12) -> None:
    """The cell's own forward vs the reference loop and vs `use_loop`, in training and then in eval."""
    fast = make_cell(cell, norm, *extra, dtype=dtype)
    ref, loop = copy.deepcopy(fast), copy.deepcopy(fast)
    loop.use_loop = True
    g = torch.Generator().manual_seed(1)
    for mode in ("train", "train", "eval"):
        x = torch.randn(steps, 8, SHAPE[0] * SHAPE[2], generator=g, dtype=dtype)  # (T, N, features)
        for m in (fast, ref, loop):
            m.train(mode == "train")
        got = run(fast, type(fast).__call__, x)
        assert_same(got, run(ref, REFERENCE[cell], x), rtol, atol)
        assert_same(got, run(loop, type(loop).__call__, x), rtol, atol)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_fast_paths_equal_the_step_loop_in_float64(cell, norm, c_calls):
    compare(cell, norm, dtype=torch.float64, rtol=1e-9, atol=1e-11)
    took_c(c_calls, cell, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_fast_paths_equal_the_step_loop_in_float32(cell, norm, c_calls):
    extra = ["norm.num_groups=2"] if norm == "gn" else []  # groups of 4 values round too coarsely to compare
    compare(cell, norm, *extra, dtype=torch.float32, rtol=1e-4, atol=2e-5)
    took_c(c_calls, cell, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_a_second_backward_through_the_same_graph_gives_the_same_gradients(cell, norm, kernels):
    """retain_graph, or autograd.grad on two losses of one forward: each pass's gradients are the step
    loop's, not the sum of the passes so far."""
    fast = make_cell(cell, norm, dtype=torch.float64)
    loop = copy.deepcopy(fast)
    loop.use_loop = True
    x = torch.randn(12, 8, SHAPE[0] * SHAPE[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = [torch.linspace(a, b, fast.hidden_size, dtype=torch.float64) for a, b in ((-1, 1), (2, -3))]
    for m in (fast, loop):
        m.train()
    out, out_loop = fast(x), loop(x)
    for w in weights * 2:  # each loss twice: a repeated pass must not add to the previous one
        got = torch.autograd.grad((out * w).sum(), list(fast.parameters()), retain_graph=True)
        want = torch.autograd.grad((out_loop * w).sum(), list(loop.parameters()), retain_graph=True)
        for (name, _), a, b in zip(fast.named_parameters(), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_bn_variants(cell, kernels):
    """Cumulative running averages (momentum null), no running averages at all, and a sequence longer
    than the per-step rows (its last steps share the last row)."""
    compare(cell, "bn", "norm.momentum=null", dtype=torch.float64, rtol=1e-9, atol=1e-11)
    compare(cell, "bn", "norm.track_running_stats=false", dtype=torch.float64, rtol=1e-9, atol=1e-11)
    compare(cell, "bn", dtype=torch.float64, rtol=1e-9, atol=1e-11, steps=15)
    compare(cell, "gn", "norm.num_groups=2", dtype=torch.float64, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", CELLS)
def test_hooked_norms_run_the_step_loop(cell):
    """A hook on a per-step norm (PreciseBN's) sees every step's call, with its step index."""
    fast = make_cell(cell, "bn")
    seen = []
    handle = fast.norm_h.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    x = torch.randn(12, 4, SHAPE[0] * SHAPE[2])
    with torch.no_grad():
        out = fast(x)
    handle.remove()
    assert seen == list(range(12))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), out)


def test_forward_work_counts_the_step_loop():
    """forward_work counts the calls of the step loop, whichever path training takes."""
    cfg = compose(["data=synthetic", *small_overrides("rnn", "ln")])
    net = build_model(cfg.model, SHAPE, 10, runner.norm_factory(cfg), 0)
    calls, _ = forward_work(net, SHAPE)
    assert calls >= 3 * SHAPE[1]  # w_h, norm_h and norm_c at every step
    assert not net.cell.use_loop


@pytest.mark.parametrize("cell", CELLS)
def test_inference_mode_forward(cell):
    fast = make_cell(cell, "ln").eval()
    x = torch.randn(12, 4, SHAPE[0] * SHAPE[2])
    with torch.inference_mode():
        out = fast(x)
    with torch.no_grad():
        torch.testing.assert_close(out, REFERENCE[cell](fast, x), rtol=1e-5, atol=1e-6)


# The cells' parameter and buffer names as checkpoints made before the fast paths hold them: a run's
# saved state_dict must load into today's cells unchanged (no migration).
SAVED_NAMES = {
    ("lstm", "bn"): ["bias", "w_x.weight", "w_h.weight"] + [
        f"{norm}.{name}" for norm in ("norm_x", "norm_h", "norm_c")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")],
    ("lstm", "ln"): ["bias", "w_x.weight", "w_h.weight"] + [
        f"{norm}.norm.{name}" for norm in ("norm_x", "norm_h", "norm_c") for name in ("weight", "bias")],
    ("gru", "bn"): ["bias", "bias_hn", "w_x.weight", "w_h.weight"] + [
        f"{norm}.{name}" for norm in ("norm_x", "norm_h")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")],
    ("gru", "gn"): ["bias", "bias_hn", "w_x.weight", "w_h.weight"] + [
        f"{norm}.norm.{name}" for norm in ("norm_x", "norm_h") for name in ("weight", "bias")],
}


@pytest.mark.parametrize("cell, norm", list(SAVED_NAMES))
def test_state_dict_names_are_those_of_saved_checkpoints(cell, norm):
    fast = make_cell(cell, norm)
    assert list(fast.state_dict()) == SAVED_NAMES[cell, norm]
    again = make_cell(cell, norm, seed=1)
    again.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(12, 4, SHAPE[0] * SHAPE[2])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), fast.eval()(x))
