"""normbench: compare normalization layers across batch sizes, with error bars.

The Python API (each name is imported on first use, so ``import normbench`` stays fast and torch-free):

* ``normbench.run(overrides)``: train one run; its summary and per-epoch metrics as pandas objects.
* ``normbench.sweep(overrides, jobs=1)``: a sweep and its report; the runs, summary and verdict.
* ``normbench.load(folder)``: an experiment folder's runs table, summary with intervals and verdict.
* ``normbench.check(norm=... | model=...)``: the conformance battery of a norm or model, as a DataFrame.
* ``normbench.register_norm / register_model / register_dataset``: entries of your own (plugins).
* ``normbench.load_plugins(specs)``: load plugins by path or module, as ``--plugin`` does.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("normbench")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

import sys
import types

_LAZY = {
    "run": "normbench.api", "load": "normbench.api", "check": "normbench.api",
    "Run": "normbench.api", "Results": "normbench.api",
    "register_norm": "normbench.plugins", "register_model": "normbench.plugins",
    "register_dataset": "normbench.plugins", "load_plugins": "normbench.plugins",
    "UserError": "normbench.errors",
}

__all__ = ["__version__", "sweep", *_LAZY]


class _CallableSweep(types.ModuleType):
    """The subpackage `normbench.sweep` (the sweep machinery) is also the API function `normbench.sweep(...)`."""

    def __call__(self, overrides=(), **kwargs):
        from normbench.api import sweep

        return sweep(overrides, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name == "sweep" and type(value) is types.ModuleType:  # the import system binding the subpackage
            value.__class__ = _CallableSweep
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "sweep":  # not imported yet: importing it binds it (callable) to this package
        import importlib

        return importlib.import_module("normbench.sweep")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the lazy names too, for tab completion in a notebook
