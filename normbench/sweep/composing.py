"""Composing thousands of sweep jobs without composing each one from scratch.

Hydra composes a job in two steps: the config-group choices (``norm=gn``, ``+experiment=quick``,
``~model``) build the defaults list, which is merged into a config; the other overrides (``seed=3``,
``norm.num_groups=8``, ``+a.b=1``, ``~a.b``, dict values) are then applied to it. The jobs of a
sweep share few combinations of group choices, so `JobComposer`

1. composes each distinct sequence of group choices once, with Hydra (a "base");
2. for a job whose other overrides all set an existing value (``key=scalar``) on a base without
   interpolations, copies the base's typed config and sets those values, each converted by the
   config node that holds it (OmegaConf's own conversion: ``batch_size=8`` an int, ``norm.position=
   post_act`` the enum), then validates the result as `normbench.config.to_config` does;
3. for any other job (``+``/``~`` keys, lists, dicts, interpolations, a value that does not convert),
   applies the overrides to a copy of the base with Hydra's own final step and converts it with
   `to_config`, so an error reads exactly as a full composition's would.

Either way a job gets the config Hydra would compose for it (tests/test_composing.py compares them).
"""

from __future__ import annotations

import copy
import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, ValueNode

from normbench.config import Config, clean_hydra_error, to_config, validate
from normbench.config.composition import reject_unknown_keys
from normbench.errors import UserError
from normbench.sweep.hydra_glue import HYDRA_ERRORS, apply_overrides, compose_job, group_repository

DOTTED_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")
SCALARS = (bool, int, float, str, type(None))


class _Base:
    """One composed combination of group choices: its DictConfig and, when values can be set on a copy
    of it, its typed (not yet validated) config."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.typed: Config | None = None
        self.leaves: dict[str, ValueNode | None] = {}
        if not _has_interpolation(cfg):
            try:
                reject_unknown_keys(cfg, "")
                self.typed = OmegaConf.to_object(cfg)
            except (UserError, *HYDRA_ERRORS):
                self.typed = None  # each job goes the exact way, and fails there with the usual message

    def leaf(self, key: str) -> ValueNode | None:
        """The value node at a dotted key, or None when the key is absent or holds a container."""
        if key not in self.leaves:
            node = self.cfg
            for part in key.split("."):
                node = node._get_node(part) if isinstance(node, DictConfig) else None
                if node is None:
                    break
            self.leaves[key] = node if isinstance(node, ValueNode) else None
        return self.leaves[key]


def _plain_setting(override) -> bool:
    """Whether an override only sets a value: ``dotted.key=scalar``. "???" (missing) and "${...}" are not
    plain values: OmegaConf gives them meanings of their own."""
    value = override.value()
    if override.is_delete() or override.is_add() or override.is_force_add() or override.package is not None:
        return False
    if isinstance(value, str) and ("${" in value or value == "???"):
        return False
    return isinstance(value, SCALARS) and DOTTED_KEY.fullmatch(override.key_or_group) is not None


def _has_interpolation(cfg) -> bool:
    """Whether any value in `cfg` is an interpolation (``${...}``), which a changed value could feed."""
    for key in (cfg.keys() if OmegaConf.is_dict(cfg) else range(len(cfg))):
        node = cfg._get_node(key)
        if node._is_interpolation():
            return True
        if OmegaConf.is_config(node) and not node._is_none() and not node._is_missing() and _has_interpolation(node):
            return True
    return False


def finish(composed: Config | DictConfig) -> Config:
    """A composed job as a validated `Config`: one `UserError` line when it cannot run."""
    if isinstance(composed, DictConfig):
        return to_config(composed)
    validate(composed)
    return composed


class JobComposer:
    """Each job of one sweep, composed (see the module docstring)."""

    def __init__(self, hydra, primary):
        self.hydra, self.primary = hydra, primary
        self.parser = OverridesParser.create()
        self.repo = group_repository(hydra, primary)
        self.bases: dict[tuple[str, ...], _Base] = {}
        self.parsed: dict[str, object] = {}  # override text -> parsed Override (jobs share most of them)
        self.groups: dict[str, bool] = {}  # key -> whether it names a config group
        self.counts = {"values": 0, "overrides": 0, "full": 0}  # jobs by the way they were composed

    def compose(self, job: list[str]) -> Config | DictConfig:
        """The job's config, not yet validated (`finish` validates it); a config Hydra cannot compose (an
        unknown group option, a value of the wrong type) raises a `UserError`, as a full composition would."""
        try:
            split = self._split(job)
            if split is None:
                self.counts["full"] += 1
                return compose_job(self.hydra, self.primary, job)
            choices, values = split
            base = self._base(choices)
            typed = self._set_values(base, values)
            if typed is not None:
                self.counts["values"] += 1
                return typed
            self.counts["overrides"] += 1
            cfg = copy.deepcopy(base.cfg)
            apply_overrides(values, cfg)
            return cfg
        except HYDRA_ERRORS as e:
            raise UserError(clean_hydra_error(e)) from e

    def _split(self, job: list[str]):
        """(group choices as written, other overrides parsed), as Hydra's DefaultsList splits them;
        None for a job that sets a Hydra key, which is composed in full."""
        choices, values = [], []
        for text in job:
            if text not in self.parsed:
                (self.parsed[text],) = self.parser.parse_overrides([text])
            override = self.parsed[text]
            if override.is_hydra_override() or override.is_sweep_override():
                return None
            if isinstance(override.value(), dict) or not self._is_group(override.key_or_group):
                values.append(override)
            else:
                choices.append(text)
        return tuple(choices), values

    def _is_group(self, key: str) -> bool:
        if key not in self.groups:
            self.groups[key] = self.repo.group_exists(key)
        return self.groups[key]

    def _base(self, choices: tuple[str, ...]) -> _Base:
        if choices not in self.bases:
            self.bases[choices] = _Base(compose_job(self.hydra, self.primary, list(choices)))
        return self.bases[choices]

    @staticmethod
    def _set_values(base: _Base, values: list) -> Config | None:
        """A copy of the base's typed config with each ``key=scalar`` set; None when a value is of
        another kind or does not convert (the exact way then gives the result, or the error)."""
        if base.typed is None:
            return None
        settings = []
        for override in values:
            value = override.value()
            if not _plain_setting(override):
                return None
            leaf = base.leaf(override.key_or_group)
            if leaf is None:
                return None
            try:
                if value is None:
                    if not leaf._is_optional():
                        return None
                    converted = None
                else:
                    converted = leaf.validate_and_convert(value)
            except HYDRA_ERRORS:
                return None
            settings.append((override.key_or_group.split("."), converted))
        cfg = copy.deepcopy(base.typed)
        for path, value in settings:
            node = cfg
            for part in path[:-1]:
                node = getattr(node, part, None)
            if node is None or isinstance(node, dict) or not hasattr(node, path[-1]):
                return None
            setattr(node, path[-1], value)
        return cfg
