"""The Python API: returns data, prints nothing, and the README's notebook example runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import normbench
from conftest import TINY_DATA
from normbench import plugins
from normbench.api import as_overrides

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.fixture(autouse=True)
def no_plugins():
    plugins.reset()
    yield
    plugins.reset()


def test_import_normbench_is_torch_free_and_names_the_api():
    code = ("import json, sys, normbench; names = [n for n in ('run', 'sweep', 'load', 'check', 'register_norm') "
            "if n in dir(normbench)]; print(json.dumps([names, sorted(m for m in ('torch', 'pandas', 'hydra') "
            "if m in sys.modules)]))")
    names, heavy = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True, timeout=120).stdout)
    assert names == ["run", "sweep", "load", "check", "register_norm"] and heavy == []


def test_the_sweep_subpackage_is_still_a_package_and_the_function():
    from normbench import sweep as sweeps

    assert callable(normbench.sweep) and sweeps.plan is not None and normbench.sweep is sweeps


def test_overrides_as_a_dict():
    assert as_overrides({"norm": "gn", "batch_size": 4, "eval.batch_stats": False, "norm_batch_size": None,
                         "model.channels": [8, 16]}) == [
        "norm=gn", "batch_size=4", "eval.batch_stats=false", "norm_batch_size=null", "model.channels=[8,16]"]
    assert as_overrides({"batch_size": [2, 4], "seed": range(2)}, sweep=True) == ["batch_size=2,4", "seed=0,1"]


def test_run_and_load_return_pandas_and_print_nothing(tmp_path, capsys):
    overrides = [*TINY_DATA, "model.width=16", "epochs=2", "batch_size=32", "device=cpu", f"results_dir={tmp_path}"]
    run = normbench.run(overrides)
    assert run.summary["status"] == "completed" and run.summary["config.norm.name"] == "bn"
    assert list(run.metrics.epoch) == [1, 2] and 0 <= run.test_acc <= 100
    assert normbench.run(overrides).trained is False
    loaded = normbench.load(tmp_path / "default")
    assert list(loaded.runs.run_id) == [run.folder.name] and "test_acc_mean" in loaded.summary
    assert capsys.readouterr().out == ""


def test_a_user_error_is_raised_as_one(tmp_path):
    with pytest.raises(normbench.UserError, match="unknown norm 'nope'"):
        normbench.run(["norm=nope", f"results_dir={tmp_path}"])


def test_a_norm_registered_in_process_cannot_go_to_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_WORKER_START_SECONDS", "0")
    from torch import nn

    normbench.register_norm("ident", lambda c, kind, options: nn.Identity())
    with pytest.raises(normbench.UserError, match="norm=ident was registered in this process"):
        normbench.sweep([*TINY_DATA, "norm=ident", "batch_size=16,32", "epochs=1", f"results_dir={tmp_path}"],
                        jobs=2)


def test_the_readme_notebook_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {"__name__": "__main__"}
    exec(compile(code, "<README api example>", "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert set(result.runs.norm) == {"center", "bn", "gn"} and result.trained == 6 and not result.failures
    assert (tmp_path / "center_vs_bn.png").stat().st_size > 0
    assert (tmp_path / "results" / "center" / "report.md").is_file()
    assert "center" in capsys.readouterr().out  # the pivot it prints


def test_a_sweep_too_small_for_workers_says_so_in_its_warnings(tmp_path):
    result = normbench.sweep([*TINY_DATA, "norm=ln", "batch_size=16,32", "epochs=1", f"results_dir={tmp_path}"],
                             jobs=2)
    assert result.trained == 2 and any("trains sequentially" in w for w in result.warnings), result.warnings


def test_a_sweep_over_a_setting_outside_the_run_id_says_so_in_its_warnings(tmp_path):
    result = normbench.sweep([*TINY_DATA, "norm=ln", "batch_size=16", "epochs=1", "threads=1,2",
                              f"results_dir={tmp_path}"])
    assert result.planned == 2 and result.trained == 1 and len(result.runs) == 1
    assert result.warnings == ["threads=2 is the same run as threads=1 (threads is not part of the run id): "
                               "trained once"]


@pytest.mark.parametrize("call, needle", [
    (lambda tmp: normbench.run({"norm": ["bn", "ln"], "data": "synthetic", "results_dir": str(tmp)}),
     "norm takes one name, not a list; to train several, sweep them"),
    (lambda tmp: normbench.sweep({"data": "synthetic", "results_dir": str(tmp)}, jobs="2"),
     "--jobs must be a whole number, at least 1, got '2'"),
    (lambda tmp: normbench.load(123), "load takes the path of an experiment folder"),
    (lambda tmp: normbench.load(None), "load takes the path of an experiment folder"),
    (lambda tmp: normbench.load(tmp / "nothing"), "no folder at"),
    (lambda tmp: normbench.load(Path(__file__)), "is not a folder"),
], ids=["list-for-a-group", "jobs-as-text", "load-int", "load-none", "load-missing", "load-file"])
def test_wrong_arguments_are_user_errors(tmp_path, call, needle):
    with pytest.raises(normbench.UserError, match=re.escape(needle)):
        call(tmp_path)


def test_load_plugins_takes_one_path_as_well_as_a_list(tmp_path):
    plugin = tmp_path / "oneplug.py"
    plugin.write_text("import normbench\nfrom torch import nn\n"
                      "normbench.register_norm('onenorm', lambda c, kind, options: nn.Identity())\n")
    try:
        normbench.load_plugins(str(plugin))
        assert "onenorm" in normbench.config.SCHEMAS["norm"]
    finally:
        plugins.reset()
