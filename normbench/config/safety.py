"""No code in configs: user overrides and --config-dir YAML are refused before Hydra reads them if they
could make Hydra import or run code."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import HydraException

from normbench.config.messages import _parse_problem, _shown, clean_hydra_error
from normbench.config.schemas import GROUPS
from normbench.errors import UserError


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
        if override.key_or_group in (*GROUPS, "experiment") and isinstance(override.value(), list):
            group = override.key_or_group
            raise UserError(f"{where}: {group} takes one name, not a list; to train several, sweep them: "
                            f"normbench sweep {group}=a,b (in Python: normbench.sweep({{'{group}': ['a', 'b']}}))")


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
        check_config_file(root, path)


def check_config_file(root: Path, path: Path) -> None:
    """`check_config_dir` for one YAML file under `root`."""
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
