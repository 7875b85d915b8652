"""What every value means: the range rules per schema (`RULES`), test-time shift spellings, and `validate`,
which gives each bad value one clear line (including a device this machine lacks; torch is imported only then)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from normbench.config.messages import _shown
from normbench.config.schemas import (
    SCHEMA_PREFIX, SCHEMAS, AdamConfig, BatchStatsProbeConfig, BNConfig, BRNConfig, CNNConfig, Config, DataConfig, EvalConfig,
    EveryConfig, EvoNormConfig, FusedActConfig, GNConfig, LandscapeProbeConfig, MLPConfig, NoiseConfig, NormConfig,
    OptimConfig, Position, ResNetConfig, RNNConfig, SGDConfig, SyntheticConfig,
)
from normbench.errors import UserError


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
MAX_THREADS = 1024  # more than any CPU has cores; torch.set_num_threads takes a C int
THREADS = Must(lambda v: 1 <= v <= MAX_THREADS, f"in [1, {MAX_THREADS}]")
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
def _distinct(test: Callable[[Any], bool]) -> Callable[[list], bool]:
    return lambda values: bool(values) and len(set(values)) == len(values) and all(test(v) for v in values)


EVERY = optional(NON_NEGATIVE)  # a probe's steps between measurements; 0 or null: off
RULES: dict[type, dict[str, Must]] = {
    Config: {"batch_size": POSITIVE, "epochs": POSITIVE, "lr": POSITIVE, "base_batch_size": POSITIVE,
             "seed": SEED, "eval_batch_size": POSITIVE, "results_dir": FOLDER,
             "norm_batch_size": optional(POSITIVE), "threads": optional(THREADS)},
    EvalConfig: {"precise_bn_samples": POSITIVE, "shifts": SHIFTS},
    BatchStatsProbeConfig: {"every": EVERY, "samples": Must(lambda v: v >= 2, ">= 2"),
                            "sizes": Must(_distinct(lambda b: b >= 1), "a non-empty list of distinct batch sizes >= 1"),
                            "quantiles": Must(lambda qs: bool(qs) and all(0 <= q <= 1 for q in qs),
                                              "a non-empty list of values in [0, 1]")},
    LandscapeProbeConfig: {"every": EVERY,
                           "lr_multiples": Must(_distinct(lambda m: m > 0), "a non-empty list of distinct values > 0")},
    EveryConfig: {"every": EVERY},
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
    check_name(cfg.name)
    _check_values(cfg, "")
    _check_kinds(cfg)
    _check_batch_classes(cfg)
    if isinstance(cfg.optim, SGDConfig) and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0")
    if cfg.norm.name in ("bn", "brn") and cfg.batch_size == 1 and cfg.model.name in ("mlp", "rnn"):
        raise UserError(f"norm={cfg.norm.name} with batch_size=1 on model={cfg.model.name}: batch norm on flat features "
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
    if any(getattr(p, "every", 0) for p in vars(cfg.probes).values()):
        from normbench.probes import validate_probes  # imports torch: only when a probe is on

        validate_probes(cfg)


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


def check_name(name: str) -> None:
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
        if not dataclasses.is_dataclass(node):  # a YAML of the user's that names no schema
            name = node.get("name") if isinstance(node, dict) else None
            builtin = _PACKAGED_SCHEMAS[group].get(name)
            first = SCHEMA_PREFIX + (builtin.__name__.lower() if builtin else str(name)) if name in schemas else \
                "SCHEMA"
            raise UserError(f"the {group} config chosen has no schema: its YAML must start with "
                            f"'defaults: [{_shown(first)}, _self_]' so that its keys are typed and checked")
        if node.name not in schemas:
            raise UserError(f"unknown {group} '{_shown(node.name)}'; valid: {', '.join(sorted(schemas))}")
        if type(node) is not schemas[node.name]:
            same = sorted(n for n, s in schemas.items() if s is type(node))
            raise UserError(f"{group}.name={node.name} does not fit the chosen {group} config, which has the keys of "
                            f"{'/'.join(same)}; choose it with {group}={node.name}")


_PACKAGED_SCHEMAS = {group: dict(schemas) for group, schemas in SCHEMAS.items()}  # before any plugin
DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}  # synthetic: data.num_classes


def _check_batch_classes(cfg: Config) -> None:
    """data.batch_classes=k: at most the dataset's classes, and each batch takes batch_size/k from each class."""
    k = cfg.data.batch_classes
    if k is None:
        return
    classes = getattr(cfg.data, "num_classes", None) or DATASET_CLASSES.get(cfg.data.name)
    if classes is None:  # a plugin's dataset that did not say its class count: its data will
        classes = k
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
