"""Hostile input: one clear line, a non-zero exit, and nothing already written lost or altered."""

import errno
import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.cli import app
from normbench.config import compose
from normbench.data import decoded
from normbench.errors import DataError, ResultsError

from conftest import TINY_DATA, tiny_run_overrides, write_idx_dataset, one_error_line

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})



def completed_run(results_dir: Path) -> Path:
    result = invoke("run", *tiny_run_overrides(results_dir))
    assert result.exit_code == 0, result.output
    return next(p for p in (results_dir / "default").iterdir() if p.is_dir())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_instance_norm_on_rnn_is_refused(results_dir):
    one_error_line(invoke("run", *TINY_DATA, "model=rnn", "norm=in", f"results_dir={results_dir}"),
                   "instance norm", "recurrent")


def test_truncated_mnist_file_is_refused_not_trained_on(tmp_path, offline):
    write_idx_dataset(tmp_path, n_train=64, n_test=16)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    cfg = compose(["data=mnist", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="corrupt or truncated"):
        decoded(cfg.data)


def test_checksum_list_mismatch_is_refused(tmp_path, offline):
    write_idx_dataset(tmp_path, n_train=64, n_test=16)
    raw = tmp_path / "MNIST" / "raw"
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(raw.iterdir()))
    (tmp_path / "SHA256SUMS").write_text(sums)
    cfg = compose(["data=mnist", f"data.root={tmp_path}"])
    assert decoded(cfg.data).train_x.shape[0] == 64  # matching sums: accepted
    labels = raw / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1  # one flipped bit: same size, parses fine, wrong labels
    labels.write_bytes(bytes(data))
    from normbench import data as data_module
    data_module._DECODED.clear()
    with pytest.raises(DataError, match="does not match its checksum"):
        decoded(cfg.data)


def test_results_dir_that_is_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_error_line(invoke("run", *tiny_run_overrides(blocker / "results")), "cannot write results")


def test_disk_full_while_writing_keeps_earlier_results(results_dir, monkeypatch):
    folder = completed_run(results_dir)
    before = snapshot(results_dir)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ResultsError, match="No space left on device"):
        results.write_summary(folder, {"status": "completed", "overwritten": True})
    result = invoke("run", *tiny_run_overrides(results_dir), "--force")
    one_error_line(result, "could not write", "No space left on device", "there before, if any, is unchanged")
    monkeypatch.undo()
    assert snapshot(results_dir) == before  # every earlier byte intact, no temp files left


def test_yaml_syntax_error_in_user_config_dir(tmp_path, results_dir):
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "broken.yaml").write_text("name: gn\nnum_groups: [1, 2\n")
    line = one_error_line(invoke("run", "--config-dir", str(tmp_path), "norm=broken", *TINY_DATA,
                                 f"results_dir={results_dir}"))
    assert "broken" in line


def test_a_config_cannot_import_code(tmp_path, results_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "evil.yaml").write_text(
        "defaults:\n  - schema_mlpconfig\n  - _self_\nname: mlp\n_target_: os.system\n")
    one_error_line(invoke("run", "--config-dir", str(tmp_path), "model=evil", *TINY_DATA,
                          f"results_dir={results_dir}"), "_target_")
    assert not results_dir.exists()


def test_hand_edited_run_folder_is_skipped_by_report(results_dir):
    folder = completed_run(results_dir)
    (folder / "summary.json").write_text('{"status": "completed"')  # truncated by hand
    result = invoke("report", str(results_dir / "default"))
    assert result.exit_code == 2 and "no finished runs" in result.output
