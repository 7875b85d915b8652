"""The README names only commands, options and config keys that exist, spelled as the tool accepts them."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import typer.main

from normbench.cli import app
from normbench.config import SCHEMAS, Config

TEXT = (Path(__file__).parent.parent / "README.md").read_text()
# The "When something is wrong" table names bad input on purpose; everything else must be valid as written.
_bad_start = TEXT.index("## When something is wrong")
README = TEXT[:_bad_start] + TEXT[TEXT.index("\n## ", _bad_start + 1):]
# Fenced blocks are paired by their opening line (```bash, ```python, ```): the text between two blocks is
# not a block. Inline spans are looked for outside the blocks.
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, re.S | re.M)
PROSE = re.sub(r"^```\w*\n.*?^```$", "", README, flags=re.S | re.M)
SPANS = re.findall(r"`([^`\n]+)`", PROSE) + [text for lang, text in BLOCKS if lang in ("", "bash")]
GROUPS = ("data", "model", "norm", "optim", "experiment")


def _click():
    return typer.main.get_command(app)


def test_every_command_named_exists():
    commands = set(_click().commands)
    named = {m for span in SPANS for m in re.findall(r"normbench ([a-z][\w-]*)", span)}
    assert named and named <= commands, named - commands


def test_every_option_named_exists():
    root = _click()
    options = {o for p in root.params for o in getattr(p, "opts", [])} | {"--install-completion", "--help"}
    for command in root.commands.values():
        options |= {o for p in command.params for o in getattr(p, "opts", [])}
    named = {m for span in SPANS for m in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", span)}
    named -= {"--config-dir"} - options  # (checked: it is an option of run, sweep, list and config)
    pip_and_python = {"--full", "--device", "--csv", "--data-root", "--repeats", "--index-url", "--extra-index-url",
                      "--logdir"}  # (and tensorboard)
    assert named - pip_and_python <= options, (named - pip_and_python) - options


def _keys(schema, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(schema):
        out.add(prefix + f.name)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                and dataclasses.is_dataclass(f.default_factory)):
            out |= _keys(f.default_factory, f"{prefix}{f.name}.")
    return out


def _all_keys() -> set[str]:
    keys = _keys(Config)
    for group, schemas in SCHEMAS.items():
        for schema in schemas.values():
            keys |= {f"{group}.{k}" for k in _keys(schema)}
    return keys


EXAMPLES = Path(__file__).parent.parent / "examples"


def _choices(group: str) -> set[str]:
    """The packaged options, and those of the example plugin (examples/loo_bn.py and examples/GROUP/*.yaml)."""
    from normbench import plugins

    folder = resources.files("normbench.conf") / group
    names = {e.name[:-5] for e in folder.iterdir() if e.name.endswith(".yaml")}
    names |= {p.stem for p in (EXAMPLES / group).glob("*.yaml")}
    try:
        plugins.load([EXAMPLES / "loo_bn.py"], entry_points=False)
        names |= {name for kind, name in plugins.ENTRIES if kind == group}
    finally:
        plugins.reset()
    return names


OVERRIDE = re.compile(r"(?<![\w.\-/])([a-z_]+(?:\.[a-z_]+)*)=([\w.,\-\[\]:()]+)")


@pytest.mark.parametrize("group", GROUPS)
def test_every_choice_named_exists(group):
    named = {v for span in SPANS for k, values in OVERRIDE.findall(span) if k == group for v in values.split(",")}
    named = {n for n in named if n and n.isidentifier() and not n.isupper()}  # NAME: a placeholder
    assert named <= _choices(group), named - _choices(group)


def test_every_config_key_named_exists():
    keys = _all_keys()
    named = {k for span in SPANS for k, _ in OVERRIDE.findall(span)
             if "." in k and not k.startswith(("hydra.", "torch.", "os.", "builtins."))}
    named |= {span for span in SPANS if re.fullmatch(r"(data|model|norm|optim|eval|perf)(\.[a-z_]+)+", span)}
    assert len(named) > 15  # the README does name config keys
    unknown = {k for k in named if k not in keys and not re.match(r"^norm\.noise\.(mean|std)$", k)
               and k != "norm.plugin"}  # (what a run records of a plugin's code, not a setting)
    assert not unknown, unknown
