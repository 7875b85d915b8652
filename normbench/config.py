"""Typed config schemas and Hydra composition.

Each config group (data, model, norm, optim) has one YAML per choice in
``normbench/conf/``; each YAML names its dataclass schema in its defaults list, so
an unknown key or a wrong type fails when the config is composed. `compose`
returns plain dataclasses: no DictConfig travels past this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
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


# ---- norm -------------------------------------------------------------------------------------------


@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = 1e-5
    position: Position = Position.pre_act


@dataclass
class BNConfig(NormConfig):
    momentum: Optional[float] = 0.1  # weight of the new batch in the running averages; None: cumulative
    track_running_stats: bool = True
    recurrent_stats: RecurrentStats = RecurrentStats.per_step  # RNN only: per time step, or shared


@dataclass
class GNConfig(NormConfig):
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
    "norm": {"bn": BNConfig, "ln": NormConfig, "in": NormConfig, "gn": GNConfig, "none": NormConfig},
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
    overrides = list(overrides) + search_path_overrides(config_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        return to_config(cfg)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        raise UserError(clean_hydra_error(e)) from e
    finally:
        GlobalHydra.instance().clear()


def search_path_overrides(config_dir: str | Path | None) -> list[str]:
    """The override that puts a user's config folder on Hydra's search path, before the packaged one."""
    if not config_dir:
        return []
    path = Path(config_dir).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--config-dir {config_dir}: no such directory")
    return [f"hydra.searchpath=[file://{path}]"]


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
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing and "Available options" in text:
        options = text.split("Available options", 1)[1].split("Config search path")[0].splitlines()[1:]
        valid = [o.strip() for o in options if o.strip() and not o.strip().startswith(SCHEMA_PREFIX)]
        group, choice = missing.groups()
        return f"unknown {group} '{choice}'; valid: {', '.join(valid)}"
    full_key = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    if isinstance(cause, ConfigAttributeError) and full_key:
        schema = _schema_named(re.search(r"object_type=(\w+)", text).group(1))
        valid = f"; valid keys here: {', '.join(_schema_fields(schema))}" if schema else ""
        return f"unknown key '{full_key.group(1)}'{valid}"
    if full_key:
        return f"{full_key.group(1)}: {first}"
    return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and "hydra.cc/docs" not in ln)


def _positive(**values: int | float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise UserError(f"{key} must be > 0, got {value}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    _positive(batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.lr, base_batch_size=cfg.base_batch_size,
              eval_batch_size=cfg.eval_batch_size, eps=cfg.norm.eps)
    if isinstance(cfg.norm, GNConfig):
        _positive(**{"norm.num_groups": cfg.norm.num_groups})
    for key in ("train_size", "test_size"):
        if getattr(cfg.data, key) is not None:
            _positive(**{f"data.{key}": getattr(cfg.data, key)})
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if cfg.norm.name == "bn" and cfg.batch_size == 1 and cfg.model.name in ("mlp", "rnn"):
        raise UserError(f"norm=bn with batch_size=1 on model={cfg.model.name}: batch norm on flat features "
                        "takes each channel's statistics over the batch alone, and one value has no variance. "
                        "Use batch_size >= 2, or norm=ln/gn, which do not depend on the batch")


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
HASHED_WHEN_SET = {"optim.norm_weight_decay": None}


def _pop(d: dict, key: str):
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.get(p, {})
    return d.pop(leaf, None)


def config_hash(cfg: Config) -> str:
    """Hash of every setting that changes the result; output locations and the device are left out."""
    return dict_hash(to_dict(cfg))


def dict_hash(config: dict) -> str:
    """`config_hash` of a config as `to_dict` gives it (e.g. read back from a summary.json)."""
    d = json.loads(json.dumps(config))
    for key in NOT_HASHED:
        _pop(d, key)
    for key, default in HASHED_WHEN_SET.items():
        value = _pop(d, key)
        if value != default:
            d[key] = value
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_id(cfg: Config) -> str:
    """Readable, stable run folder name: the main axes plus the config hash."""
    return f"{cfg.model.name}-{cfg.norm.name}-b{cfg.batch_size}-s{cfg.seed}-{config_hash(cfg)}"
