"""Errors as one clear line: Hydra, OmegaConf and YAML errors cleaned of internals, user text shown safely."""

from __future__ import annotations

import dataclasses
import re

import yaml
from hydra.errors import HydraException, OverrideParseException
from omegaconf.errors import ConfigAttributeError

from normbench.config.schemas import SCHEMA_PREFIX, SCHEMAS, Config, EvalConfig, PerfConfig


PLUGIN_GROUPS = ("norm", "model", "data")  # the groups plugins add choices to


def _shown(text: str, limit: int = 60) -> str:
    """`text` on one short line: control characters escaped, the middle of a long text cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-17:]}"



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


def _schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _schema_named(name: str) -> type | None:
    every = [Config, EvalConfig, PerfConfig] + [s for group in SCHEMAS.values() for s in group.values()]
    return next((s for s in every if s.__name__ == name), None)


def _valid_keys(schema_name: str) -> str:
    """'; valid keys here: ...' for a schema class's name, or '' for one that is not normbench's."""
    schema = _schema_named(schema_name)
    return f"; valid keys here: {', '.join(_schema_fields(schema))}" if schema else ""


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
    ambiguous = re.search(r"Ambiguous value for argument '([^']*)'", text)
    if ambiguous and "--multirun" in text:  # key=a,b where one config is composed: run, config, check
        shown = _shown(ambiguous.group(1))
        return (f"{shown}: a list of values is a sweep, and this command takes one config: normbench sweep {shown} "
                "runs each (for a value that is a list, write key=[a,b]; for text with a comma, key='a,b')")
    missing = re.search(r"Could not find '([^']+)/([^/']*)'", text) or re.search(r"You must specify '([^']+)'()", text)
    if missing and "Available options" in text:
        options = text.split("Available options", 1)[1].split("Config search path")[0].splitlines()[1:]
        valid = ", ".join(o.strip() for o in options if o.strip() and not o.strip().startswith(SCHEMA_PREFIX))
        group, choice = missing.groups()
        hint = f"; a {group} from a plugin needs --plugin" if group in PLUGIN_GROUPS else ""
        return (f"unknown {group} '{_shown(choice)}'; valid: {valid}{hint}" if choice
                else f"{group}= needs a value; valid: {valid}")
    builds_on = re.search(r"In '([^']+)': Could not load '([^/']+)/([^']+)'", text)
    if builds_on:  # a user's YAML variant of a choice that is not there (a plugin's, say, without --plugin)
        where, group, choice = builds_on.groups()
        hint = f"; a {group} from a plugin needs --plugin" if group in PLUGIN_GROUPS else ""
        return (f"{where} builds on {group} '{_shown(choice)}', which is not known here{hint} "
                f"(normbench list shows the known ones)")
    full_key = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    if isinstance(cause, ConfigAttributeError) and full_key:
        schema = re.search(r"object_type=(\w+)", text).group(1)
        return f"unknown key '{full_key.group(1)}'{_valid_keys(schema)}"
    not_in = re.search(r"Key '[^']+' not in '(\w+)'", text)
    if full_key and not_in:  # a preset (or another config) sets a key the chosen model, norm, ... does not have
        where = re.match(r"In '([^']+)'", text.strip())
        return (f"unknown key '{full_key.group(1)}'" + (f" (set in {where.group(1)})" if where else "")
                + _valid_keys(not_in.group(1)))
    if full_key and "does not support deletion" in text:  # ~model.width: a group's settings cannot be removed
        key = full_key.group(1)
        return (f"cannot delete '{key}': the settings inside {key.split('.')[0]} cannot be removed; set it "
                f"instead ({key}=VALUE; normbench config shows its default)")
    if full_key and "missing mandatory value" in text:  # key=??? or ~group
        return f"{full_key.group(1)} has no value (set to ??? or deleted with ~); set it: {full_key.group(1)}=VALUE"
    if full_key:
        return f"{full_key.group(1)}: {first}"
    return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and "hydra.cc/docs" not in ln)
