"""Plugins: norms, models and datasets of your own, compared under the same protocol as normbench's.

The contract (README, "Plugins"): a builder and, optionally, a dataclass of options, registered by name::

    @normbench.register_norm("loo_bn", options=LooOptions, kinds=("flat", "spatial"))
    def build(num_features, kind, options): ...

* `entries`: registration into the registries, the schema table and Hydra's ConfigStore; `forget`.
* `loading`: `load` (``--plugin``, entry points, NORMBENCH_PLUGINS) and each plugin's provenance.
* `adapters` (imports torch): the builders wrapped to the built-in contract, their mistakes named.

This package imports neither torch nor Hydra until something is registered.
"""

from __future__ import annotations

from collections.abc import Callable

from normbench.plugins.entries import ENTRIES, KINDS, Entry, entry, forget, provenance_record, register
from normbench.plugins.loading import ENV, GROUP, Provenance, env_specs, load, loaded

__all__ = ["ENTRIES", "ENV", "GROUP", "KINDS", "Entry", "Provenance", "entry", "env_specs", "forget", "load",
           "load_plugins", "loaded", "provenance_record", "register", "register_dataset", "register_model",
           "register_norm", "reset", "unshareable"]


def _decorate(group: str, name: str, build: Callable | None, **kw):
    if build is not None:
        register(group, name, build, **kw)
        return build

    def decorator(fn: Callable) -> Callable:
        register(group, name, fn, **kw)
        return fn

    return decorator


def register_norm(name: str, build: Callable | None = None, *, options: type | None = None,
                  kinds: tuple[str, ...] = KINDS, centers: bool = True, activation: bool = False,
                  description: str | None = None):
    """Register norm `name`: ``build(num_features, kind, options) -> nn.Module``. As a decorator
    (``@register_norm("x", options=XOptions)``) or a call (``register_norm("x", build)``).

    options: a dataclass whose fields (each with a default) become ``norm.FIELD`` keys, typed and checked
    when the config is composed; the builder gets an instance of it. kinds: the kinds of features it is
    defined on (others are refused with one line). centers: it removes a per-channel constant, so the
    layer before it needs no bias. activation: it brings its own activation (no ReLU after it).
    """
    return _decorate("norm", name, build, options=options, kinds=tuple(kinds), description=description,
                     centers=centers, activation=activation)


def register_model(name: str, build: Callable | None = None, *, options: type | None = None,
                   description: str | None = None):
    """Register model `name`: ``build(options, input_shape, num_classes, norm) -> nn.Module``, where `norm`
    builds the chosen norm: ``norm(C, kind)``, ``norm.block(C, kind)`` (with its ReLU), ``norm.linear(...)``,
    ``norm.conv(...)`` (the layers feeding a norm, without a useless bias)."""
    return _decorate("model", name, build, options=options, description=description)


def register_dataset(name: str, build: Callable | None = None, *, options: type | None = None,
                     num_classes: int | None = None, description: str | None = None):
    """Register dataset `name`: ``build(options, root) -> normbench.data.RawData`` (uint8 images
    (N, C, H, W) and int64 labels, train and test); `root` is data.root (or the default data folder)."""
    return _decorate("data", name, build, options=options, description=description, num_classes=num_classes)


def load_plugins(specs=()) -> None:
    """Load plugins by path or module name (and the installed ones): what ``--plugin`` does."""
    load(specs)


def reset() -> None:
    """Forget every plugin entry and loaded plugin of this process (tests; a notebook starting over)."""
    import os
    import sys

    from normbench.plugins import loading

    for key in list(ENTRIES):
        forget(*key)
    for provenance in loading._loaded.values():
        if provenance.spec and provenance.spec.endswith(".py"):
            sys.modules.pop(loading.file_module(provenance.plugin), None)
    loading._loaded.clear()
    loading._empty.clear()
    loading._entry_points_done = False
    os.environ.pop(ENV, None)


def unshareable(cfg) -> list[str]:
    """The choices of `cfg` registered in this process only (a notebook), which worker processes cannot load."""
    out = []
    for group in ("norm", "model", "data"):
        e = entry(group, getattr(cfg, group).name)
        if e is not None and e.provenance.spec is None:
            out.append(f"{group}={e.name}")
    return out


def __getattr__(name: str):
    """Plugin schemas by class name, for pickle: another process (a --jobs worker, a submitit job) that
    unpickles a config first loads the plugins NORMBENCH_PLUGINS names."""
    if name.startswith("_") and not name.startswith("__"):
        from normbench.plugins.entries import schema_named

        try:
            return schema_named(name)
        except AttributeError:
            load()
            return schema_named(name)
    raise AttributeError(f"module 'normbench.plugins' has no attribute {name!r}")
