"""Commands about one config or one registry entry: run, config, list, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from normbench.cli.common import ConfigDir, Overrides, Plugins, app, load_plugins, one_config_note, user_errors
from normbench.display import console
from normbench.errors import UserError


@app.command()
def run(overrides: Overrides = None, config_dir: ConfigDir = None, plugin: Plugins = None,
        force: Annotated[bool, typer.Option("--force", help="Train again a run that already finished; the new "
                                            "result replaces the old one only once it completes.")] = False) -> None:
    """Train one model with one norm, evaluate it, and write its run folder.

    A run that already finished is shown, not trained again (unless --force).
    """
    from normbench import threads
    from normbench.config import compose
    from normbench.display import note, summary_table
    from normbench.progress import EpochProgress
    from normbench.runner import execute

    load_plugins(plugin)
    with user_errors():
        cfg = compose(overrides or [], config_dir)
        note(one_config_note(overrides, "run"))
        note(threads.over_cores_note([cfg.threads]))
        with EpochProgress(cfg.epochs, cfg.batch_size) as progress:
            result = execute(cfg, progress, replace=force)
    note(result.kept_aside)
    console.print(summary_table(result.summary))
    if not result.trained:
        console.print(f"already finished ({result.summary['status']}), not trained again; --force trains it "
                      "again and replaces this result when the new one completes")
    console.print(f"results: {result.folder}")


@app.command("config")
def show_config(overrides: Overrides = None, config_dir: ConfigDir = None, plugin: Plugins = None) -> None:
    """Print the composed config, with the run id it maps to."""
    import yaml
    from rich.syntax import Syntax

    from normbench.config import compose, run_id, to_dict
    from normbench.display import note, stderr

    load_plugins(plugin)
    with user_errors():
        cfg = compose(overrides or [], config_dir)
    note(one_config_note(overrides, "config"), stderr)  # stdout stays valid YAML
    text = f"# run_id: {run_id(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        typer.echo(text, nl=False)  # plain: no markup, no wrapping, valid YAML


@app.command("list")
def list_choices(config_dir: ConfigDir = None, plugin: Plugins = None) -> None:
    """List the datasets, models, norms, optimizers and experiment presets."""
    from normbench import listing

    load_plugins(plugin)

    if config_dir is not None and not Path(config_dir).is_dir():
        with user_errors():
            raise UserError(f"--config-dir {config_dir}: no such directory")  # as the other commands say
    for group in listing.groups():
        table = Table(title=f"{group}  ({group}=NAME)", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")  # wrapped at word boundaries on a terminal; never cut short
        for name, (description, yours) in listing.choices(group, config_dir).items():
            table.add_row(name + (" *" if yours else ""), escape(description))
        console.print(table)
        console.print()
    if config_dir:
        console.print(f"* from your config folder {config_dir}")


@app.command("check")
def check_entry(overrides: Overrides = None, config_dir: ConfigDir = None, plugin: Plugins = None) -> None:
    """Run the conformance battery on a norm (norm=NAME: every kind of features and every model) or a model
    (model=NAME, with bn, ln, in and none); exit 1 if a check fails. Batch dependence is measured, not declared."""
    from normbench import conformance

    load_plugins(plugin)
    with user_errors():
        rows = conformance.check(overrides or [], config_dir)
    console.print(conformance.table(rows))
    for line in conformance.notes(rows):
        console.print(f"  {escape(line)}", soft_wrap=True)
    if any(r.failed for r in rows):
        raise typer.Exit(1)
