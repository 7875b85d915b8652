"""Loading plugins, and what each one is: its name and a hash of its source (its provenance).

Code is loaded only from what the user names: `--plugin PATH.py`, `--plugin package.module`, the
entry points of installed packages (group ``normbench.plugins``), and NORMBENCH_PLUGINS, the variable
through which a process hands the plugins it loaded to its workers (``--jobs``, submitit, SLURM).
Never from a config.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from normbench.errors import UserError

ENV = "NORMBENCH_PLUGINS"  # os.pathsep-separated plugin specs, set by `load` for the processes it starts
GROUP = "normbench.plugins"  # the entry point group of installed plugins


@dataclass(frozen=True)
class Provenance:
    """Where an entry's code comes from. `source` is part of every run id that uses the entry."""

    plugin: str  # its name: the file's stem, the module, the entry point, or the defining module
    source: str  # "sha256:<16 hex>" of its source; entry points: "<dist> <version> sha256:<16 hex>"
    spec: str | None = None  # how another process loads it again; None: registered in this process only

    def record(self) -> dict:
        return {"name": self.plugin, "source": self.source}


_current: list[Provenance] = []  # the plugin being loaded now (registrations made meanwhile belong to it)
_empty: list[str] = []  # plugins that loaded without registering anything (a forgotten decorator, say)
_loaded: dict[str, Provenance] = {}  # spec key -> provenance, each plugin once per process
_entry_points_done = False


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(hashlib.sha256(chunk).digest())
    return "sha256:" + h.hexdigest()[:16]


def _module_files(origin: str | None, package_dirs: Iterable[str] | None) -> list[Path]:
    files = [Path(origin)] if origin and origin.endswith(".py") else []
    for folder in package_dirs or []:
        files += sorted(p for p in Path(folder).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(set(files))


def _files_digest(files: list[Path]) -> str:
    return _digest(str(p.name).encode() + b"\0" + p.read_bytes() for p in files)


def current() -> Provenance | None:
    return _current[-1] if _current else None


def in_process(*objects) -> Provenance:
    """The provenance of code registered from this process (a notebook, a script): its defining module,
    and a hash of the source of the registered objects and of every class and function of that module
    they use, directly or through each other (the nn.Module a builder returns, the helpers its forward
    calls): editing any of them changes the run ids. Compiled code stands in where the source is not at
    hand (python -c, exec, some notebooks)."""
    module = next((getattr(o, "__module__", None) for o in objects if o is not None), None) or "__main__"
    used = _used_from(module, [o for o in objects if o is not None])
    return Provenance(module, _digest(_known_text(obj) for obj in used))


_texts: dict[int, tuple[object, bytes]] = {}  # id -> (the object, kept so its id stays its own; its code text)


def _known_text(obj) -> bytes:
    """`_code_text`, read once per object: run ids are computed for every job of a sweep, and an object
    defined again (a notebook cell run again) is a new object, read anew."""
    known = _texts.get(id(obj))
    if known is None or known[0] is not obj:
        known = _texts[id(obj)] = (obj, _code_text(obj))
    return known[1]


def _used_from(module: str, roots: list) -> list:
    """`roots` and the classes and functions of `module` they reach through the global names their code
    uses (methods of a class included), each once, in a stable order."""
    found, todo = {}, list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in found:
            continue
        found[id(obj)] = obj
        functions = [obj] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            for member in vars(obj).values():
                member = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                functions += [member] if inspect.isfunction(member) else []
        for function in functions:
            for name in _global_names(function.__code__):
                value = function.__globals__.get(name)
                if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == module:
                    todo.append(value)
    return sorted(found.values(), key=lambda o: (getattr(o, "__qualname__", ""), _known_text(o)))


def _global_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions, lambdas, comprehensions
        if inspect.iscode(const):
            names |= _global_names(const)
    return names


def _code_text(obj) -> bytes:
    try:
        return inspect.getsource(obj).encode()
    except Exception:  # noqa: BLE001 - no source at hand (python -c, exec): OSError, TypeError, TokenError
        if inspect.isclass(obj):
            return obj.__qualname__.encode() + b"".join(_code_text(m) for m in vars(obj).values()
                                                         if inspect.isfunction(m))
        code = getattr(obj, "__code__", None)
        return repr((code.co_code, code.co_consts) if code else getattr(obj, "__qualname__", repr(obj))).encode()


@contextmanager
def _loading(provenance: Provenance) -> Iterator[None]:
    from normbench.plugins import entries

    before = set(entries.ENTRIES)
    _current.append(provenance)
    try:
        yield
    except BaseException:
        for key in set(entries.ENTRIES) - before:  # a plugin that fails half-way leaves nothing registered
            entries.forget(*key)
        raise
    finally:
        _current.pop()
    if set(entries.ENTRIES) == before:
        _empty.append(provenance.plugin)


def registered_nothing() -> list[str]:
    """The plugins loaded so far that registered no norm, model or dataset, each named once: what the
    command line notes, and takes from this list."""
    names = list(dict.fromkeys(_empty))
    _empty.clear()
    return names


def _line_in(e: BaseException, path: str | None) -> str:
    """' (line N)' of the deepest frame of the traceback in the plugin's own file."""
    if path is None:
        return ""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return f" (line {frames[-1].lineno})" if frames else ""


@contextmanager
def _clear_errors(what: str, path: str | None = None) -> Iterator[None]:
    """Any error while importing a plugin is one line naming it."""
    try:
        yield
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(f"plugin {what}") else f"plugin {what}: {e}") from e
    except SyntaxError as e:
        raise UserError(f"plugin {what}: syntax error at line {e.lineno}: {e.msg}") from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any error is theirs to fix
        raise UserError(f"plugin {what}: {type(e).__name__}: {e}{_line_in(e, path)}") from e


def file_module(stem: str) -> str:
    """The module name a plugin file is imported under (the same in every process, for pickle)."""
    return "normbench_plugin_" + re.sub(r"\W", "_", stem)


def _load_file(spec: str) -> None:
    path = Path(spec).expanduser().resolve()
    key = str(path)
    if key in _loaded:
        return
    if path.is_dir():
        raise UserError(f"plugin {spec}: a folder; a plugin is a .py file or an installed module")
    if not path.is_file():
        raise UserError(f"plugin {spec}: no such file")
    if path.suffix != ".py":
        raise UserError(f"plugin {spec}: a plugin file is Python source ending in .py")
    module_name = file_module(path.stem)
    # a-b.py and a_b.py would be one module: one would replace the other's classes
    other = next((k for k, p in _loaded.items() if k != key and (
        p.plugin == path.stem or k.endswith(".py") and file_module(p.plugin) == module_name)), None)
    if other is not None:
        raise UserError(f"plugin {spec}: a plugin of the same name is loaded already ({other}); rename one")
    provenance = Provenance(path.stem, _files_digest([path]), key)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # its classes can be pickled to workers, which load it the same way
    try:
        with _clear_errors(spec, key), _loading(provenance):
            module_spec.loader.exec_module(module)
    except UserError:
        sys.modules.pop(module_name, None)
        raise
    _loaded[key] = provenance


def _load_module(spec: str) -> None:
    if spec in _loaded:
        return
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
        raise UserError(f"plugin {spec}: neither a .py file nor a module name (package.module)")
    with _clear_errors(spec):
        try:
            found = importlib.util.find_spec(spec)
        except ModuleNotFoundError:
            found = None
        if found is None:
            raise UserError(f"plugin {spec}: no module named '{spec}' is installed (a file needs its .py path)")
        provenance = Provenance(spec, _files_digest(_module_files(found.origin, found.submodule_search_locations)),
                                spec)
    with _clear_errors(spec, found.origin), _loading(provenance):
        importlib.import_module(spec)
    _loaded[spec] = provenance


def _load_entry_points() -> None:
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        key = f"entrypoint:{ep.name}"
        if key in _loaded:
            continue
        what = f"{ep.name} (entry point of {ep.dist.name if ep.dist else '?'})"
        with _clear_errors(what):
            found = importlib.util.find_spec(ep.module)
            files = _module_files(found.origin, found.submodule_search_locations) if found else []
            version = f"{ep.dist.name} {ep.dist.version} " if ep.dist else ""
            provenance = Provenance(ep.name, version + _files_digest(files), key)
        with _clear_errors(what, found.origin if found else None), _loading(provenance):
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()  # an entry point may name a function that registers, or a module that does on import
        _loaded[key] = provenance


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def env_specs() -> list[str]:
    return [s for s in os.environ.get(ENV, "").split(os.pathsep) if s.strip()]


def load(specs: Iterable[str] = (), entry_points: bool = True) -> None:
    """Load installed plugins (entry points), those named in NORMBENCH_PLUGINS and `specs` (a .py path or
    a module name each), each once per process; then NORMBENCH_PLUGINS names every plugin loaded, so the
    processes this one starts load the same. Any error is one `UserError` line naming the plugin."""
    if isinstance(specs, (str, os.PathLike)):  # one plugin, not the characters of its path
        specs = [specs]
    if entry_points:
        _load_entry_points()
    for spec in [*env_specs(), *specs]:
        spec = str(spec).strip()
        if not spec:
            raise UserError("--plugin needs a .py file or a module name")
        (_load_file if _is_file(spec) else _load_module)(spec)
    shared = [p.spec for p in _loaded.values() if p.spec and not p.spec.startswith("entrypoint:")]
    if shared:
        os.environ[ENV] = os.pathsep.join(shared)


def loaded() -> dict[str, Provenance]:
    """Every plugin loaded in this process, by spec."""
    return dict(_loaded)
