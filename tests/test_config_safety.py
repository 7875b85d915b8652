"""User input that must be refused before anything runs: code in configs, values without meaning, odd overrides.

Every case is refused with one line (a UserError; exit code 2 on the command line), before Hydra composes
anything and before any file is written.
"""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import typing
from importlib import resources

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_DATA, one_error_line
from normbench import sweep
from normbench.cli import app
from normbench.config import RULES, SCHEMAS, Config, compose
from normbench.errors import UserError

cli = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def invoke(*args) -> object:
    return cli.invoke(app, [str(a) for a in args])



def files_under(path) -> list:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ---- item 7: nothing in a config can import or run code -----------------------------------------------------

# Each user config folder: {file: text}. `{mark}` is a folder that must still not exist afterwards.
EVIL_CONFIGS = {
    "callback-makedirs": {"experiment/evil.yaml": (
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: os.makedirs\n      name: {mark}\n")},
    "callback-open": {"experiment/evil.yaml": (
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      file: {mark}\n"
        "      mode: w\n")},
    "target-deep-in-a-group": {"experiment/evil.yaml": (
        "# @package _global_\nmodel:\n  extra:\n    - {{a: {{_target_: os.makedirs, name: {mark}}}}}\n")},
    "package-header-into-hydra": {"experiment/evil.yaml": (
        "# @package hydra\ncallbacks:\n  x: {{_target_: os.makedirs, name: {mark}}}\n")},
    "defaults-entry-into-hydra": {"experiment/evil.yaml": (
        "# @package _global_\ndefaults:\n  - /norm/cb@hydra.launcher\n"),
        "norm/cb.yaml": "x: {{name: {mark}}}\n"},
    "hydra-logging": {"experiment/evil.yaml": (
        "# @package _global_\ndefaults:\n  - override /hydra/hydra_logging: default\n"
        "hydra:\n  hydra_logging:\n    handlers:\n      console:\n        (): os.makedirs\n        name: {mark}\n")},
    "callbacks-group-file": {"hydra/callbacks/evil.yaml": "x: {{name: {mark}}}\n"},
    "search-path": {"experiment/evil.yaml": "# @package _global_\nhydra:\n  searchpath: [file://{mark}]\n"},
    "sweeper-param-sets-callbacks": {"experiment/evil.yaml": (
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      +hydra.callbacks.x.name: {mark}\n")},
    "target-in-a-value": {"experiment/evil.yaml": (
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      +norm.x: '{{_target_: os.makedirs}}'\n")},
    "interpolation-in-launcher": {"experiment/evil.yaml": (
        "# @package _global_\nhydra:\n  launcher:\n    x: \"${{oc.create:'{{a: 1}}'}}\"\n")},
}
EVIL_PHRASES = {"callback-makedirs": "hydra.callbacks cannot be set", "callback-open": "hydra.callbacks",
                "target-deep-in-a-group": "_target_ is refused", "package-header-into-hydra": "hydra.callbacks",
                "defaults-entry-into-hydra": "places a config under hydra", "hydra-logging": "hydra.hydra_logging",
                "callbacks-group-file": "hydra.callbacks", "search-path": "hydra.searchpath",
                "sweeper-param-sets-callbacks": "hydra.callbacks", "target-in-a-value": "_target_",
                "interpolation-in-launcher": "interpolations in hydra.launcher"}


def write_configs(root, files: dict[str, str], mark) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.format(mark=mark))


@pytest.fixture
def evil(tmp_path, request):
    root, mark = tmp_path / "configs", tmp_path / "pwned"
    write_configs(root, EVIL_CONFIGS[request.param], mark)
    yield root, mark, EVIL_PHRASES[request.param]
    assert not mark.exists(), "a config ran code"


@pytest.mark.parametrize("evil", list(EVIL_CONFIGS), indirect=True)
def test_user_config_that_could_run_code_is_refused_by_compose(evil):
    root, mark, phrase = evil
    with pytest.raises(UserError, match="nothing in a config may import or run code") as refused:
        compose(["experiment=evil", *TINY_DATA], config_dir=root)
    assert phrase in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("command", [["sweep", "--dry-run"], ["sweep"], ["run"], ["config"]])
@pytest.mark.parametrize("evil", ["callback-makedirs", "callback-open", "hydra-logging", "target-deep-in-a-group"],
                         indirect=True)
def test_user_config_that_could_run_code_is_refused_by_every_command(evil, command, results_dir):
    root, mark, phrase = evil
    one_error_line(invoke(*command, "--config-dir", root, "experiment=evil", *TINY_DATA, "epochs=1",
                          f"results_dir={results_dir}"), phrase)
    assert not results_dir.exists()


def test_sweep_planning_refuses_the_user_config_before_hydra_composes(tmp_path, monkeypatch):
    root, mark = tmp_path / "configs", tmp_path / "pwned"
    write_configs(root, EVIL_CONFIGS["callback-makedirs"], mark)
    with pytest.raises(UserError, match="hydra.callbacks"):
        sweep.plan(["experiment=evil", *TINY_DATA, f"results_dir={tmp_path}"], config_dir=root)
    assert not mark.exists()


def test_yaml_syntax_error_in_user_config_is_still_one_line(tmp_path, results_dir):
    (tmp_path / "norm").mkdir()
    (tmp_path / "norm" / "broken.yaml").write_text("name: gn\nnum_groups: [1, 2\n")
    line = one_error_line(invoke("config", "--config-dir", tmp_path, "norm=gn"), "YAML syntax error in")
    assert str(tmp_path / "norm" / "broken.yaml") in line and "line 3" in line


def test_the_example_user_configs_and_the_packaged_launchers_are_allowed(tmp_path):
    root = tmp_path / "configs"
    write_configs(root, {
        "norm/gn4.yaml": "# Group norm with 4 groups.\ndefaults:\n  - gn\n  - _self_\nnum_groups: 4\n",
        "experiment/grid.yaml": ("# @package _global_\ndefaults:\n  - override /norm: gn4\n"
                                 "  - override /hydra/launcher: submitit_local\nname: grid\nhydra:\n  sweeper:\n"
                                 "    params:\n      seed: 0,1\n  launcher:\n    timeout_min: 5\n"
                                 "  sweep:\n    dir: ${{results_dir}}/elsewhere\n"),
    }, mark=None)
    cfg = compose(["experiment=grid", *TINY_DATA, "hydra.launcher.cpus_per_task=2", "hydra.sweeper.params.seed='0,1,2'"],
                  config_dir=root)
    assert cfg.norm.num_groups == 4 and cfg.name == "grid"
    assert sweep.configured_launcher(["experiment=grid", *TINY_DATA], config_dir=root) == "submitit_local"


EVIL_OVERRIDES = [
    pytest.param("+hydra.callbacks.x={{_target_:os.makedirs,name:'{mark}'}}", "hydra.callbacks", id="add-callback"),
    pytest.param("hydra.callbacks.x={{_target_:os.makedirs,name:'{mark}'}}", "hydra.callbacks", id="set-callback"),
    pytest.param("++hydra.callbacks.x={{_target_:builtins.open,file:'{mark}',mode:w}}", "hydra.callbacks",
                 id="force-add-callback"),
    pytest.param("+hydra={{callbacks:{{x:{{name:'{mark}'}}}}}}", "hydra.callbacks", id="whole-hydra-node"),
    pytest.param("hydra/callbacks=evil", "hydra.callbacks", id="callbacks-group"),
    pytest.param("+hydra/callbacks@hydra.callbacks.x=evil", "hydra.callbacks", id="callbacks-group-with-package"),
    pytest.param("hydra.launcher._target_=os.makedirs", "_target_ is refused", id="launcher-target"),
    pytest.param("hydra/job_logging=default", "hydra.job_logging", id="job-logging-group"),
    pytest.param("+hydra.hydra_logging.handlers.x={{class:os.makedirs}}", "hydra.hydra_logging", id="logging"),
    pytest.param("hydra.searchpath=[file://{mark}]", "hydra.searchpath", id="search-path"),
    pytest.param("+norm.x={{_target_:os.makedirs,name:'{mark}'}}", "_target_", id="target-in-a-dict-value"),
    pytest.param("+norm.x=choice({{a:1}},{{_target_:os.makedirs}})", "_target_", id="target-in-a-sweep"),
    pytest.param("hydra.launcher.x=${{oc.env:HOME}}", "interpolations in hydra.launcher",
                 id="interpolation-in-launcher"),
    pytest.param("hydra.sweeper.params={{+hydra.callbacks.x.name:'{mark}'}}", "hydra.callbacks",
                 id="sweeper-param-sets-callbacks"),
]


@pytest.mark.parametrize("override,phrase", EVIL_OVERRIDES)
def test_override_that_could_run_code_is_refused_by_compose(tmp_path, override, phrase):
    mark = tmp_path / "pwned"
    with pytest.raises(UserError, match="nothing in a config may import or run code") as refused:
        compose([*TINY_DATA, override.format(mark=mark)])
    assert phrase in str(refused.value) and "\n" not in str(refused.value)
    assert not mark.exists()


@pytest.mark.parametrize("command", [["run"], ["config"]])
@pytest.mark.parametrize("override,phrase", EVIL_OVERRIDES[:8])
def test_override_that_could_run_code_is_refused_by_run_and_config(tmp_path, results_dir, command, override, phrase):
    mark = tmp_path / "pwned"
    one_error_line(invoke(*command, *TINY_DATA, f"results_dir={results_dir}", override.format(mark=mark)), phrase)
    assert not mark.exists() and not results_dir.exists()


@pytest.mark.parametrize("command", [["sweep", "--dry-run"], ["sweep"]])
@pytest.mark.parametrize("override,phrase", EVIL_OVERRIDES)
def test_override_that_could_run_code_is_refused_by_sweep(tmp_path, results_dir, command, override, phrase):
    mark = tmp_path / "pwned"
    one_error_line(invoke(*command, *TINY_DATA, "epochs=1", f"results_dir={results_dir}",
                          override.format(mark=mark)), phrase)
    assert not mark.exists() and not results_dir.exists()


# ---- item 8: every value means something, or it is refused --------------------------------------------------

INVALID = [
    ("seed=18446744073709551615", "seed must be in [0, 2**63 - 1], got 18446744073709551615"),
    (f"seed={2**70}", f"seed must be in [0, 2**63 - 1], got {2**70}"),
    ("seed=-1", "seed must be in [0, 2**63 - 1], got -1"),
    ("model.width=0", "model.width must be > 0, got 0"),
    ("model.width=-5", "model.width must be > 0, got -5"),
    ("model.depth=0", "model.depth must be >= 1, got 0"),
    ("data.num_test=0", "data.num_test must be > 0, got 0"),
    ("data.num_train=0", "data.num_train must be > 0, got 0"),
    ("data.num_classes=0", "data.num_classes must be >= 2"),
    ("data.num_classes=1", "data.num_classes must be >= 2 (a classifier needs two classes), got 1"),
    ("data.shape=[1,2]", "data.shape must be [C, H, W] with every size > 0, got [1, 2]"),
    ("data.shape=[1,0,28]", "data.shape must be [C, H, W]"),
    ("data.noise=-0.1", "data.noise must be >= 0, got -0.1"),
    ("data.data_seed=-3", "data.data_seed must be in [0, 2**63 - 1]"),
    ("data.train_size=0", "data.train_size must be > 0 or null, got 0"),
    ("data.test_size=-2", "data.test_size must be > 0 or null, got -2"),
    ("data.root=''", "data.root must be a folder or null, got ''"),
    ("results_dir=''", "results_dir must be a folder, got ''"),
    ("optim=adam optim.betas=[2,2]", "optim.betas must be two values in [0, 1), got [2.0, 2.0]"),
    ("optim=adam optim.betas=[0.9]", "optim.betas must be two values in [0, 1), got [0.9]"),
    ("optim=adamw optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=inf", "lr must be a finite number, got inf"),
    ("lr=1e400", "lr must be a finite number, got inf"),
    ("norm.eps=nan", "norm.eps must be a finite number, got nan"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got inf"),
    ("optim.step_milestones=[0.5,nan]", "optim.step_milestones must be a finite number, got [0.5, nan]"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1), got 1.5"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1.0"),
    ("optim.momentum=-0.1", "optim.momentum must be in [0, 1)"),
    ("optim.nesterov=true optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("eval.precise_bn_samples=-5", "eval.precise_bn_samples must be > 0, got -5"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0, got -1.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.norm_weight_decay=-1", "optim.norm_weight_decay must be >= 0 or null, got -1.0"),
    ("optim.step_gamma=0", "optim.step_gamma must be > 0, got 0.0"),
    ("optim.step_milestones=[0.5,1.5]", "optim.step_milestones must be fractions of training in (0, 1]"),
    ("optim.step_milestones=[0]", "optim.step_milestones must be fractions of training in (0, 1]"),
    ("norm.momentum=0", "norm.momentum must be in (0, 1] or null, got 0.0"),
    ("norm.momentum=1.5", "norm.momentum must be in (0, 1] or null, got 1.5"),
    ("norm=gn norm.num_groups=0", "norm.num_groups must be > 0, got 0"),
    ("norm.eps=0", "norm.eps must be > 0, got 0.0"),
    ("model=resnet20 model.depth=10", "model.depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got 10"),
    ("model=resnet20 model.depth=2", "model.depth must be 6n+2 with n >= 1"),
    ("model=resnet20 model.width=0", "model.width must be > 0, got 0"),
    ("model=cnn model.channels=[]", "model.channels must be a non-empty list of sizes > 0, got []"),
    ("model=cnn model.channels=[8,0]", "model.channels must be a non-empty list of sizes > 0, got [8, 0]"),
    ("model=cnn model.convs_per_stage=0", "model.convs_per_stage must be >= 1, got 0"),
    ("model=rnn model.hidden_size=0", "model.hidden_size must be > 0, got 0"),
    ("eval_batch_size=0", "eval_batch_size must be > 0, got 0"),
    ("base_batch_size=0", "base_batch_size must be > 0, got 0"),
    ("optim.name=adam", "optim.name=adam does not fit the chosen optim config, which has the keys of sgd; "
                        "choose it with optim=adam"),
    ("norm.name=gn", "norm.name=gn does not fit the chosen norm config"),
    ("norm.name=foo", "unknown norm 'foo'; valid: " + ", ".join(sorted(SCHEMAS["norm"]))),
    ("name=.", "name '.' must be letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ("name=..", "name '..' must be"),
    ("name=-x", "name '-x' must be"),
    ("name='ñandú'", "name 'ñandú' must be"),
    (f"name={'a' * 300}", "name is 300 characters long; at most 200"),
]


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_value_is_refused_by_compose(overrides, message):
    with pytest.raises(UserError) as refused:
        compose(["data=synthetic", *overrides.split()])
    assert message in str(refused.value)


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_value_is_one_line_and_writes_nothing(results_dir, overrides, message):
    result = invoke("run", *TINY_DATA, "epochs=1", "device=cpu", f"results_dir={results_dir}", *overrides.split())
    one_error_line(result, message)
    assert files_under(results_dir) == []


@pytest.mark.parametrize("overrides,message", INVALID[:12:3])
def test_sweep_dry_run_calls_invalid_values_invalid(results_dir, overrides, message):
    result = invoke("sweep", "--dry-run", *TINY_DATA, f"results_dir={results_dir}", "batch_size=8,16", *overrides.split())
    assert result.exit_code == 1, result.output
    assert "0 to train" in result.output and "2 invalid" in result.output and message[:30] in result.output
    assert files_under(results_dir) == []


VALID = ["seed=0", f"seed={2**63 - 1}", "optim.momentum=0", "norm.momentum=1", "norm.momentum=null",
         "optim=adam optim.betas=[0,0.999]", "data.num_classes=2", "model=resnet20 model.depth=8", "data.noise=0",
         "optim.warmup_epochs=0", "optim.step_milestones=[]", "optim.step_milestones=[1]", "optim.weight_decay=0",
         "optim.norm_weight_decay=0", "model.depth=1", "data.shape=[3,1,1]", "name=a.b_c-1", "name=1x",
         "optim.nesterov=true", "device=auto", "device=cpu"]


@pytest.mark.parametrize("overrides", VALID)
def test_values_at_the_edge_of_their_meaning_are_accepted(overrides):
    compose(["data=synthetic", *overrides.split()])


def _typed_enough(schema: type, name: str) -> bool:
    """Booleans and enums are checked by their type; a group's `name` by the schema it is set in."""
    hint = typing.get_type_hints(schema)[name]
    return (hint is bool or (isinstance(hint, type) and issubclass(hint, enum.Enum)) or name == "name"
            or dataclasses.is_dataclass(hint) or hint is typing.Any)


def test_every_setting_has_a_meaning():
    """A new field needs a line in config.RULES (or a bool/enum type), so no value goes unchecked."""
    schemas = [Config, *(s for group in SCHEMAS.values() for s in group.values())]
    for schema in schemas:  # nested schemas (eval, perf, ...) join the list as they are found
        schemas += [h for h in typing.get_type_hints(schema).values() if dataclasses.is_dataclass(h) and h not in schemas]
        ruled = {key for cls in schema.__mro__ for key in RULES.get(cls, {})}
        for f in dataclasses.fields(schema):
            if f.name == "device" and schema is Config:
                continue  # its own check: the device must exist on this machine
            assert f.name in ruled or _typed_enough(schema, f.name), f"{schema.__name__}.{f.name} has no rule"


# ---- devices: they must exist on this machine ------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device,message", [
    ("cuda", "device=cuda: this machine has no CUDA GPU"),
    ("cuda:0", "device=cuda:0: this machine has no CUDA GPU"),
    ("cuda:99", "device=cuda:99: this machine has no CUDA GPU"),
    ("mps", "device=mps: MPS is not available on this machine"),
    ("cuda:x", "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("cuda:-1", "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:-1'"),
    ("CPU", "device must be auto, cpu, cuda, cuda:N or mps, got 'CPU'"),
])
def test_device_that_this_machine_lacks_is_refused(no_gpu, results_dir, device, message):
    with pytest.raises(UserError, match="device"):
        compose([*TINY_DATA, f"device={device}"])
    one_error_line(invoke("run", *TINY_DATA, "epochs=1", f"results_dir={results_dir}", f"device={device}"), message)
    assert files_under(results_dir) == []


def test_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert compose([*TINY_DATA, "device=cuda:1"]).device == "cuda:1"
    assert compose([*TINY_DATA, "device=cuda"]).device == "cuda"
    with pytest.raises(UserError, match=r"device=cuda:2: this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        compose([*TINY_DATA, "device=cuda:2"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"device=cuda:99: this machine has 1 CUDA GPU \(cuda:0\)"):
        compose([*TINY_DATA, "device=cuda:99"])


def test_cpu_and_auto_do_not_import_torch():
    code = ("import sys; from normbench.config import compose; "
            "[compose(['data=synthetic', f'device={d}']) for d in ('cpu', 'auto')]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- item 10: odd overrides get one clear line -----------------------------------------------------------

ODD = [
    ("norm=", "norm= needs a value; valid: " + ", ".join(sorted(
        e.name[:-5] for e in (resources.files("normbench.conf") / "norm").iterdir() if e.name.endswith(".yaml")))),
    ("name=ñandú", "cannot parse override 'name=ñandú': unexpected character 'ñ'"),
    ("name=a\nb", "cannot parse override 'name=a\\nb': unexpected character '\\n'"),
    ("ü=3", "cannot parse override 'ü=3': unexpected character 'ü'"),
    ("norm=bn,", "cannot parse override 'norm=bn,': it ends where a value should follow"),
    ("norm=bn,,ln", "cannot parse override 'norm=bn,,ln': unexpected ','"),
    ("=3", "cannot parse override '=3': no key before '='"),
    ("batch_size", "cannot parse override 'batch_size': expected KEY=VALUE"),
    ("data.shape=[1,2", "cannot parse override 'data.shape=[1,2': incomplete value '[1,2'"),
    ("batch_size=1e400", "batch_size: Value 'inf' of type 'float' could not be converted to Integer"),
    ("lr=", "lr: Value '' of type 'str' could not be converted to Float"),
    ("seed=-1", "seed must be in [0, 2**63 - 1], got -1"),
    ("name=???", "name has no value (set to ??? or deleted with ~); set it: name=VALUE"),
    ("~norm", "norm has no value (set to ??? or deleted with ~); set it: norm=VALUE"),
    ("norm=???", "norm= needs a value; valid: bn, bn_shared"),
    ("~model.width", "cannot delete 'model.width': the settings inside model cannot be removed; set it instead"),
    ("seed=1,2", "seed=1,2: a list of values is a sweep, and this command takes one config: normbench sweep seed=1,2"),
    ("hydra/launcher=nope", "unknown hydra/launcher 'nope'; valid: basic, slurm"),
    ("name=" + "ñ" * 5000, "cannot parse override 'name=ññññ"),
    ("data.root=" + "x" * 5000 + "[", "cannot parse override 'data.root=xxx"),
]


@pytest.mark.parametrize("override,message", ODD)
def test_odd_override_is_one_short_clear_line(results_dir, override, message):
    with pytest.raises(UserError) as refused:
        compose([*TINY_DATA, override])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    line = one_error_line(invoke("run", *TINY_DATA, "device=cpu", f"results_dir={results_dir}", override), message)
    assert len(line) < 250 and "Exception" not in line and "hydra.cc" not in line
    assert files_under(results_dir) == []
