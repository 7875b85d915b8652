"""threads: null picks one thread for small training steps and the process's share of the cores otherwise;
threads: N sets it. The count a run used is in its summary; it never enters the run id."""

import pytest
import torch

from normbench import results, runner, threads
from normbench.config import compose, run_id
from normbench.errors import UserError

from conftest import tiny_run_overrides

REAL_BUSY = threads.busy  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.setattr(threads, "busy", lambda: False)  # the tests' own load must not decide
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._share = None


def test_small_steps_get_one_thread_large_ones_the_share():
    assert threads.choose(None, 2, 268_800) == 1  # the MLP at batch 2
    assert threads.choose(None, 32, 7_452_416) == threads.cores()  # the CNN at batch 32
    threads.set_share(3)
    assert threads.choose(None, 32, 7_452_416) == 3
    assert threads.choose(5, 2, 268_800) == 5  # set outright


@pytest.mark.parametrize("setting,expected", [("null", 1), ("3", 3)])
def test_the_run_uses_and_records_its_thread_count(results_dir, setting, expected):
    cfg = compose(tiny_run_overrides(results_dir, threads=setting))  # a tiny MLP step: small work
    summary = runner.execute(cfg).summary
    assert summary["threads"] == expected
    assert results.read_summary(results.run_dir(cfg))["threads"] == expected


def test_on_a_busy_machine_every_run_gets_one_thread(monkeypatch):
    monkeypatch.setattr(threads, "busy", lambda: True)
    assert threads.choose(None, 32, 7_452_416) == 1
    assert threads.choose(2, 32, 7_452_416) == 2  # unless set outright


def test_busy_reads_the_load_average(monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (threads.cores() + 1.0, 0.0, 0.0))
    assert REAL_BUSY()
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (threads.cores() * 1.0, 0.0, 0.0))
    assert not REAL_BUSY()


def test_threads_is_validated_and_not_part_of_the_run_id(results_dir):
    assert run_id(compose(tiny_run_overrides(results_dir, threads=1))) == run_id(compose(tiny_run_overrides(results_dir)))
    for bad in (0, 1025, 2**31, 10**20):  # the last ones overflowed torch.set_num_threads in a traceback
        with pytest.raises(UserError, match=r"threads must be in \[1, 1024\]"):
            compose(tiny_run_overrides(results_dir, threads=bad))


def test_a_sweep_worker_caps_large_runs_at_its_share(results_dir):
    """With --jobs, a worker's share of the cores is the most a run in it uses."""
    from normbench.models import build_model, forward_work

    cfg = compose(tiny_run_overrides(results_dir, "cnn", "bn", batch_size=16, **{"model.channels": "[64,64]"}))
    net = build_model(cfg.model, (1, 28, 28), 10, runner.norm_factory(cfg), 0)
    assert 16 * forward_work(net, (1, 28, 28))[1] >= threads.SMALL_STEP_MACS  # a large step: the share applies
    threads.set_share(1)
    assert runner.execute(cfg).summary["threads"] == 1


def test_more_threads_than_cores_gets_a_note(results_dir, monkeypatch):
    from typer.testing import CliRunner

    from normbench.cli import app

    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.over_cores_note([None, 2, 1]) is None
    assert "threads=8 is more than this machine's 2 cores" in threads.over_cores_note([None, 8, 3])
    dry = CliRunner().invoke(app, ["sweep", "--dry-run", *tiny_run_overrides(results_dir, threads=8)])
    assert dry.exit_code == 0 and "threads=8 is more than this machine's 2 cores" in dry.output
    ran = CliRunner().invoke(app, ["run", *tiny_run_overrides(results_dir, threads=2)])
    assert ran.exit_code == 0 and "more than this machine" not in ran.output
