"""Plugins: loaded only when named, typed like built-in entries, checked, and part of their runs' identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_DATA
from normbench import plugins
from normbench.cli import app
from normbench.config import SCHEMAS, compose, run_id, to_dict
from normbench.errors import UserError

EXAMPLE = Path(__file__).parent.parent / "examples" / "loo_bn.py"

PLUGIN = '''
from dataclasses import dataclass

import torch
from torch import nn

import normbench


@dataclass
class ScaleOptions:
    eps: float = 1e-5
    gain: float = 1.0


class Scale(nn.Module):
    """x / (mean |x| over the sample + eps) * gain: batch-independent."""

    def __init__(self, c, options):
        super().__init__()
        self.options = options
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        dims = tuple(range(1, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x / (x.abs().mean(dims, keepdim=True) + self.options.eps) * self.options.gain * self.weight.view(shape)


@normbench.register_norm("scale", options=ScaleOptions, kinds=("flat", "spatial"))
def build(num_features, kind, options):
    """Divide by the mean absolute value of the sample."""
    return Scale(num_features, options)
'''


@pytest.fixture(autouse=True)
def no_plugins():
    plugins.reset()
    yield
    plugins.reset()


def write(folder: Path, text: str, name: str = "scaleplug.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_plugin_norm_is_listed_composed_typed_and_refused_where_undefined(tmp_path):
    plugin = write(tmp_path, PLUGIN)
    listed = cli("list", "--plugin", plugin)
    assert listed.exit_code == 0 and "scale" in listed.output and "plugin scaleplug" in listed.output
    cfg = compose([*TINY_DATA, "norm=scale", "norm.gain=2"])
    assert cfg.norm.gain == 2.0 and type(cfg.norm) is SCHEMAS["norm"]["scale"]
    assert run_id(cfg).startswith("mlp-scale(gain=2)-b64-s0-")
    assert to_dict(cfg)["norm"]["plugin"]["name"] == "scaleplug"
    assert to_dict(cfg)["norm"]["plugin"]["source"].startswith("sha256:")
    with pytest.raises(UserError, match="norm.gain"):
        compose(["norm=scale", "norm.gain=loud"])
    with pytest.raises(UserError, match="unknown key 'norm.nope'"):
        compose(["norm=scale", "+norm.nope=1"])
    from normbench.norms import create_norm

    with pytest.raises(UserError, match="'scale' .*undefined on recurrent features: it takes flat, spatial"):
        create_norm("scale", 4, "recurrent")


def test_built_in_runs_keep_their_ids_and_record_no_plugin(tmp_path):
    cfg = compose(TINY_DATA)
    before = run_id(cfg)
    plugins.load([write(tmp_path, PLUGIN)])
    assert run_id(compose(TINY_DATA)) == before and "plugin" not in to_dict(cfg)["norm"]


def test_editing_the_plugin_changes_the_run_id(tmp_path):
    plugin = write(tmp_path, PLUGIN)
    plugins.load([plugin])
    first = run_id(compose(["norm=scale"]))
    assert run_id(compose(["norm=scale"])) == first  # stable
    plugins.reset()
    plugin.write_text(plugin.read_text().replace("return Scale(num_features, options)",
                                                 "return Scale(num_features, options)  # edited"))
    plugins.load([plugin])
    second = run_id(compose(["norm=scale"]))
    assert second != first and second.split("-")[:4] == first.split("-")[:4]


def test_an_edited_plugin_is_trained_again_by_the_next_sweep(tmp_path):
    plugin = write(tmp_path, PLUGIN)
    args = ["sweep", "--plugin", plugin, *TINY_DATA, "model.width=16", "norm=scale", "epochs=1", "batch_size=32",
            "device=cpu", f"results_dir={tmp_path / 'r'}"]
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert "1 already done" in again.output
    plugins.reset()
    plugin.write_text(plugin.read_text() + "\n# a change\n")
    edited = cli(*args)
    assert edited.exit_code == 0 and "1 planned to train" in edited.output, edited.output
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "r" / "default").glob("*/summary.json")]
    assert len({s["config"]["norm"]["plugin"]["source"] for s in summaries}) == 2


@pytest.mark.parametrize("text, needles", [
    (None, ["plugin", "no such file"]),
    ("def broken(:\n", ["plugin", "syntax error at line 1"]),
    ("import normbench\nraise RuntimeError('no GPU here')\n", ["plugin", "RuntimeError: no GPU here", "line 2"]),
    ("import normbench\nnormbench.register_norm('bn', lambda c, k, o: None)\n", ["'bn' is already registered (built in)"]),
    ("import normbench\nnormbench.register_norm('Bad Name', lambda c, k, o: None)\n", ["a norm name is lowercase"]),
    ("from dataclasses import dataclass\nimport normbench\n@dataclass\nclass O:\n    width: int\n"
     "normbench.register_norm('x', lambda c, k, o: None, options=O)\n", ["option 'width' needs a default"]),
    ("from dataclasses import dataclass\nimport normbench\n@dataclass\nclass O:\n    position: str = 'x'\n"
     "normbench.register_norm('x', lambda c, k, o: None, options=O)\n", ["may not declare 'position'"]),
    ("from dataclasses import dataclass\nimport normbench\n@dataclass\nclass O:\n    f: object = print\n"
     "normbench.register_norm('x', lambda c, k, o: None, options=O)\n", ["cannot be a config"]),
    ("import sys\nsys.exit(3)\n", ["plugin", "SystemExit"]),
])
def test_a_bad_plugin_is_one_line_naming_it_and_exit_2(tmp_path, text, needles):
    path = tmp_path / "bad.py" if text is None else write(tmp_path, text, "bad.py")
    one_error_line(cli("list", "--plugin", path), str(path) if text is None else "bad", *needles)
    assert "x" not in SCHEMAS["norm"]  # a plugin that fails half-way leaves nothing registered


def test_a_plugin_that_registers_nothing_gets_a_note_not_an_error(tmp_path):
    """A forgotten decorator or call: the command works, and says why the plugin's names are missing."""
    path = write(tmp_path, "import normbench\n\ndef build(c, kind, options):\n    return None\n", "forgot.py")
    result = cli("list", "--plugin", path)
    assert result.exit_code == 0, result.output
    assert "note: plugin forgot registered no norm, model or dataset" in result.output
    assert cli("list", "--plugin", write(tmp_path, PLUGIN)).output.count("registered no norm") == 0


def test_a_module_plugin_that_is_not_installed_is_one_line():
    one_error_line(cli("config", "--plugin", "no_such_pkg.plugin"), "no module named 'no_such_pkg.plugin'")


def test_two_plugins_cannot_take_one_name(tmp_path):
    plugins.load([write(tmp_path, PLUGIN)])
    (tmp_path / "b").mkdir()
    other = write(tmp_path / "b", PLUGIN, "otherplug.py")
    with pytest.raises(UserError, match="'scale' is already registered \\(by plugin scaleplug\\)"):
        plugins.load([other])


def test_a_plugin_norm_that_crashes_fails_the_check_with_exit_1(tmp_path):
    crashing = PLUGIN.replace("return x / (", "raise ValueError('boom')\n        return x / (")
    result = cli("check", "--plugin", write(tmp_path, crashing), "norm=scale", "model=mlp")
    assert result.exit_code == 1 and "fail" in result.output and "ValueError: boom" in result.output


def test_a_norm_that_gives_nan_fails_only_the_finite_check(tmp_path):
    """NaN is not equal to NaN: a deterministic NaN-producing norm failed 'deterministic' and 'state_dict' too."""
    from normbench import conformance

    nan = PLUGIN.replace("return x / (", "return x * float('nan') + 0 * x / (")
    plugins.load([write(tmp_path, nan)])
    results = conformance.norm_on_kind("scale", "flat").results
    assert results["finite"].status == "fail"
    assert results["deterministic"].status == "ok" and results["state_dict"].status == "ok"


def test_check_measures_the_example_as_batch_dependent_and_the_plugin_as_not(tmp_path):
    from normbench import conformance

    plugins.load([EXAMPLE, write(tmp_path, PLUGIN)])
    loo = conformance.norm_on_kind("loo_bn", "spatial")
    scale = conformance.norm_on_kind("scale", "flat")
    assert not loo.failed and loo.results["batch-dependent"].status == "yes"
    assert not scale.failed and scale.results["batch-dependent"].status == "no"
    assert conformance.norm_on_kind("loo_bn", "flat").results["builds"].status == "refused"


# ---- a config never loads code --------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["+plugin=evil.py", "+norm.plugin=evil.py", "norm._target_=os.system",
                                      "hydra.searchpath=[file:///tmp]"])
def test_a_config_cannot_name_a_plugin_or_code(override):
    with pytest.raises(UserError):
        compose([override])


def test_a_plugin_yaml_cannot_sneak_code_in(tmp_path):
    plugins.load([write(tmp_path, PLUGIN)])
    (tmp_path / "conf" / "norm").mkdir(parents=True)
    (tmp_path / "conf" / "norm" / "scale2.yaml").write_text(
        "defaults: [schema_scale, _self_]\nname: scale\ngain: 2.0\n_target_: os.system\n")
    with pytest.raises(UserError, match="_target_ is refused"):
        compose(["norm=scale2"], tmp_path / "conf")
    (tmp_path / "conf" / "norm" / "scale2.yaml").write_text(
        "defaults: [schema_scale, _self_]\nname: scale\ngain: ${oc.env:HOME}\n")
    with pytest.raises(UserError):  # typed: a float, whatever the interpolation gives
        compose(["norm=scale2"], tmp_path / "conf")


def test_a_plugin_yaml_is_typed_against_the_plugin_options(tmp_path):
    plugins.load([write(tmp_path, PLUGIN)])
    folder = tmp_path / "conf" / "norm"
    folder.mkdir(parents=True)
    (folder / "loud.yaml").write_text("defaults: [scale, _self_]\ngain: 3\n")
    assert compose(["norm=loud"], tmp_path / "conf").norm.gain == 3.0
    (folder / "loud.yaml").write_text("defaults: [scale, _self_]\ngain: very\n")
    result = cli("config", "--plugin", tmp_path / "scaleplug.py", "-c", tmp_path / "conf", "norm=loud")
    one_error_line(result, "gain")
    (folder / "loud.yaml").write_text("name: scale\ngain: 3\n")  # no schema named: one line, not a crash
    with pytest.raises(UserError, match="defaults: \\[schema_scale, _self_\\]"):
        compose(["norm=loud"], tmp_path / "conf")


# ---- other processes load the same plugins --------------------------------------------------------------


def _sweep_overrides(results: Path) -> list[str]:
    return [*TINY_DATA, "model=cnn", "model.channels=[4,8]", "norm=loo_bn", "batch_size=16,32", "epochs=1",
            "device=cpu", f"results_dir={results}"]


def test_jobs_workers_load_the_plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_WORKER_START_SECONDS", "0")
    result = cli("sweep", "--plugin", EXAMPLE, *_sweep_overrides(tmp_path), "--jobs", "2")
    assert result.exit_code == 0 and "trained 2" in result.output, result.output


def test_submitit_workers_load_the_plugins(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli("sweep", "--plugin", EXAMPLE, *_sweep_overrides(tmp_path), "hydra/launcher=submitit_local")
    assert result.exit_code == 0 and "trained 2" in result.output, result.output
    ids = sorted(p.name for p in (tmp_path / "default").glob("cnn-loo_bn-*"))
    assert len(ids) == 2


def test_an_installed_entry_point_is_loaded_without_naming_it(tmp_path):
    (tmp_path / "scaleplug.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "scaleplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scaleplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[normbench.plugins]\nscale = scaleplug\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "normbench", "config", "norm=scale"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "# run_id: mlp-scale-b64" in out.stdout and "scaleplug 1.0 sha256:" in out.stdout


def test_a_yaml_variant_of_a_plugin_norm_without_the_plugin_says_to_load_it():
    from typer.testing import CliRunner

    from normbench.cli import app

    examples = Path(__file__).parent.parent / "examples"
    result = CliRunner().invoke(app, ["config", "--config-dir", str(examples), "norm=loo_bn_slow", "model=cnn"])
    assert result.exit_code == 2 and result.output.startswith(
        "error: norm/loo_bn_slow builds on norm 'loo_bn', which is not known here; a norm from a plugin needs --plugin")
    assert "Config search path" not in result.output


_IN_PROCESS = """
import torch


def helper(x):
    return {helper_body}


class Center(torch.nn.Module):
    def forward(self, x):
        return helper(x - x.mean())


def unrelated():
    return {unrelated_body}


def build(num_features, kind, options):
    return Center()
"""


@pytest.mark.parametrize("with_source", [True, False], ids=["script", "no-source"])
def test_a_norm_registered_in_process_is_identified_by_all_the_code_it_uses(tmp_path, monkeypatch, with_source):
    """Editing the module the builder returns, or a helper its forward calls, changes the norm's source hash (and
    so its run ids); editing code it does not use does not. With the source at hand (a script) and without it
    (python -c, exec)."""
    import importlib.util
    import types

    from normbench.plugins.loading import in_process

    def source_hash(helper_body: str, unrelated_body: str = "1") -> str:
        text = _IN_PROCESS.format(helper_body=helper_body, unrelated_body=unrelated_body)
        if with_source:
            path = tmp_path / f"user_{abs(hash(text))}.py"
            path.write_text(text)
            spec = importlib.util.spec_from_file_location("user_norms", path)
            module = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, "user_norms", module)
            spec.loader.exec_module(module)
        else:
            module = types.ModuleType("user_norms")
            exec(compile(text, "<string>", "exec"), module.__dict__)
        return in_process(module.build, None).source

    plain = source_hash("x")
    assert source_hash("x") == plain
    assert source_hash("0 * x") != plain  # a helper of the module's forward
    assert source_hash("x", unrelated_body="2") == plain


_FAULTY = '''
import torch
from torch import nn

import normbench


class Halves(nn.Module):  # drops half the features: the next layer cannot take them
    def forward(self, x):
        return x[:, : x.shape[1] // 2]


class Doubles(nn.Module):  # float64 out of a float32 net
    def forward(self, x):
        return x.double()


class FlatOnly(nn.Module):  # a LayerNorm over the channels: right on the MLP, wrong on the CNN
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x)


class Thirteen(nn.Module):  # 13 class scores for 10 classes
    def __init__(self, shape):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(shape).prod()), 13)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Late(nn.Module):  # fails after some training steps
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 5:
            raise ValueError("late failure in my norm")
        return x


normbench.register_norm("halves", lambda c, kind, options: Halves())
normbench.register_norm("doubles", lambda c, kind, options: Doubles())
normbench.register_norm("flatonly", lambda c, kind, options: FlatOnly(c))
normbench.register_norm("late", lambda c, kind, options: Late())
normbench.register_model("thirteen", lambda cfg, shape, classes, norm: Thirteen(shape))
'''


@pytest.mark.parametrize("overrides, needles", [
    (["norm=halves"], ["norm 'halves' (a plugin's) on model=mlp", "RuntimeError", "cannot be multiplied"]),
    (["norm=doubles"], ["norm 'doubles' (a plugin's) on model=mlp", "dtype"]),
    (["norm=flatonly", "model=cnn"], ["norm 'flatonly' (a plugin's) on model=cnn", "normalized_shape"]),
    (["model=thirteen", "norm=none"], ["model 'thirteen' (a plugin's)", "shape (1, 13)", "10 class scores"]),
], ids=["shape", "dtype", "mlp-only", "classes"])
def test_a_plugin_that_breaks_the_net_is_one_line_before_training(tmp_path, overrides, needles):
    plugin = write(tmp_path, _FAULTY, "faulty.py")
    args = ["--plugin", plugin, *TINY_DATA, *overrides, "epochs=1", "batch_size=16", f"results_dir={tmp_path / 'r'}"]
    one_error_line(cli("run", *args), *needles)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_a_sweep_trains_the_jobs_a_faulty_plugin_leaves_valid(tmp_path):
    plugin = write(tmp_path, _FAULTY, "faulty.py")
    args = ["--plugin", plugin, *TINY_DATA, "norm=flatonly,none", "model=mlp,cnn", "epochs=1", "batch_size=32", f"results_dir={tmp_path / 'r'}"]
    planned = cli("sweep", "--dry-run", *args)
    assert planned.exit_code == 1 and "3 to train" in planned.output and "1 invalid" in planned.output, planned.output
    assert "norm 'flatonly' (a plugin's) on model=cnn" in planned.output
    swept = cli("sweep", *args)
    assert swept.exit_code == 1 and len(list((tmp_path / "r" / "default").glob("*/summary.json"))) == 3


def test_a_run_whose_plugin_fails_in_training_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMBENCH_DEBUG", raising=False)
    plugin = write(tmp_path, _FAULTY, "faulty.py")
    result = cli("run", "--plugin", plugin, *TINY_DATA, "norm=late", "model.width=16", "epochs=1", "batch_size=16",
                 f"results_dir={tmp_path / 'r'}")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "error: the run failed: ValueError: late failure in my norm" in result.output
    summary = json.loads(next((tmp_path / "r" / "default").glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and "late failure" in summary["traceback"]
    assert 'faulty.py", line' in summary["traceback"]  # the innermost frames: the plugin's own line


def test_plugin_files_that_would_share_a_module_and_a_folder_are_one_line(tmp_path):
    """a-b.py and a_b.py are imported under one module name (one would replace the other's classes); a folder
    named like a plugin is not a file."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = write(tmp_path / "one", "import normbench\n", "a-b.py")
    second = write(tmp_path / "two", "import normbench\n", "a_b.py")
    one_error_line(cli("list", "--plugin", first, "--plugin", second), "a plugin of the same name is loaded already")
    plugins.reset()
    (tmp_path / "adir.py").mkdir()
    one_error_line(cli("list", "--plugin", tmp_path / "adir.py"), "a folder; a plugin is a .py file")


def test_redefining_an_in_process_norms_module_without_registering_again_changes_its_runs():
    """A notebook: the cell defining the module is run again after an edit, the cell registering the builder is
    not; the builder now returns the new module, so the run id must change."""
    import types

    from normbench.plugins.entries import provenance_record

    notebook = types.ModuleType("user_notebook")
    exec(compile("import torch\nimport normbench\n"
                 "class Center(torch.nn.Module):\n    def forward(self, x):\n        return x - x.mean()\n"
                 "normbench.register_norm('center', lambda c, kind, options: Center())\n", "<cell>", "exec"),
         notebook.__dict__)
    first = provenance_record("norm", "center")
    assert provenance_record("norm", "center") == first
    before = run_id(compose([*TINY_DATA, "norm=center"]))
    exec(compile("class Center(torch.nn.Module):\n    def forward(self, x):\n        return 0 * x\n", "<cell>", "exec"),
         notebook.__dict__)
    assert provenance_record("norm", "center") != first
    assert run_id(compose([*TINY_DATA, "norm=center"])) != before
