"""Hydra composition: the packaged config (plus a checked user config dir) and overrides -> validated
dataclasses. No DictConfig travels past this module."""

from __future__ import annotations

import dataclasses

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normbench.config.messages import _schema_fields, clean_hydra_error
from normbench.config.rules import validate
from normbench.config.safety import search_path_overrides
from normbench.config.schemas import Config
from normbench.errors import UserError

CONFIG_MODULE = "normbench.conf"


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


def to_config(cfg) -> Config:
    """DictConfig -> validated dataclasses (the one conversion at the boundary)."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    reject_unknown_keys(cfg, "")
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a missing value ("???"), an interpolation that does not resolve
        raise UserError(clean_hydra_error(e)) from e
    validate(config)
    return config


def reject_unknown_keys(node, prefix: str) -> None:
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
            reject_unknown_keys(child, f"{prefix}{key}.")

