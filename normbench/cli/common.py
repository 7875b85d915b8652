"""What every command shares: the Typer app, the option types, user errors as one line, plugins, and `main`."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from normbench import __version__
from normbench.display import TRANSLITERATE, console, stderr
from normbench.errors import RunFailed, UserError

# Commands import what they use when they run (the config package, torch, pandas), so that --version,
# list and config start fast (benchmarks/startup.py; tests/test_startup.py checks what each imports).

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compare normalization layers across batch sizes, with error bars.")

Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Hydra overrides, e.g. model=cnn norm=gn batch_size=4 data.root=PATH", show_default=False)]
ConfigDir = Annotated[Optional[Path], typer.Option(
    "--config-dir", "-c", help="A folder of your own configs (same groups: data/, model/, norm/, "
    "optim/, experiment/), searched before the packaged ones.", show_default=False)]
Plugins = Annotated[Optional[list[str]], typer.Option(
    "--plugin", "-p", help="Load a plugin: a .py file or an installed module (package.module) that registers "
    "norms, models or datasets; repeatable. Installed packages' entry points (normbench.plugins) load always.",
    show_default=False)]


def load_plugins(plugins: list[str] | None) -> None:
    """Load the installed plugins and those named by --plugin (the command's first step); an error is one
    line, and a plugin that registers nothing gets a note (on stderr: `config` prints YAML on stdout)."""
    from normbench.display import note, stderr
    from normbench.plugins import load
    from normbench.plugins.loading import registered_nothing

    with user_errors():
        load(plugins or [])
    for name in registered_nothing():
        note(f"plugin {name} registered no norm, model or dataset (normbench.register_norm, register_model "
             "or register_dataset, called when it is imported)", stderr)


def command_line(command: str, args: list[str], plugins: list[str] | None, config_dir: Path | None,
                 jobs: int = 1, retry_failed: bool = False) -> str:
    """The invocation as a shell command that runs it again (recorded in sweeps.json, report.md, claims.md)."""
    import shlex

    words = ["normbench", command, *(w for p in plugins or [] for w in ("--plugin", p)),
             *(["--config-dir", str(config_dir)] if config_dir else []), *args,
             *(["--jobs", str(jobs)] if jobs > 1 else []), *(["--retry-failed"] if retry_failed else [])]
    return shlex.join(words)


def one_config_note(overrides: list[str] | None, command: str) -> str | None:
    """For `run` and `config`, which compose one config: what in the overrides only a sweep uses."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides or []]
    unused = [k for k in keys if k.startswith("hydra")]
    preset = "experiment" in keys
    if not unused and not preset:
        return None
    parts = ([f"{', '.join(dict.fromkeys(unused))}: Hydra's settings (launcher, sweeper, folders) are for normbench "
              f"sweep, and normbench {command} ignores them"] if unused else []) + (
        [f"normbench {command} takes one config from the preset, without expanding its sweep (hydra.sweeper); "
         "normbench sweep runs the whole preset"] if preset else [])
    return "; ".join(parts)


@contextmanager
def user_errors():
    """A user error is one red line and exit code 2, a run whose training raised one line and exit code 1;
    NORMBENCH_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except UserError as e:
        if os.environ.get("NORMBENCH_DEBUG") == "1":
            raise
        stderr.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except RunFailed as e:  # training raised: not a config to fix (exit 1), and its summary keeps the traceback
        if os.environ.get("NORMBENCH_DEBUG") == "1":
            raise
        stderr.print(f"[red]error:[/red] the run failed: {escape(e.error)} (its summary.json in {escape(str(e.folder))} "
                     "records the traceback; NORMBENCH_DEBUG=1 shows it here)", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"normbench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def print_failures(failures: list[tuple[str, str]]) -> None:
    """Each cause once: a hundred runs that fail for one reason (missing data, say) are one line."""
    console.print(f"[red]without a result (failed or invalid): {len(failures)}[/red]")
    for why, whats in _by_cause(failures).items():
        console.print(f"  {escape(_who(whats, 'runs'))}: {escape(why)}", soft_wrap=True)


def _by_cause(failures: list[tuple[str, str]]) -> dict[str, list[str]]:
    by_cause: dict[str, list[str]] = {}
    for what, why in failures:
        by_cause.setdefault(str(why), []).append(what)
    return by_cause


def _who(whats: list[str], plural: str) -> str:
    return whats[0] if len(whats) == 1 else f"{len(whats)} {plural} ({whats[0]}, ...)"


def all_invalid(planned: list) -> UserError | None:
    """When no job of a plan is valid: one user error with the first reason (nothing was trained or written)."""
    if not planned or any(p.state != "invalid" for p in planned):
        return None
    reasons = _by_cause([(p.label, p.error) for p in planned])
    why, labels = next(iter(reasons.items()))
    others = len(reasons) - 1
    more = f"; {others} other reason{'s' if others > 1 else ''}: the same command with --dry-run lists each"
    return UserError(f"every job is invalid ({len(planned)}); {_who(labels, 'jobs')}: {why}" + (more if others else ""))


def main() -> None:
    # A terminal or pipe that cannot encode "±" (PYTHONIOENCODING=ascii, a C locale) gets "+/-", not a crash
    # after the results are written (tables are laid out in those characters: see display.TRANSLITERATE).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=TRANSLITERATE)
    app()
