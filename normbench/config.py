"""Typed config schemas and Hydra composition.

Each config group (data, model, norm, optim) has one YAML per choice in
``normbench/conf/``; each YAML names its dataclass schema in its defaults list, so
an unknown key or a wrong type fails when the config is composed, and `validate`
gives every value its meaning (ranges, finiteness, a device this machine has).
Before Hydra reads anything, user input that could make it import or run code is
refused (`search_path_overrides`). `compose` returns plain dataclasses: no
DictConfig travels past this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from normbench.errors import UserError

CONFIG_MODULE = "normbench.conf"
GROUPS = ("data", "model", "norm", "optim")


class Position(str, Enum):
    pre_act = "pre_act"  # layer -> norm -> ReLU
    post_act = "post_act"  # layer -> ReLU -> norm


class RecurrentStats(str, Enum):
    per_step = "per_step"
    shared = "shared"


class LrScaling(str, Enum):
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"


class Residual(str, Enum):
    standard = "standard"  # x + F(x)
    skipinit = "skipinit"  # x + alpha * F(x), alpha a learnable scalar starting at 0 (De & Smith 2020)


# ---- norm -------------------------------------------------------------------------------------------


@dataclass
class NoiseConfig:
    """Noisy BN (Santurkar et al. 2018): noise added after the norm while training; both 0: none."""

    mean: float = 0.0  # each step, each channel's noise mean is drawn from U(-mean, mean)
    std: float = 0.0  # and its std from U(0, std)


@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = 1e-5
    position: Position = Position.pre_act
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class BNConfig(NormConfig):
    momentum: Optional[float] = 0.1  # weight of the new batch in the running averages; None: cumulative
    track_running_stats: bool = True
    recurrent_stats: RecurrentStats = RecurrentStats.per_step  # RNN only: per time step, or shared


@dataclass
class GNConfig(NormConfig):
    num_groups: int = 32


@dataclass
class BRNConfig(NormConfig):
    momentum: Optional[float] = 0.1  # as BN's
    r_max: float = 3.0  # clip limits of r and d, reached after warmup_steps (Ioffe 2017: 3 and 5)
    d_max: float = 5.0
    warmup_steps: int = 5000  # training steps over which the limits grow linearly from (1, 0), which is BN


@dataclass
class FusedActConfig(NormConfig):
    """A norm that replaces the activation after it (frn's TLU, evonorm_s0): position must be pre_act."""


@dataclass
class EvoNormConfig(FusedActConfig):
    num_groups: int = 32


# ---- model ------------------------------------------------------------------------------------------


@dataclass
class MLPConfig:
    name: str = "mlp"
    width: int = 256
    depth: int = 2  # hidden layers


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stage each, 2x2 pool between
    convs_per_stage: int = 1


@dataclass
class ResNetConfig:
    name: str = "resnet20"
    depth: int = 20  # 6n+2
    width: int = 16  # channels of the first stage; then 2x and 4x
    residual: Residual = Residual.standard


@dataclass
class RNNConfig:
    name: str = "rnn"
    cell: Cell = Cell.lstm
    hidden_size: int = 128


# ---- data -------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None  # else $NORMBENCH_DATA_DIR, else ~/.cache/normbench/data
    train_size: Optional[int] = None  # class-balanced deterministic subset; None: all
    test_size: Optional[int] = None
    augment: bool = False  # random crop (pad 4), plus horizontal flip on CIFAR
    batch_classes: Optional[int] = None  # each training batch from this many classes only; None: iid batches


@dataclass
class SyntheticConfig(DataConfig):
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])  # C, H, W
    num_classes: int = 10
    num_train: int = 2048
    num_test: int = 512
    noise: float = 0.35  # std of the per-pixel noise, as a fraction of the pixel range
    data_seed: int = 0


# ---- optim ------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = MISSING
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.constant
    warmup_epochs: float = 0.0
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    step_gamma: float = 0.1
    # weight decay of norm scales/shifts and of biases; None: the same as weight_decay (every parameter decays)
    norm_weight_decay: Optional[float] = None


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


# ---- top level --------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    batch_stats: bool = True  # BN: also test with the batch's own statistics, at the training batch size
    precise_bn: bool = True  # BN: also test with population statistics recomputed after each epoch
    precise_bn_samples: int = 4096  # training samples used to recompute them
    every_epoch: bool = True  # the two extra BN evaluations after every epoch; false: after the last only
    shifts: list[str] = field(default_factory=list)  # test-time input shifts after the last epoch: KIND:SEVERITY


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 for forward and loss


class Compile(str, Enum):
    none = "none"
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: removes per-step launch overhead at small batch
    max_autotune = "max-autotune"


@dataclass
class PerfConfig:
    """Speed options. precision and compile change the numerics, so they are off by default."""

    precision: Precision = Precision.fp32
    compile: Compile = Compile.none  # torch.compile mode for the training step
    channels_last: bool = True  # conv nets on CUDA: NHWC memory layout (same numbers, faster kernels)


@dataclass
class Config:
    data: Any = MISSING
    model: Any = MISSING
    norm: Any = MISSING
    optim: Any = MISSING
    name: str = "default"  # experiment name: runs go to <results_dir>/<name>/<run_id>/
    batch_size: int = 64
    norm_batch_size: Optional[int] = None  # BN's statistics over sub-batches of this size (ghost BN); None: batch_size
    epochs: int = 10
    lr: float = 0.1  # base learning rate, at base_batch_size
    lr_scaling: LrScaling = LrScaling.linear
    base_batch_size: int = 32
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    eval_batch_size: int = 128
    results_dir: str = "results"
    checkpoint: bool = True  # save the training state after every epoch, to resume a killed run
    keep_checkpoint: bool = False  # keep it once the run has finished
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


SCHEMAS = {
    "norm": {"bn": BNConfig, "ln": NormConfig, "in": NormConfig, "gn": GNConfig, "none": NormConfig,
             "brn": BRNConfig, "ws_gn": GNConfig, "rms": NormConfig, "frn": FusedActConfig,
             "evonorm_s0": EvoNormConfig},
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "resnet20": ResNetConfig, "rnn": RNNConfig},
    "data": {"mnist": DataConfig, "fashion_mnist": DataConfig, "cifar10": DataConfig, "cifar100": DataConfig,
             "synthetic": SyntheticConfig},
    "optim": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig},
}
SCHEMA_PREFIX = "schema_"


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for schema in set(schemas.values()):
            cs.store(group=group, name=SCHEMA_PREFIX + schema.__name__.lower(), node=schema)


register_schemas()


def compose(overrides: list[str] = (), config_dir: str | None = None) -> Config:
    """Compose the packaged config (plus an optional user config dir) with overrides, typed and validated."""
    overrides = list(overrides) + search_path_overrides(config_dir, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        return to_config(cfg)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        raise UserError(clean_hydra_error(e)) from e
    finally:
        GlobalHydra.instance().clear()


def search_path_overrides(config_dir: str | Path | None, overrides: Sequence[str] = ()) -> list[str]:
    """The override that puts a user's config folder on Hydra's search path, before the packaged one.

    First, before Hydra reads anything, it refuses any of `overrides` and any YAML in the folder that
    could make Hydra import or run code (`check_overrides`, `check_config_dir`).
    """
    check_overrides(overrides)
    if not config_dir:
        return []
    path = Path(config_dir).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--config-dir {config_dir}: no such directory")
    check_config_dir(path)
    return [f"hydra.searchpath=[file://{path}]"]


# ---- nothing from the user may import or run code ----------------------------------------------------------
# Hydra calls whatever a `_target_` names (in hydra.callbacks, the launcher, the sweeper, recursively),
# hydra.job_logging / hydra.hydra_logging name classes to import, and hydra.searchpath reads configs from
# folders no one checked. So user input (overrides, and every YAML under --config-dir) may not carry a
# `_target_`, may set under `hydra` only the keys below, and may not build values under the instantiated
# hydra.launcher / hydra.sweeper with `${...}` (a resolver such as oc.create can assemble a `_target_`).
# The packaged configs and the launcher/sweeper configs of installed Hydra plugins are not user input.
USER_HYDRA_KEYS = ("sweeper", "launcher", "sweep", "run")
INSTANTIATED_HYDRA_KEYS = ("sweeper", "launcher")
RUNS_CODE = "nothing in a config may import or run code"


def _names(text: str) -> list[str]:
    """The key names in a dotted key, a group path or a package: 'hydra/callbacks@a.b' -> [hydra, callbacks, a, b]."""
    return [n for n in re.split(r"[^\w-]+", str(text)) if n]


def _refusal(path: list[str], value: Any = None) -> str | None:
    """Why the user may not set the key `path` (its names from the root) to `value`; None if they may."""
    if "_target_" in path or (isinstance(value, str) and "_target_" in value):
        return f"_target_ is refused: configs choose components by name, and {RUNS_CODE}"
    for i, name in enumerate(path):
        if name != "hydra":
            continue
        below = path[i + 1] if i + 1 < len(path) else None
        if below is None and isinstance(value, dict):
            continue  # `hydra: {...}`: its keys are checked one by one
        if below not in USER_HYDRA_KEYS:
            key = "hydra" + (f".{below}" if below else "")
            return f"{key} cannot be set (only hydra.{', .'.join(USER_HYDRA_KEYS)} can): {RUNS_CODE}"
        if below in INSTANTIATED_HYDRA_KEYS and isinstance(value, str) and "${" in value:
            return f"no ${{...}} interpolations in hydra.{below} settings: write the value out ({RUNS_CODE})"
    return None


def _check_value(where: str, path: list[str], value: Any) -> None:
    """Refuse `value` at `path`, or anything inside it (a dict's keys, a list's or a sweep's items)."""
    why = _refusal(path, value)
    if why:
        raise UserError(f"{where}: {why}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_value(where, path + _names(key), item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_value(where, path, item)
    elif isinstance(value, ChoiceSweep):
        _check_value(where, path, value.list)


def _shown(text: str, limit: int = 60) -> str:
    """`text` on one short line: control characters escaped, the middle of a long text cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-17:]}"


def check_overrides(overrides: Sequence[str]) -> None:
    """Parse the command-line overrides and refuse any that could make Hydra import or run code."""
    parser = OverridesParser.create()
    for text in overrides:
        where = f"override '{_shown(text)}'"
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as e:
            raise UserError(f"cannot parse {where}: {_parse_problem(text, str(e))}") from None
        if not override.key_or_group:
            raise UserError(f"cannot parse {where}: no key before '=' (KEY=VALUE)")
        _check_value(where, _names(override.key_or_group) + _names(override.package or ""), override.value())


def _parse_problem(text: str, message: str) -> str:
    """Hydra's override parse error, short: what it did not expect, without the grammar's token names."""
    lines = [ln for ln in message.splitlines() if ln.strip() and not ln.startswith(("See ", "Error parsing"))]
    first = lines[0] if lines else message
    if first.startswith("LexerNoViableAltException"):
        at = lines[-1].find("^") - len("LexerNoViableAltException: ")
        bad = text[at] if "\n" not in text and 0 <= at < len(text) else next(
            (c for c in text if not (c.isascii() and c.isprintable())), None)
        if bad is None:
            return "unexpected end"
        hint = " (a value with such characters needs quotes: key='value')" if text.find("=") < text.find(bad) else ""
        return f"unexpected character {_shown(repr(bad))}{hint}"
    if first.startswith("missing EQUAL"):
        return "expected KEY=VALUE"
    unexpected = re.match(r"(?:mismatched|extraneous) input '(.*)' expecting", first)
    if unexpected:
        token = unexpected.group(1)
        return "it ends where a value should follow" if token == "<EOF>" else f"unexpected '{_shown(token, 20)}'"
    incomplete = re.match(r"no viable alternative at input '(.*)'", first)
    if incomplete:
        return f"incomplete value '{_shown(incomplete.group(1), 30)}' (a bracket, brace or parenthesis left open?)"
    return _shown(first, 100)


def _user_yaml_files(root: Path):
    """Every .yaml file under `root`, following symlinks as Hydra would, each folder once."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".yaml"))


def check_config_dir(root: Path) -> None:
    """Refuse the user's config folder if any YAML in it could make Hydra import or run code.

    A file's keys are checked at the place they land: its package (`# @package` header, else its
    folder); a `hydra` key at any depth counts as Hydra's own, since a defaults list can move a config.
    """
    for path in _user_yaml_files(root):
        try:
            text = path.read_text()
            with path.open() as stream:  # named, so a syntax error says which file
                content = yaml.safe_load(stream)
        except yaml.YAMLError as e:
            raise UserError(clean_hydra_error(e)) from e
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from e
        group = list(path.relative_to(root).parent.parts)
        header = re.search(r"^#\s*@package\s+(\S+)", text, re.MULTILINE)
        package = _names(header.group(1).replace("_group_", ".".join(group))) if header else group
        package = [n for n in package if n != "_global_"]
        _check_value(str(path), _names(str(path.relative_to(root))[: -len(".yaml")]), {})  # where it is
        if isinstance(content, dict) and isinstance(content.get("defaults"), list):
            _check_defaults(str(path), content["defaults"])
            content = {k: v for k, v in content.items() if k != "defaults"}
        _check_value(str(path), package, content)


def _check_defaults(where: str, entries: list) -> None:
    """A defaults entry may choose hydra/launcher or hydra/sweeper options, but not place a config under hydra."""
    for entry in entries:
        for choice, option in entry.items() if isinstance(entry, dict) else [(entry, None)]:
            _check_value(where, _names(choice), option)
            if "@" in str(choice) and "hydra" in _names(str(choice).split("@", 1)[1]):
                raise UserError(f"{where}: defaults entry '{_shown(str(choice))}' places a config under hydra; "
                                f"{RUNS_CODE}")


def to_config(cfg) -> Config:
    """DictConfig -> validated dataclasses (the one conversion at the boundary)."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    _reject_unknown_keys(cfg, "")
    config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def _schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _reject_unknown_keys(node, prefix: str) -> None:
    """`+key=value` can add keys that no schema has; refuse them like any other typo."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = _schema_fields(schema)
        for key in node:
            if key not in known:
                raise UserError(f"unknown key '{prefix}{key}'; valid keys here: {', '.join(known)}")
    for key in node:
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            _reject_unknown_keys(child, f"{prefix}{key}.")


def _schema_named(name: str) -> type | None:
    every = [Config, EvalConfig, PerfConfig] + [s for group in SCHEMAS.values() for s in group.values()]
    return next((s for s in every if s.__name__ == name), None)


def clean_hydra_error(e: Exception) -> str:
    """One clear line from a Hydra/OmegaConf error, without Hydra internals or our schema names."""
    cause = e.__cause__ if isinstance(e, HydraException) and e.__cause__ is not None else e
    if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
        mark = cause.problem_mark
        return f"YAML syntax error in {mark.name}, line {mark.line + 1}: {cause.problem}"
    text = str(cause)
    if isinstance(cause, OverrideParseException):
        which = re.search(r"Error parsing override '(.*)'", text)
        return f"cannot parse override '{_shown(which.group(1)) if which else '?'}': {_parse_problem('', text)}"
    missing = re.search(r"Could not find '([^/']+)/([^']*)'", text)
    if missing and "Available options" in text:
        options = text.split("Available options", 1)[1].split("Config search path")[0].splitlines()[1:]
        valid = ", ".join(o.strip() for o in options if o.strip() and not o.strip().startswith(SCHEMA_PREFIX))
        group, choice = missing.groups()
        return f"unknown {group} '{_shown(choice)}'; valid: {valid}" if choice else f"{group}= needs a value; valid: {valid}"
    full_key = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    if isinstance(cause, ConfigAttributeError) and full_key:
        schema = _schema_named(re.search(r"object_type=(\w+)", text).group(1))
        valid = f"; valid keys here: {', '.join(_schema_fields(schema))}" if schema else ""
        return f"unknown key '{full_key.group(1)}'{valid}"
    if full_key:
        return f"{full_key.group(1)}: {first}"
    return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and "hydra.cc/docs" not in ln)


# ---- what every value means --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Must:
    """A value check and how the error says it: 'KEY must be {be}, got VALUE'."""

    test: Callable[[Any], bool]
    be: str

    def __call__(self, value) -> bool:
        return self.test(value)


def optional(must: Must) -> Must:
    return Must(lambda v: v is None or must(v), f"{must.be} or null")


MAX_SEED = 2**63 - 1  # torch.manual_seed's range, with room for the offsets the training loop adds
POSITIVE = Must(lambda v: v > 0, "> 0")
NON_NEGATIVE = Must(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Must(lambda v: v >= 1, ">= 1")
SEED = Must(lambda v: 0 <= v <= MAX_SEED, "in [0, 2**63 - 1]")
UNIT_OPEN_CLOSED = Must(lambda v: 0 < v <= 1, "in (0, 1]")
UNIT_CLOSED_OPEN = Must(lambda v: 0 <= v < 1, "in [0, 1)")
FOLDER = Must(lambda v: v.strip() != "", "a folder")

# Test-time input shifts (normbench/shifts.py), written KIND:SEVERITY: what each kind's severity may be.
SHIFT_SEVERITY = {"contrast": POSITIVE, "brightness": Must(lambda s: True, "any number"), "noise": NON_NEGATIVE}


def parse_shift(text: str) -> tuple[str, float] | None:
    """'contrast:0.5' -> ('contrast', 0.5); None when it is not a known KIND:SEVERITY with a valid severity."""
    kind, _, severity = str(text).partition(":")
    try:
        value = float(severity)
    except ValueError:
        return None
    return (kind, value) if kind in SHIFT_SEVERITY and math.isfinite(value) and SHIFT_SEVERITY[kind](value) else None


def shift_name(kind: str, severity: float) -> str:
    """The canonical spelling, which names the shift's results: ('contrast', 0.50) -> 'contrast:0.5'."""
    return f"{kind}:{severity:g}"


def _valid_shifts(shifts: list[str]) -> bool:
    parsed = [parse_shift(s) for s in shifts]
    return None not in parsed and len({shift_name(*p) for p in parsed}) == len(parsed)


SHIFTS = Must(_valid_shifts, "a list of distinct KIND:SEVERITY, KIND one of contrast (severity > 0; 1: unchanged), "
                             "brightness (any; 0: unchanged), noise (>= 0; 0: unchanged), e.g. [contrast:0.5,noise:0.2]")

# Every setting with a range, per schema (a subclass inherits its parents' lines). Enums and booleans are
# checked by their types; each group's `name` is checked against the schema it is set in (`_check_kinds`).
RULES: dict[type, dict[str, Must]] = {
    Config: {"batch_size": POSITIVE, "epochs": POSITIVE, "lr": POSITIVE, "base_batch_size": POSITIVE,
             "seed": SEED, "eval_batch_size": POSITIVE, "results_dir": FOLDER,
             "norm_batch_size": optional(POSITIVE)},
    EvalConfig: {"precise_bn_samples": POSITIVE, "shifts": SHIFTS},
    NormConfig: {"eps": POSITIVE},
    BNConfig: {"momentum": optional(UNIT_OPEN_CLOSED)},
    NoiseConfig: {"mean": NON_NEGATIVE, "std": NON_NEGATIVE},
    BRNConfig: {"momentum": optional(UNIT_OPEN_CLOSED), "r_max": AT_LEAST_ONE, "d_max": NON_NEGATIVE,
                "warmup_steps": NON_NEGATIVE},
    EvoNormConfig: {"num_groups": POSITIVE},
    GNConfig: {"num_groups": POSITIVE},
    MLPConfig: {"width": POSITIVE, "depth": AT_LEAST_ONE},
    CNNConfig: {"channels": Must(lambda v: len(v) > 0 and all(c > 0 for c in v), "a non-empty list of sizes > 0"),
                "convs_per_stage": AT_LEAST_ONE},
    ResNetConfig: {"depth": Must(lambda v: v >= 8 and (v - 2) % 6 == 0, "6n+2 with n >= 1 (8, 14, 20, 32, ...)"),
                   "width": POSITIVE},
    RNNConfig: {"hidden_size": POSITIVE},
    DataConfig: {"root": optional(FOLDER), "train_size": optional(POSITIVE), "test_size": optional(POSITIVE),
                 "batch_classes": optional(AT_LEAST_ONE)},
    SyntheticConfig: {"shape": Must(lambda v: len(v) == 3 and all(s > 0 for s in v), "[C, H, W] with every size > 0"),
                      "num_classes": Must(lambda v: v >= 2, ">= 2 (a classifier needs two classes)"),
                      "num_train": POSITIVE, "num_test": POSITIVE, "noise": NON_NEGATIVE, "data_seed": SEED},
    OptimConfig: {"weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE,
                  "step_milestones": Must(lambda v: all(0 < m <= 1 for m in v), "fractions of training in (0, 1]"),
                  "step_gamma": POSITIVE, "norm_weight_decay": optional(NON_NEGATIVE)},
    SGDConfig: {"momentum": UNIT_CLOSED_OPEN},
    AdamConfig: {"betas": Must(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
                 "eps": POSITIVE},
}


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express, each with one clear line."""
    _check_name(cfg.name)
    _check_values(cfg, "")
    _check_kinds(cfg)
    _check_batch_classes(cfg)
    if isinstance(cfg.optim, SGDConfig) and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0")
    if cfg.norm.name == "bn" and cfg.batch_size == 1 and cfg.model.name in ("mlp", "rnn"):
        raise UserError(f"norm=bn with batch_size=1 on model={cfg.model.name}: batch norm on flat features "
                        "takes each channel's statistics over the batch alone, and one value has no variance. "
                        "Use batch_size >= 2, or norm=ln/gn, which do not depend on the batch")
    _check_norm_batch(cfg)
    if isinstance(cfg.norm, FusedActConfig) and cfg.norm.position != Position.pre_act:
        raise UserError(f"norm={cfg.norm.name} replaces the activation, so norm.position must be pre_act "
                        "(there is no ReLU to put it after)")
    if (cfg.norm.noise.mean or cfg.norm.noise.std) and cfg.model.name == "rnn":
        raise UserError("norm.noise is not available inside recurrent cells (model=rnn): "
                        "use it with model=mlp, cnn or resnet20")
    _check_device(cfg.device)


def _check_norm_batch(cfg: Config) -> None:
    """Ghost BN's sub-batches tile the SGD batch, and hold more than one value per statistic."""
    nbs = cfg.norm_batch_size
    if nbs is None:
        return
    if cfg.norm.name != "bn":
        raise UserError(f"norm_batch_size applies to batch norm (norm=bn or bn_shared), not norm={cfg.norm.name}; "
                        "leave it null")
    if cfg.batch_size % nbs:
        fits = [d for d in range(1, cfg.batch_size + 1) if cfg.batch_size % d == 0]
        raise UserError(f"norm_batch_size={nbs} does not divide batch_size={cfg.batch_size}: BN's sub-batches "
                        f"tile each batch; values that do: {', '.join(map(str, fits))}")
    if nbs == 1 and cfg.model.name in ("mlp", "rnn"):
        raise UserError(f"norm_batch_size=1 on model={cfg.model.name}: batch norm on flat features takes each "
                        "channel's statistics over the sub-batch alone, and one value has no variance")


def _check_name(name: str) -> None:
    """The experiment name becomes a folder: the same rule as results.experiment_dir's."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"name {_shown(repr(name))} must be letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit (it becomes a folder name)")
    if len(name) > 200:
        raise UserError(f"name is {len(name)} characters long; at most 200 (it becomes a folder name)")


def _shown_value(value) -> str:
    return _shown(repr(value) if isinstance(value, str) else str(value))


def _check_values(node, prefix: str) -> None:
    """Every float finite, then every line of RULES that applies to this schema, then the nested schemas."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        floats = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in floats):
            raise UserError(f"{prefix}{f.name} must be a finite number, got {_shown_value(value)}")
    for schema in reversed(type(node).__mro__):
        for key, must in RULES.get(schema, {}).items():
            if not must(getattr(node, key)):
                raise UserError(f"{prefix}{key} must be {must.be}, got {_shown_value(getattr(node, key))}")
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(getattr(node, f.name)):
            _check_values(getattr(node, f.name), f"{prefix}{f.name}.")


def _check_kinds(cfg: Config) -> None:
    """Each group's `name` is one it knows, set in a config with that kind's keys (norm.name=gn on bn's keys
    would build a GroupNorm without its num_groups)."""
    for group, schemas in SCHEMAS.items():
        node = getattr(cfg, group)
        if node.name not in schemas:
            raise UserError(f"unknown {group} '{_shown(node.name)}'; valid: {', '.join(sorted(schemas))}")
        if type(node) is not schemas[node.name]:
            same = sorted(n for n, s in schemas.items() if s is type(node))
            raise UserError(f"{group}.name={node.name} does not fit the chosen {group} config, which has the keys of "
                            f"{'/'.join(same)}; choose it with {group}={node.name}")


DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}  # synthetic: data.num_classes


def _check_batch_classes(cfg: Config) -> None:
    """data.batch_classes=k: at most the dataset's classes, and each batch takes batch_size/k from each class."""
    k = cfg.data.batch_classes
    if k is None:
        return
    classes = getattr(cfg.data, "num_classes", None) or DATASET_CLASSES[cfg.data.name]
    if k > classes:
        raise UserError(f"data.batch_classes must be in [1, {classes}] ({cfg.data.name} has {classes} classes), got {k}")
    if cfg.batch_size % k:
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of data.batch_classes={k}: each batch "
                        f"takes batch_size/{k} samples from each of its {k} classes")


def _check_device(device: str) -> None:
    """The device exists on this machine. torch is imported only when a device other than auto or cpu is named."""
    if device in ("auto", "cpu"):
        return
    cuda = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "mps" and not cuda:
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {_shown(repr(device))}")
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device=mps: MPS is not available on this machine")
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise UserError(f"device={device}: this machine has no CUDA GPU")
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:
        raise UserError(f"device={device}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                        f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")


def effective_lr(cfg: Config) -> float:
    """The base lr scaled to the batch size: linear (GN paper: 0.1 * B / 32), sqrt, or none."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[cfg.lr_scaling.value]


def to_dict(cfg: Config) -> dict:
    """Plain, JSON-safe dict of the config (enums as their values)."""
    return json.loads(json.dumps(asdict(cfg), default=lambda v: v.value))


# Settings that say where things go or how they are shown, not what is computed.
NOT_HASHED = ("name", "results_dir", "device", "data.root", "checkpoint", "keep_checkpoint", "perf.channels_last")


# Settings added after results existed, hashed only when they differ from their default (which is the
# behaviour before they existed), so adding a knob never orphans a finished run.
# A key a config does not have (model.residual on a model other than resnet20) is not hashed either.
HASHED_WHEN_SET = {"optim.norm_weight_decay": None, "data.batch_classes": None, "eval.shifts": [],
                   "norm_batch_size": None, "norm.noise": {"mean": 0.0, "std": 0.0},
                   "model.residual": "standard"}
_ABSENT = object()


def _pop(d: dict, key: str, absent=None):
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.get(p, {})
    return d.pop(leaf, absent)


def config_hash(cfg: Config) -> str:
    """Hash of every setting that changes the result; output locations and the device are left out."""
    return dict_hash(to_dict(cfg))


def dict_hash(config: dict) -> str:
    """`config_hash` of a config as `to_dict` gives it (e.g. read back from a summary.json)."""
    d = json.loads(json.dumps(config))
    for key in NOT_HASHED:
        _pop(d, key)
    if d.get("norm_batch_size") == d.get("batch_size"):
        d["norm_batch_size"] = None  # a normalization batch of the whole batch is plain BN: the same run
    for key, default in HASHED_WHEN_SET.items():
        value = _pop(d, key, _ABSENT)
        if value is not _ABSENT and value != default:
            d[key] = value
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_id(cfg: Config) -> str:
    """Readable, stable run folder name: the main axes plus the config hash."""
    return f"{cfg.model.name}-{cfg.norm.name}-b{cfg.batch_size}-s{cfg.seed}-{config_hash(cfg)}"
