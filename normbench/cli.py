"""The normbench command line: thin Typer commands over the library."""

from __future__ import annotations

import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from normbench import __version__
from normbench.config import GROUPS, compose, run_id, to_dict
from normbench.display import EpochProgress, console, summary_table
from normbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compare normalization layers across batch sizes, with error bars.")

Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Hydra overrides, e.g. model=cnn norm=gn batch_size=4 data.root=PATH", show_default=False)]
ConfigDir = Annotated[Optional[Path], typer.Option(
    "--config-dir", "-c", help="A folder of your own configs (same groups: data/, model/, norm/, "
    "optim/, experiment/), searched before the packaged ones.", show_default=False)]


@contextmanager
def user_errors():
    """A user error is one red line and exit code 2; NORMBENCH_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except UserError as e:
        if os.environ.get("NORMBENCH_DEBUG") == "1":
            raise
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"normbench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


@app.command()
def run(overrides: Overrides = None, config_dir: ConfigDir = None) -> None:
    """Train one model with one norm, evaluate it, and write its run folder."""
    from normbench.runner import execute

    with user_errors():
        cfg = compose(overrides or [], config_dir)
        with EpochProgress(cfg.epochs, cfg.batch_size) as progress:
            result = execute(cfg, progress)
    console.print(summary_table(result.summary))
    console.print(f"results: {result.folder}")


@app.command("config")
def show_config(overrides: Overrides = None, config_dir: ConfigDir = None) -> None:
    """Print the composed config, with the run id it maps to."""
    with user_errors():
        cfg = compose(overrides or [], config_dir)
    text = f"# run_id: {run_id(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    console.print(Syntax(text, "yaml") if console.is_terminal else text, end="")


def _choices(group: str, config_dir: Path | None) -> dict[str, str]:
    """Option name -> the first comment line of its YAML, packaged first, then the user's."""
    folders = [resources.files("normbench.conf") / group]
    if config_dir:
        folders.append(Path(config_dir) / group)
    found = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml"):
                first = entry.read_text().splitlines()[:1]
                found[entry.name[:-5]] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return found


@app.command("list")
def list_choices(config_dir: ConfigDir = None) -> None:
    """List the datasets, models, norms, optimizers and experiment presets."""
    for group in (*GROUPS, "experiment"):
        table = Table(title=f"{group}  ({group}=NAME)", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold cyan")
        table.add_column()
        for name, description in _choices(group, config_dir).items():
            table.add_row(name, description)
        console.print(table)
        console.print()


def main() -> None:
    app()
