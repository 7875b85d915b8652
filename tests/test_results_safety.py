"""Results are sacred: nothing finished is lost, nothing outside results_dir is touched, everything read back
from disk is untrusted, and two processes never train one run at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import normbench.runner
from normbench import report, results, runner, sweep
from normbench.cli import app
from normbench.config import compose, run_id
from normbench.errors import UserError

from conftest import tiny_run_overrides, one_error_line

cli = CliRunner()


def invoke(*args: str):
    return cli.invoke(app, list(args), env={"COLUMNS": "200"})



def finished(results_dir: Path, *extra: str) -> tuple[list[str], Path]:
    overrides = [*tiny_run_overrides(results_dir), *extra]
    result = invoke("run", *overrides)
    assert result.exit_code == 0, result.output
    return overrides, results.run_dir(compose(overrides))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


# ---- 1. a finished run is never overwritten -------------------------------------------------------------


def test_running_a_finished_run_again_shows_it_and_trains_nothing(results_dir):
    overrides, folder = finished(results_dir)
    before = tree(folder)
    result = invoke("run", *overrides)
    assert result.exit_code == 0, result.output
    assert "already finished (completed), not trained again" in result.output
    assert tree(folder) == before


def test_force_trains_aside_and_an_interrupt_leaves_the_old_result(results_dir, monkeypatch):
    overrides, folder = finished(results_dir)
    before = tree(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(normbench.runner, "fit", interrupted)
    assert invoke("run", *overrides, "--force").exit_code == 130
    assert tree(folder) == before
    assert report.build(folder.parent).runs.shape[0] == 1


def test_force_replaces_the_result_once_the_new_one_completes(results_dir):
    overrides, folder = finished(results_dir)
    old = results.read_summary(folder)
    (folder / "summary.json").write_text(json.dumps({**old, "the_old_one": True}))
    assert invoke("run", *overrides, "--force").exit_code == 0
    assert "the_old_one" not in results.read_summary(folder)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")] == []


def test_sigkill_of_a_forced_rerun_keeps_the_finished_result(results_dir):
    overrides, folder = finished(results_dir, "epochs=30", "data.num_train=1024")
    before = tree(folder)
    attempt = folder.with_name(f".{folder.name}.attempt")
    proc = subprocess.Popen([sys.executable, "-m", "normbench", "run", *overrides, "--force"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (attempt / "metrics.csv").exists():
            time.sleep(0.01)  # wait for an event (its first epoch on disk), not for a time
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert tree(folder) == before
    summaries, _, warnings = results.scan(folder.parent)
    assert [s["run_id"] for s in summaries] == [folder.name]
    assert warnings == [f"{attempt}: a new attempt (--force, --retry-failed) at run {folder.name}, under way or "
                        "interrupted: the next `normbench run` or sweep of that config finishes it"]


def test_a_kill_between_the_two_renames_of_a_replacement_is_mended(results_dir):
    overrides, folder = finished(results_dir)
    replaced = folder.with_name(f".{folder.name}.replaced")
    folder.rename(replaced)  # the moment after the first rename
    shutil.copytree(replaced, folder.with_name(f".{folder.name}.attempt"))  # and the attempt still beside it
    _, _, warnings = results.scan(folder.parent)  # a report before it is mended says where the result is
    finishes = "the next `normbench run` or sweep of that config finishes it"
    assert sorted(warnings) == sorted([
        f"{folder.with_name(f'.{folder.name}.attempt')}: a new attempt (--force, --retry-failed) at run "
        f"{folder.name}, under way or interrupted: {finishes}",
        f"{replaced}: the result of run {folder.name}, set aside by a replacement (--force, --retry-failed) that "
        f"was interrupted; left out of this report: {finishes}"])
    result = invoke("run", *overrides)
    assert result.exit_code == 0 and "already finished" in result.output
    assert folder.is_dir() and not replaced.exists()


# ---- 2. leftovers of a kill are cleaned wherever they are met, and only ours ----------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_planning_removes_a_finished_runs_stale_checkpoint_and_temp_files(results_dir, keep):
    overrides, folder = finished(results_dir, f"keep_checkpoint={str(keep).lower()}")
    (folder / results.CHECKPOINT).write_bytes(b"left by a kill")
    (folder / f".summary.json.x{results.TEMP_SUFFIX}").write_text("{")
    (folder / ".notes.tmp").write_text("mine")
    [planned] = sweep.plan(overrides)
    assert planned.state == "completed"
    assert (folder / results.CHECKPOINT).exists() == keep
    assert not list(folder.glob(f"*{results.TEMP_SUFFIX}")) and (folder / ".notes.tmp").read_text() == "mine"


def test_scanning_removes_a_stale_checkpoint_too(results_dir):
    _, folder = finished(results_dir)
    (folder / results.CHECKPOINT).write_bytes(b"left by a kill")
    results.scan(folder.parent)
    assert not (folder / results.CHECKPOINT).exists()


# ---- 3. nothing is written outside results_dir --------------------------------------------------------


def test_a_run_folder_that_is_a_symlink_out_of_results_dir_is_refused(results_dir, tmp_path):
    overrides = tiny_run_overrides(results_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / results.CHECKPOINT).write_bytes(b"someone else's")
    folder = results.run_dir(compose(overrides))
    folder.parent.mkdir(parents=True)
    folder.symlink_to(outside, target_is_directory=True)
    one_error_line(invoke("run", *overrides), "outside results_dir")
    assert [p.name for p in outside.iterdir()] == [results.CHECKPOINT]
    assert sweep.plan(overrides)[0].state == "invalid"


def test_an_experiment_folder_that_is_a_symlink_out_is_refused(results_dir, tmp_path):
    (tmp_path / "outside").mkdir()
    results_dir.mkdir()
    (results_dir / "default").symlink_to(tmp_path / "outside", target_is_directory=True)
    one_error_line(invoke("run", *tiny_run_overrides(results_dir)), "outside results_dir", "(remove the symlink)")
    # a sweep names the folder too, not Hydra's bookkeeping folder inside it, which the user never set
    line = one_error_line(invoke("sweep", *tiny_run_overrides(results_dir), "--dry-run"),
                          f"{results_dir / 'default'} leads to", "(remove the symlink)")
    assert "hydra" not in line
    assert list((tmp_path / "outside").iterdir()) == []


def test_results_dir_itself_may_be_a_symlink(results_dir, tmp_path):
    (tmp_path / "scratch").mkdir()
    results_dir.symlink_to(tmp_path / "scratch", target_is_directory=True)
    assert invoke("run", *tiny_run_overrides(results_dir)).exit_code == 0
    assert list((tmp_path / "scratch" / "default").glob("mlp-bn-*"))


@pytest.mark.parametrize("key", ["hydra.sweep.dir", "hydra.run.dir"])
def test_hydra_bookkeeping_outside_results_dir_is_refused(results_dir, tmp_path, key):
    elsewhere = tmp_path / "etc" / "x"
    result = invoke("sweep", *tiny_run_overrides(results_dir), f"{key}={elsewhere}", "--dry-run")
    line = one_error_line(result, f"{key} ({elsewhere}): Hydra's own folders must stay inside results_dir too: "
                                  f"{elsewhere} is outside results_dir")
    assert "symlink" not in line  # there is none
    assert not elsewhere.exists() and not (tmp_path / "etc").exists()
    ran = invoke("run", *tiny_run_overrides(results_dir), f"{key}={elsewhere}")  # one config: Hydra's folders unused
    assert ran.exit_code == 0 and f"note: {key}: Hydra's settings" in ran.output and "normbench run ignores them" \
        in ran.output
    assert not elsewhere.exists() and not (tmp_path / "etc").exists()


def test_an_experiment_name_that_climbs_out_is_refused_by_its_own_rule(results_dir):
    one_error_line(invoke("sweep", *tiny_run_overrides(results_dir), "name=../x", "--dry-run"),
                   "name '../x' must be letters, digits")


def test_dry_run_writes_nothing(results_dir):
    result = invoke("sweep", *tiny_run_overrides(results_dir), "norm=bn,ln", "--dry-run")
    assert result.exit_code == 0, result.output
    assert not results_dir.exists()
    _, folder = finished(results_dir)
    (folder / results.CHECKPOINT).write_bytes(b"left by a kill")
    before = tree(results_dir)
    assert invoke("sweep", *tiny_run_overrides(results_dir), "--dry-run").exit_code == 0
    assert tree(results_dir) == before  # not even the cleaning of leftovers


# ---- 4. two processes, one run --------------------------------------------------------------------------


def test_a_run_being_trained_is_skipped_by_others_and_its_lock_dies_with_its_holder(results_dir):
    cfg = compose(tiny_run_overrides(results_dir))
    folder = results.run_dir(cfg)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom normbench import results\n"
        f"with results.run_lock(Path({str(folder)!r})):\n    print('locked', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sweep.plan(tiny_run_overrides(results_dir))[0].state == "busy"
        assert sweep.train_job(cfg)["status"] == "busy"
        one_error_line(invoke("run", *tiny_run_overrides(results_dir)), "being trained by another process")
        holder.send_signal(signal.SIGKILL)  # the OS frees the lock of a killed holder
        holder.wait()
        assert sweep.train_job(cfg)["status"] == "completed"
    finally:
        holder.kill()
        holder.wait()


def test_two_identical_sweeps_at_once_train_every_run_once(results_dir):
    grid = [*tiny_run_overrides(results_dir), "norm=bn,ln", "seed=0,1,2", "data.num_train=512"]
    procs = [subprocess.Popen([sys.executable, "-m", "normbench", "sweep", *grid], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [int(re.search(r"; trained (\d+)", out).group(1)) for out in outputs]
    assert sum(trained) == 6, outputs
    summaries, _, warnings = results.scan(results_dir / "default")
    assert len(summaries) == 6 and {s["status"] for s in summaries} == {"completed"} and not warnings


# ---- 5. everything read from disk is untrusted ----------------------------------------------------------


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"text"', "{", "null", "\udcff"])
def test_a_damaged_summary_never_crashes_and_never_blocks_the_run(results_dir, content):
    overrides, folder = finished(results_dir)
    (folder / "summary.json").write_text(content, errors="surrogateescape")
    dry = invoke("sweep", *overrides, "--dry-run")
    assert dry.exit_code == 0 and "Traceback" not in dry.output, dry.output
    assert invoke("run", *overrides).exit_code == 0
    assert results.read_summary(folder)["status"] == "completed"


@pytest.mark.parametrize("edit, why", [
    (lambda s: s.update(config={}), "has no config"),
    (lambda s: s.update(final="x"), "malformed 'final'"),
    (lambda s: s["config"].update(epochs=99), "does not match its config_hash"),
    (lambda s: s.update(wall_seconds="slow"), "malformed 'wall_seconds'"),
    (lambda s: s.update(shifts={"contrast:0.5": "x"}), "malformed 'shifts'"),
    (lambda s: s.update(status="Completed"), "unknown status 'Completed'"),
    (lambda s: s["final"].update(test_acc=1e9), "accuracy outside 0-100% (final.test_acc = 1e+09"),
    (lambda s: s.update(best_test_acc=-3.0), "accuracy outside 0-100% (best_test_acc = -3"),
])
def test_a_hand_edited_summary_is_skipped_with_a_warning_and_trained_again_beside_it(results_dir, edit, why):
    overrides, folder = finished(results_dir)
    _, good = finished(results_dir, "seed=1")
    summary = results.read_summary(folder)
    edit(summary)
    damaged = json.dumps(summary)
    (folder / "summary.json").write_text(damaged)
    result = invoke("report", str(folder.parent))
    assert result.exit_code == 0, result.output
    assert f"warning: skipped {folder}: " in result.output and why in result.output
    dry = invoke("sweep", *overrides, "--dry-run")
    assert dry.exit_code == 0 and "1 to train" in dry.output and "damaged" in dry.output, dry.output
    again = invoke("run", *overrides)  # (a malformed 'final' was shown as finished, and crashed the table)
    assert again.exit_code == 0 and "Traceback" not in again.output, again.output
    aside = folder.with_name(f".{folder.name}.damaged-1")
    said = " ".join(again.output.split())
    assert "its summary.json cannot be trusted" in said and why in said and "the run trains afresh" in said
    assert (aside / "summary.json").read_text() == damaged  # nothing lost
    assert results.summary_problem(results.read_summary(folder), folder) is None
    summaries, _, warnings = results.scan(folder.parent)
    assert sorted(s["run_id"] for s in summaries) == sorted([folder.name, good.name])
    assert warnings == [f"{aside}: the damaged result of run {folder.name}, kept aside when the run was trained "
                        "again; remove it once you no longer need it"]


def test_an_unreadable_run_folder_is_skipped_with_a_warning(results_dir, monkeypatch):
    _, folder = finished(results_dir)
    _, other = finished(results_dir, "seed=1")
    def denied(real):
        def method(path, *args, **kwargs):  # what a folder of mode 000 does to a reader that is not root
            if folder in path.parents:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return method

    for name in ("exists", "open", "stat"):
        monkeypatch.setattr(Path, name, denied(getattr(Path, name)))
    real_open = os.open

    def os_open(path, *args, **kwargs):  # what results.read_regular opens with
        if folder in Path(os.fsdecode(path)).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    summaries, _, warnings = results.scan(folder.parent)
    assert [s["run_id"] for s in summaries] == [other.name]
    assert any(str(folder) in w for w in warnings)


@pytest.mark.parametrize("content", ["{}", "[{}]", "[1, 2]", '[{"command": "x"}, {"comm'])
def test_a_damaged_sweeps_json_is_kept_aside_not_crashed_on(results_dir, content):
    overrides, folder = finished(results_dir)
    experiment = folder.parent
    (experiment / "sweeps.json").write_text(content)
    result = invoke("sweep", *overrides)
    assert result.exit_code == 0, result.output
    assert invoke("report", str(experiment)).exit_code == 0
    recorded = json.loads((experiment / "sweeps.json").read_text())
    assert recorded[-1]["command"].startswith("normbench sweep")
    assert (experiment / "sweeps.json.damaged-1").read_text() == content
    assert "kept aside as sweeps.json.damaged-1" in " ".join(result.output.split())


def test_a_forged_checkpoint_with_wrong_shapes_means_a_fresh_start(results_dir, monkeypatch):
    overrides = [*tiny_run_overrides(results_dir), "epochs=2"]
    cfg = compose(overrides)

    class Stop(BaseException):  # like a kill: the run stays "running", with its first epoch's checkpoint
        pass

    real_fit = runner.fit

    def stop_after_one_epoch(cfg_, model, data, progress=None, resume=None, on_epoch_end=None):
        def save_then_stop(state):
            on_epoch_end(state)
            raise Stop
        return real_fit(cfg_, model, data, progress, resume, save_then_stop)

    monkeypatch.setattr(runner, "fit", stop_after_one_epoch)
    with pytest.raises(Stop):
        runner.execute(cfg)
    monkeypatch.undo()
    folder = results.run_dir(cfg)
    state = torch.load(folder / results.CHECKPOINT, weights_only=True)
    state["model"] = {k: torch.zeros(3) for k in state["model"]}
    torch.save(state, folder / results.CHECKPOINT)
    summary = runner.execute(cfg).summary
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2


# ---- 6. the user's permissions, durable renames -----------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        results.atomic_write(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == mode


def test_the_rename_is_made_durable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results.atomic_write(tmp_path / "summary.json", "{}")
    assert synced == [False, True]  # the file, then its folder after the rename


# ---- 9.-12. sweeps: failures said, jobs capped, output that cannot encode ± -------------------------------


def test_a_sweep_whose_every_run_fails_before_its_folder_says_why(results_dir, monkeypatch):
    def refuse(cfg, device):
        raise UserError("cannot write results to /nowhere: Read-only file system")

    monkeypatch.setattr(runner, "prepare", refuse)
    result = invoke("sweep", *tiny_run_overrides(results_dir), "seed=0,1")
    assert result.exit_code == 1, result.output
    assert "no finished runs" not in result.output
    assert "2 runs (" in result.output and "Read-only file system" in result.output


def test_a_results_dir_that_cannot_be_written_is_one_line_with_dry_run_too(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for extra in ([], ["--dry-run"]):
        one_error_line(invoke("sweep", *tiny_run_overrides(blocker / "r"), "seed=0,1", *extra),
                       "cannot write results")


@pytest.mark.parametrize("value, jobs", [("-1", 2), ("null", 2), ("1", 2)])
def test_max_batch_size_minus_one_or_null_means_all(results_dir, value, jobs):
    result = invoke("sweep", *tiny_run_overrides(results_dir), "seed=0,1", f"hydra.sweeper.max_batch_size={value}")
    assert result.exit_code == 0, result.output
    assert f"trained {jobs} " in result.output


def test_max_batch_size_zero_is_refused(results_dir):
    one_error_line(invoke("sweep", *tiny_run_overrides(results_dir), "hydra.sweeper.max_batch_size=0",
                          "--dry-run"), "max_batch_size must be >= 1")


def test_jobs_are_capped_by_cores_and_memory(monkeypatch):
    monkeypatch.setattr(sweep, "cpu_cores", lambda: 2)
    monkeypatch.setattr(sweep, "_available_memory_gb", lambda: 24.0)
    assert sweep.capped_jobs(2) == (2, None)
    jobs, note = sweep.capped_jobs(1000)
    assert jobs == 2 and "--jobs 1000 capped at 2" in note and "cores" in note
    monkeypatch.setattr(sweep, "_available_memory_gb", lambda: 1.0)
    jobs, note = sweep.capped_jobs(2)
    assert jobs == 1 and "memory" in note


def test_output_that_cannot_encode_plus_minus_does_not_crash(results_dir):
    overrides = [*tiny_run_overrides(results_dir), "seed=0,1"]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    swept = subprocess.run([sys.executable, "-m", "normbench", "sweep", *overrides], env=env,
                           capture_output=True, text=True, encoding="ascii")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    reported = subprocess.run([sys.executable, "-m", "normbench", "report", str(results_dir / "default")], env=env,
                              capture_output=True, text=True, encoding="ascii")
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert "+/-" in swept.stdout + reported.stdout
    assert run_id(compose(tiny_run_overrides(results_dir))) in {p.name for p in (results_dir / "default").iterdir()}


@pytest.mark.parametrize("final", [None, {"test_acc": None}, {"test_acc": float("nan")}])
def test_a_completed_run_without_a_test_accuracy_is_skipped_with_a_warning(results_dir, final):
    """A hand-edited summary that says completed but carries no accuracy is not counted as a result."""
    for seed in (0, 1):
        runner.execute(compose(tiny_run_overrides(results_dir, seed=seed)))
    folder = sorted((results_dir / "default").glob("mlp-bn-*"))[0]
    summary = json.loads((folder / "summary.json").read_text())
    summary["final"] = final
    (folder / "summary.json").write_text(json.dumps(summary))
    summaries, _, skipped = results.scan(results_dir / "default")
    assert len(summaries) == 1 and any("no final test accuracy" in w and folder.name in w for w in skipped)


def test_a_file_in_the_run_folders_place_is_one_line_and_left_alone(results_dir):
    overrides = tiny_run_overrides(results_dir)
    folder = results.run_dir(compose(overrides))
    folder.parent.mkdir(parents=True)
    folder.write_text("mine")
    result = invoke("run", *overrides)
    assert result.exit_code == 2 and "not a folder is in the run folder's place" in result.output
    assert "Traceback" not in result.output
    swept = invoke("sweep", *overrides)
    one_error_line(swept, "every job is invalid (1)", "move it away")
    assert folder.read_text() == "mine"


def test_a_sweep_and_its_report_agree_on_a_finished_run_with_a_damaged_curve(results_dir):
    """An emptied metrics.csv: the sweep counts the run as done, and its report keeps the run's result (from
    summary.json), leaving out only its training curve, with the warning `report` gives. A run alone too."""
    overrides, folder = finished(results_dir)
    finished(results_dir, "seed=1")
    (folder / "metrics.csv").write_text("")
    result = invoke("sweep", *overrides[:-1], "seed=0,1", overrides[-1])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"warning: {folder}: metrics.csv unreadable" in said and "training curve is left out" in said
    assert "2 runs: 0 planned to train, 2 already done" in said and "missing" not in said
    assert len(pd.read_csv(folder.parent / "runs.csv")) == 2
    alone = invoke("sweep", *overrides)
    assert alone.exit_code == 0 and "training curve is left out" in " ".join(alone.output.split()), alone.output


def test_a_symlinked_run_folder_is_read_and_never_written_through(results_dir, tmp_path):
    overrides, folder = finished(results_dir)
    outside = tmp_path / "elsewhere" / folder.name
    outside.parent.mkdir()
    folder.rename(outside)
    (outside / results.CHECKPOINT).write_bytes(b"left by a kill")  # what a report would clean up in its own folder
    folder.symlink_to(outside, target_is_directory=True)
    result = invoke("report", str(folder.parent))
    assert result.exit_code == 0, result.output
    assert "is a symlink to" in result.output and "nothing is written there" in result.output
    assert (outside / results.CHECKPOINT).read_bytes() == b"left by a kill"
    misnamed = folder.with_name(folder.name.replace("-s0-", "-s9-"))  # a symlink whose run is another's
    folder.rename(misnamed)
    alone = invoke("report", str(folder.parent))
    assert alone.exit_code == 2 and "(1 skipped; the first: skipped" in alone.output, alone.output
    assert "belongs to run" in alone.output and "its run is read" not in alone.output


def test_a_run_folder_linked_to_another_runs_folder_never_overwrites_it(results_dir):
    """A run's folder that is a symlink to another finished run's folder inside results_dir: training through it
    overwrote that run's result. It is refused (run: one line; sweep: that job invalid), the target untouched."""
    overrides, other = finished(results_dir)
    mine = tiny_run_overrides(results_dir, seed=1)
    folder = results.experiment_dir(compose(mine)) / run_id(compose(mine))
    folder.symlink_to(other.name, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    one_error_line(invoke("run", *mine), f"{folder} is a symlink to {other}", "remove the symlink")
    planned = sweep.plan(mine)
    assert planned[0].state == "invalid" and "is a symlink" in planned[0].error
    swept = invoke("sweep", *mine)
    assert swept.exit_code == 2 and "is a symlink" in swept.output, swept.output
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_a_run_folder_that_cannot_be_read_is_one_line(results_dir, monkeypatch):
    """chmod 000 on a run's folder (as a user who is not root): `run` is one line, a sweep lists the job as invalid."""
    overrides, folder = finished(results_dir)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != folder and real_access(path, mode, **kw))
    one_error_line(invoke("run", *overrides), f"cannot read the run folder {folder}: Permission denied")
    assert sweep.plan(overrides)[0].state == "invalid"


def test_keeping_a_damaged_folder_aside_never_replaces_anything(tmp_path):
    folder = tmp_path / "mlp-bn-b8-s0-abc"
    folder.mkdir()
    (folder / "summary.json").write_text("{")
    (tmp_path / ".mlp-bn-b8-s0-abc.damaged-1").symlink_to(tmp_path / "gone")  # a dangling link in the way
    (tmp_path / ".mlp-bn-b8-s0-abc.damaged-2").write_text("a file in the way")
    aside = results.keep_damaged_aside(folder)
    assert aside.name == ".mlp-bn-b8-s0-abc.damaged-3" and (aside / "summary.json").read_text() == "{"
    assert (tmp_path / ".mlp-bn-b8-s0-abc.damaged-2").read_text() == "a file in the way" and not folder.exists()


def test_sweep_progress_never_shows_an_old_or_a_damaged_result_as_the_outcome(results_dir):
    from normbench.sweep.watching import FolderWatcher

    overrides, folder = finished(results_dir)
    planned = sweep.plan(overrides)
    planned[0].state = "diverged"  # as if it had diverged: --retry-failed trains it again
    watcher = FolderWatcher(planned, lambda *changed: None, retry_failed=True)
    assert watcher.poll() == {folder.name: None}  # the old result is still there, not yet replaced
    summary = results.read_summary(folder)
    results.write_summary(folder, {**summary, "wall_seconds": 1.5})  # the new attempt took its place
    assert watcher.poll()[folder.name]["wall_seconds"] == 1.5
    results.write_summary(folder, {**summary, "final": "x"})
    assert FolderWatcher(planned, lambda *changed: None).poll() == {folder.name: None}  # damaged: not a result
