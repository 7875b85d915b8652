"""Run identity: the config as a plain dict, its hash (what is and is not hashed), the run id, and the
effective learning rate the run trains with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from normbench.config.schemas import Config


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
