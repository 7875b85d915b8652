"""Planning at scale: runner.check once per combination of the settings it reads, every job still judged."""

from __future__ import annotations

import pytest

import normbench.runner
from normbench import sweep
from normbench.config import compose
from normbench.errors import UserError
from normbench.sweep.planning import NOT_CHECKED

from conftest import REFUSED, TINY_DATA, small_overrides

TINY = [*TINY_DATA, "model=mlp", "model.width=16", "epochs=1", "device=cpu"]


class Recording:
    """A config whose top-level settings record being read."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._cfg, name)


@pytest.mark.parametrize("model, norm", [("mlp", "bn"), ("cnn", "gn"), ("resnet20", "ln"), ("rnn", "bn"),
                                         ("cnn", "in"), ("mlp", "in")])
def test_runner_check_reads_no_setting_the_plan_leaves_out_of_its_key(tmp_path, model, norm):
    """CheckCache shares one check between jobs that differ only in NOT_CHECKED settings; that is right
    only while runner.check reads none of them (the seed only seeds the throwaway model's weights)."""
    cfg = Recording(compose([*TINY_DATA, *small_overrides(model, norm), f"results_dir={tmp_path}"]))
    try:
        normbench.runner.check(cfg)
    except UserError:
        assert (model, norm) in REFUSED
    assert {"data", "model", "norm"} <= cfg.read  # it was read through the recording
    assert cfg.read & set(NOT_CHECKED) <= {"seed"}


def test_each_combination_is_checked_once_and_every_job_judged(tmp_path, monkeypatch):
    checked = []
    real = normbench.runner.check

    def counting(cfg):
        checked.append((cfg.norm.name, cfg.batch_size))
        return real(cfg)

    monkeypatch.setattr(normbench.runner, "check", counting)
    planned = sweep.plan([*TINY, "norm=in,bn,ln", "batch_size=8,16", "lr=0.1,0.2", "seed=range(3)",
                          f"results_dir={tmp_path}"], dry_run=True)
    assert len(planned) == 3 * 2 * 2 * 3
    assert sorted(checked) == sorted({(n, b) for n in ("in", "bn", "ln") for b in (8, 16)})
    invalid = [p for p in planned if p.state == "invalid"]
    assert len(invalid) == 12 and all("instance norm" in p.error and "norm=in" in p.label for p in invalid)
    assert all(p.state == "new" and p.cost > 0 for p in planned if p not in invalid)
    assert len({p.run_id for p in planned if p.run_id}) == 24


def test_a_long_sequential_sweep_trains_while_it_is_planned_with_the_same_results(tmp_path, monkeypatch):
    """With OVERLAP_JOBS at 1, the 4-run sweep trains its first run before the rest is planned (planning of
    the later jobs waits until a run has started training); its runs equal those of a sweep planned first."""
    import threading

    from normbench import results
    from normbench.sweep import planning

    args = [*TINY, "norm=bn,ln", "seed=0,1"]
    first = sweep.run([*args, f"results_dir={tmp_path / 'first'}"])
    assert first.trained == 4

    training = threading.Event()
    waited = []
    real_check, real_execute = planning.check_job, normbench.runner.execute

    def check_after_training_starts(job, *a, **k):
        if "seed=1" in job:
            waited.append(training.wait(timeout=120))
        return real_check(job, *a, **k)

    def execute(*a, **k):
        training.set()
        return real_execute(*a, **k)

    monkeypatch.setattr(planning, "check_job", check_after_training_starts)
    monkeypatch.setattr(normbench.runner, "execute", execute)
    monkeypatch.setattr(sweep, "OVERLAP_JOBS", 1)
    overlapped = sweep.run([*args, f"results_dir={tmp_path / 'overlapped'}"])
    assert waited == [True, True]  # the seed=1 jobs were planned after training had begun
    assert overlapped.trained == 4 and overlapped.failures == [] and len(overlapped.planned) == 4
    for p in first.planned:
        a, b = (results.read_metrics(tmp_path / w / "default" / p.run_id) for w in ("first", "overlapped"))
        columns = ["epoch", "train_loss", "test_acc", "test_acc_batch_stats"]
        assert a[columns].equals(b[columns])


def test_an_error_found_while_a_long_sweep_trains_stops_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "OVERLAP_JOBS", 1)
    with pytest.raises(UserError, match="unknown norm 'nope'"):
        sweep.run([*TINY, "norm=bn,nope", f"results_dir={tmp_path}"])
    from hydra.core.global_hydra import GlobalHydra

    assert not GlobalHydra.instance().is_initialized()
