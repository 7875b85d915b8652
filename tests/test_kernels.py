"""Building, caching and falling back from normbench's C kernels (normbench/kernels), with the
recurrent cells as their user.

Their numbers are tested against the step loop in tests/test_rnn_cells.py (the `kernels` fixture);
here: that they are built wherever a C compiler is (so that those tests do test them), kept in the
cache and rebuilt when the cached file is damaged, and that a machine without a compiler, with a
compiler that fails, or with NORMBENCH_NATIVE=0 trains on PyTorch's kernels with one reason given.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from conftest import small_overrides, tiny_run_overrides
from normbench import api
from normbench.config import compose
from normbench.models import build_model
from normbench.kernels import build
from normbench.models.rnn import native
from normbench.runner import norm_factory

HAVE_CC = shutil.which("cc") is not None


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """The test builds (or refuses) in an empty cache folder of its own, not the one conftest.py shares
    between tests, and without the library this process loaded before. Other tests share both: a
    build takes seconds."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))
    build.library.cache_clear()
    build.kernel.cache_clear()
    yield
    build.library.cache_clear()
    build.kernel.cache_clear()


def lstm(norm: str, dtype=torch.float32):
    cfg = compose(["data=synthetic", *small_overrides("rnn", norm), "model.cell=lstm"])
    return build_model(cfg.model, (1, 12, 10), 10, norm_factory(cfg), 0).cell.to(dtype)


def through_c(cell, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, int]:
    calls = []
    apply = native.NativeLSTMRecurrence.apply
    monkeypatch.setattr(native.NativeLSTMRecurrence, "apply", lambda *a: calls.append(1) or apply(*a))
    return cell(x), len(calls)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
def test_kernels_are_built_where_a_compiler_is_and_kept(monkeypatch, fresh_library):
    """Built once and kept; the build also removes what a killed build left (a folder older than an hour),
    but not a live build's folder."""
    cache = build.cache_dir()
    killed, live = cache / ".build-killed", cache / ".build-live"
    for folder in (killed, live):
        folder.mkdir(parents=True)
        (folder / "lstm_step-float.o").write_bytes(b"half an object file")
    old = time.time() - build.STALE_BUILD_S - 60
    os.utime(killed, (old, old))
    assert build.library() is not None, build.status()
    assert not killed.exists()
    assert (live / "lstm_step-float.o").exists()
    shutil.rmtree(live)
    assert build.status() == "C kernels"
    built = sorted(build.cache_dir().glob("normbench-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    build.library.cache_clear()
    monkeypatch.setattr(build, "_build", lambda *a: pytest.fail("built again although it was in the cache"))
    assert build.library() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in build.cache_dir().iterdir() if p.name.startswith(".build-")]  # no leftovers


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path, fresh_library):
    """In another cache folder: this process keeps the library it loaded from the first, whatever
    becomes of that file."""
    assert build.library() is not None
    (built,) = build.cache_dir().glob("normbench-*.so")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    damaged = build.cache_dir() / built.name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    assert build._load(["cc"]) is not None
    assert damaged.stat().st_size > 1000


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
def test_two_builds_at_once_both_load(fresh_library):
    results = []
    threads = [threading.Thread(target=lambda: results.append(build._load(["cc"]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(r is not None for r in results)
    assert len(list(build.cache_dir().glob("normbench-*.so"))) == 1


@pytest.mark.parametrize("env, why", [
    ({"NORMBENCH_NATIVE": "0"}, "NORMBENCH_NATIVE=0"),
    ({"CC": "no-such-compiler-here"}, "no C compiler: $CC is not on PATH"),
    ({"CC": "false"}, "building them failed"),
])
def test_without_kernels_the_cell_trains_on_pytorch_kernels(monkeypatch, env, why, fresh_library):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if env.get("CC") == "false" and shutil.which("false") is None:
        pytest.skip("no `false` command")
    assert build.library() is None
    assert build.status().startswith("PyTorch kernels only: ") and why in build.status()
    cell = lstm("gn")
    x = torch.randn(12, 4, 10)
    out, calls = through_c(cell, x, monkeypatch)
    assert calls == 0
    out.sum().backward()
    assert all(p.grad is not None for p in cell.parameters())
    assert not list(build.cache_dir().glob("normbench-*.so"))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_nan_and_infinity_go_through_as_in_pytorch(monkeypatch, norm):
    """A NaN anywhere in the input makes the output NaN, so that divergence is seen; and the C
    kernels' sigmoid and tanh saturate at infinity as PyTorch's do."""
    cell = lstm(norm).train()
    x = torch.randn(12, 4, 10)
    x[3, 1, 2] = float("nan")
    out, calls = through_c(cell, x, monkeypatch)
    assert calls == 1
    assert torch.isnan(out).any()
    lib = build.library()
    for real, dtype in (("float", torch.float32), ("double", torch.float64)):
        # one step of batch 2, hidden 1, no norm to speak of (LN over 4 gates, unit affine): the gates'
        # pre-activations are x, whatever a is
        x4 = torch.tensor([[float("inf"), float("-inf"), float("inf"), float("-inf")],
                           [float("nan"), 0.0, 0.0, 0.0]], dtype=dtype)
        a = torch.zeros(2, 4, dtype=dtype)
        s, c, tc, h = (torch.empty(2, k, dtype=dtype) for k in (4, 1, 1, 1))
        stats = [torch.empty(2, dtype=dtype) for _ in range(4)]
        ones, zeros, buf = torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype), torch.empty(8, dtype=dtype)
        getattr(lib, f"lstm_forward_{real}")(
            2, 1, a.data_ptr(), x4.data_ptr(), torch.zeros(2, 1, dtype=dtype).data_ptr(), s.data_ptr(), c.data_ptr(),
            tc.data_ptr(), h.data_ptr(), ones.data_ptr(), zeros.data_ptr(), 1, 0, 1e-5, stats[0].data_ptr(),
            stats[1].data_ptr(), None, ones.data_ptr(), zeros.data_ptr(), 1, 0, 1e-5, stats[2].data_ptr(),
            stats[3].data_ptr(), None, buf.data_ptr())
        assert s[0].tolist() == [1.0, 0.0, 1.0, -1.0]  # sigmoid(inf), sigmoid(-inf), sigmoid(inf), tanh(-inf)
        assert torch.isnan(s[1, 0]) and torch.isnan(h[1, 0])


def test_a_run_records_which_kernels_it_ran_on(results_dir):
    result = api.run(tiny_run_overrides(results_dir, model="rnn", norm="ln"))
    assert result.summary["kernels"] == build.status()
    ghost = api.run(tiny_run_overrides(results_dir, model="mlp", norm="bn", norm_batch_size=4))
    assert ghost.summary["kernels"] == build.status()
    other = api.run(tiny_run_overrides(results_dir, model="mlp", norm="ln"))
    assert "kernels" not in other.summary


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
def test_what_the_kernels_cannot_take_goes_to_pytorch(monkeypatch):
    """Sub-batches that do not divide the batch (PyTorch's path raises), parameters of another dtype
    than the input, and groups that do not divide the features never reach the C code."""
    from normbench.norms import ghost

    taken = []
    apply = ghost._NativeGhostNorm.apply
    monkeypatch.setattr(ghost._NativeGhostNorm, "apply", lambda *a: taken.append(1) or apply(*a))
    x = torch.randn(10, 6)
    with pytest.raises(RuntimeError):
        ghost.ghost_batch_norm(x, 4, torch.ones(6), torch.zeros(6), 1e-5)
    ghost.ghost_batch_norm(x.double(), 5, torch.ones(6), torch.zeros(6), 1e-5)  # float32 affine
    assert not taken
    ghost.ghost_batch_norm(x, 5, torch.ones(6), torch.zeros(6), 1e-5)
    assert taken
    p = torch.randn(3, 4, 12)
    assert native.takes(p, torch.ones(12), groups=4)
    assert not native.takes(p, torch.ones(12, dtype=torch.float64), groups=4)
    assert not native.takes(p, torch.ones(12), groups=5)
    assert not native.takes(p, torch.ones(12), groups=0)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc) on this machine")
@pytest.mark.parametrize("shape,group", [((64, 256), 8), ((64, 256), 2), ((12, 6, 7, 7), 4), ((8, 3, 28, 28), 2),
                                         ((6, 5, 9), 3)], ids=["mlp", "mlp-nbs2", "spatial-49", "spatial-784", "seq"])
def test_ghost_bn_in_float32_matches_pytorch_at_real_sizes(shape, group, monkeypatch):
    """At float32 and the sizes training uses (rows of 49 and 784 positions: the C sums' interleaved
    lanes and their remainders), the C kernel gives PyTorch's numbers to float32 rounding: output,
    gradients, and the running averages after their K updates."""
    from normbench.norms import ghost

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    weight, bias = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    probe = torch.randn(shape, generator=g)
    taken = []
    apply = ghost._NativeGhostNorm.apply
    monkeypatch.setattr(ghost._NativeGhostNorm, "apply", lambda *a: taken.append(1) or apply(*a))
    results = []
    for c_kernels in (True, False):
        if not c_kernels:
            monkeypatch.setattr(build, "library", lambda: None)
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        running = (torch.zeros(shape[1]), torch.ones(shape[1]), 0.1)
        out, mean, var = ghost.ghost_batch_norm(inputs[0], group, inputs[1], inputs[2], 1e-5, running)
        (out * probe).sum().backward()
        results.append([out, mean, var, *running[:2], *(t.grad for t in inputs)])
        assert len(taken) == 1  # the first pass took C, the second PyTorch
    names = ["out", "mean", "var", "running_mean", "running_var", "dx", "dweight", "dbias"]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)
