"""Registering a plugin's norm, model or dataset: its builder, its typed options and where it comes from.

An entry lands in the same places a built-in one is: the torch registry (`normbench.norms.NORMS`,
`normbench.models.MODELS`, `normbench.data.DATASETS`), the torch-free schema table
(`normbench.config.SCHEMAS`) that validation reads, and Hydra's ConfigStore: ``norm=NAME`` composes
its options' defaults with no YAML at all, and a YAML of your own starts from ``schema_NAME``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from normbench.errors import UserError
from normbench.plugins.loading import Provenance, current, in_process

KINDS = ("flat", "spatial", "recurrent")
WHAT = {"norm": "norm", "model": "model", "data": "dataset"}
# Keys a plugin's options may not declare: the base config of the group has them with another meaning.
RESERVED = {"norm": {"name", "position", "noise"}, "model": {"name"},
            "data": {"name", "root", "train_size", "test_size", "augment", "batch_classes"}}


@dataclass
class Entry:
    group: str  # norm | model | data
    name: str
    build: Callable
    options: type | None  # the plugin's own dataclass, or None
    schema: type  # the config dataclass normbench composes and checks: the group's base keys + the options
    provenance: Provenance
    description: str
    kinds: tuple[str, ...] = KINDS  # norms: the kinds of features it is defined on

    def options_of(self, node):
        """The plugin's options as its builder receives them, from a composed config node (None: defaults)."""
        if self.options is None:
            return None
        if node is None:
            return self.options()
        return self.options(**{f.name: getattr(node, f.name) for f in dataclasses.fields(self.options)})


ENTRIES: dict[tuple[str, str], Entry] = {}


def entry(group: str, name: str) -> Entry | None:
    return ENTRIES.get((group, name))


def schema_named(class_name: str) -> type:
    """A plugin schema by its class name (how pickle finds it in another process)."""
    for e in ENTRIES.values():
        if e.schema.__name__ == class_name:
            return e.schema
    raise AttributeError(class_name)


def _class_name(group: str, name: str) -> str:
    return f"_{group}_{name}"


def _schema(group: str, name: str, options: type | None, who: str) -> type:
    from normbench.config.schemas import DataConfig, NormConfig

    fields = [("name", str, dataclasses.field(default=name))]
    if options is not None:
        try:
            hints = typing.get_type_hints(options)
        except Exception as e:  # noqa: BLE001 - an annotation that does not resolve
            raise UserError(f"{who}: the types of options {options.__name__} do not resolve: {e}") from e
        for f in dataclasses.fields(options):
            if f.name in RESERVED[group]:
                raise UserError(f"{who}: options may not declare '{f.name}' (normbench's own {group} key)")
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{who}: option '{f.name}' needs a default (the config starts from the defaults)")
            default = (dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
                       else dataclasses.field(default_factory=f.default_factory))
            fields.append((f.name, hints[f.name], default))
    base = {"norm": (NormConfig,), "data": (DataConfig,), "model": ()}[group]
    schema = dataclasses.make_dataclass(_class_name(group, name), fields, bases=base)
    schema.__module__ = "normbench.plugins"  # pickled by name; normbench.plugins.__getattr__ finds it
    schema.__qualname__ = schema.__name__
    schema.__doc__ = f"Options of {WHAT[group]} '{name}' (a plugin)."
    from omegaconf import OmegaConf

    try:
        OmegaConf.structured(schema)
    except Exception as e:  # noqa: BLE001 - OmegaConf's own message: an unsupported type, a bad default
        raise UserError(f"{who}: options {options.__name__ if options else ''} cannot be a config: "
                        f"{str(e).splitlines()[0]}") from e
    return schema


def _check(group: str, name: str, build, options, who: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", name):
        raise UserError(f"{who}: a {WHAT[group]} name is lowercase letters, digits and '_', starting with a "
                        f"letter, at most 40 characters (it is part of run ids), got {name!r}")
    if not callable(build):
        raise UserError(f"{who}: the builder of {WHAT[group]} '{name}' is not callable")
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise UserError(f"{who}: options must be a dataclass (the class, not an instance), got {options!r}")
    from normbench.config.schemas import SCHEMAS

    old = ENTRIES.get((group, name))
    if name in SCHEMAS[group] and (old is None or old.provenance.plugin != current_plugin(build, options).plugin):
        owner = f"by plugin {old.provenance.plugin}" if old else "built in"
        raise UserError(f"{who}: {WHAT[group]} '{name}' is already registered ({owner}); choose another name")


def current_plugin(build, options) -> Provenance:
    return current() or in_process(build, options)


def register(group: str, name: str, build: Callable, options: type | None = None, description: str | None = None,
             kinds: tuple[str, ...] = KINDS, **flags) -> Entry:
    """Register `build` as `group` entry `name` (see `normbench.register_norm` and friends)."""
    provenance = current_plugin(build, options)
    who = f"plugin {provenance.plugin}"
    _check(group, name, build, options, who)
    if group == "norm":
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise UserError(f"{who}: kinds must be some of {', '.join(KINDS)}, got {', '.join(map(str, kinds))}")
    schema = _schema(group, name, options, who)
    text = description or (build.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    new = Entry(group, name, build, options, schema, provenance, " ".join(text.split()), tuple(kinds))
    if (group, name) in ENTRIES:
        forget(group, name)  # the same plugin registering it again (a notebook cell run twice): the newer wins
    _install(new, flags)
    ENTRIES[(group, name)] = new
    return new


def _install(e: Entry, flags: dict) -> None:
    from hydra.core.config_store import ConfigStore

    from normbench.config.schemas import SCHEMA_PREFIX, SCHEMAS

    if e.group == "norm":
        from normbench.plugins.adapters import norm_spec
        from normbench.norms.spec import NORMS

        NORMS.register(e.name)(norm_spec(e, **flags))
    elif e.group == "model":
        from normbench.models import MODELS
        from normbench.plugins.adapters import model_builder

        MODELS.register(e.name)(model_builder(e))
    else:
        from normbench.config.rules import DATASET_CLASSES
        from normbench.data import DATASETS
        from normbench.plugins.adapters import dataset_builder

        DATASETS.register(e.name)(dataset_builder(e))
        if flags.get("num_classes"):
            DATASET_CLASSES[e.name] = flags["num_classes"]
    SCHEMAS[e.group][e.name] = e.schema
    # A YAML of the user's with the entry's own name is typed by the stored node too (Hydra's "automatic schema
    # matching"), which is what we want; Hydra's warning that it is deprecated would only confuse.
    warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name")
    cs = ConfigStore.instance()
    cs.store(group=e.group, name=e.name, node=e.schema)  # norm=NAME: the options' defaults, no YAML needed
    cs.store(group=e.group, name=SCHEMA_PREFIX + e.name, node=e.schema)  # a YAML's `defaults: [schema_NAME]`


def forget(group: str, name: str) -> None:
    """Remove a plugin entry from every table it was put in (tests; a replaced registration)."""
    import sys

    from hydra.core.config_store import ConfigStore

    from normbench.config.rules import DATASET_CLASSES
    from normbench.config.schemas import SCHEMA_PREFIX, SCHEMAS

    ENTRIES.pop((group, name), None)
    SCHEMAS[group].pop(name, None)
    registry = {"norm": ("normbench.norms.spec", "NORMS"), "model": ("normbench.models", "MODELS"),
                "data": ("normbench.data", "DATASETS")}[group]
    module = sys.modules.get(registry[0])
    if module is not None:
        getattr(module, registry[1]).unregister(name)
    if group == "data":
        DATASET_CLASSES.pop(name, None)
    stored = ConfigStore.instance().repo.get(group, {})
    for option in (name, SCHEMA_PREFIX + name):
        stored.pop(f"{option}.yaml", None)


def provenance_record(group: str, name: str) -> dict | None:
    """What a run records of the plugin code behind its `group` choice `name`: None for built-in entries."""
    e = ENTRIES.get((group, name))
    if e is None:
        return None
    if e.provenance.spec is None:  # registered in this process: hashed now, so that a class redefined since
        from normbench.plugins.loading import in_process  # (a notebook cell run again) counts

        return in_process(e.build, e.options).record()
    return e.provenance.record()
