"""The normbench command line: thin Typer commands over the library."""

from __future__ import annotations

import codecs
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from normbench import __version__
from normbench.display import console, duration
from normbench.errors import UserError

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
    """Load the installed plugins and those named by --plugin (the command's first step); an error is one line."""
    from normbench.plugins import load

    with user_errors():
        load(plugins or [])


@contextmanager
def user_errors():
    """A user error is one red line and exit code 2; NORMBENCH_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except UserError as e:
        if os.environ.get("NORMBENCH_DEBUG") == "1":
            raise
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
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
def run(overrides: Overrides = None, config_dir: ConfigDir = None, plugin: Plugins = None,
        force: Annotated[bool, typer.Option("--force", help="Train again a run that already finished; the new "
                                            "result replaces the old one only once it completes.")] = False) -> None:
    """Train one model with one norm, evaluate it, and write its run folder.

    A run that already finished is shown, not trained again (unless --force).
    """
    from normbench.config import compose
    from normbench.display import summary_table
    from normbench.progress import EpochProgress
    from normbench.runner import execute

    load_plugins(plugin)
    with user_errors():
        cfg = compose(overrides or [], config_dir)
        with EpochProgress(cfg.epochs, cfg.batch_size) as progress:
            result = execute(cfg, progress, replace=force)
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

    load_plugins(plugin)
    with user_errors():
        cfg = compose(overrides or [], config_dir)
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


PLAN_TABLE_ROWS = 500  # a longer plan is printed as plain lines: a table that long is slow and no easier to read


def _print_plan(planned) -> None:
    from normbench.config import run_id

    shared = set.intersection(*(set(p.overrides) for p in planned)) if planned else set()
    causes: dict[str, int] = {}  # each distinct reason a job is invalid, numbered once: not 100 copies
    for p in planned:
        if p.state == "invalid":
            causes.setdefault(str(p.error), len(causes) + 1)
    rows = [(str(i), " ".join(o for o in p.overrides if o not in shared) or p.label,
             (p.run_id or run_id(p.cfg)) if p.cfg else "-", p.state,
             causes[str(p.error)] if p.state == "invalid" else None)
            for i, p in enumerate(planned)]
    if len(rows) > PLAN_TABLE_ROWS:
        typer.echo("\n".join(f"{i:>6}  {state:<9}  {rid:<40}  {varying}" + (f"  (why: {cause})" if cause else "")
                             for i, varying, rid, state, cause in rows))
    else:
        table = Table(title="runs", header_style="bold")
        for col in ("#", "overrides", "run id", "state"):
            table.add_column(col)
        for i, varying, rid, state, cause in rows:
            table.add_row(i, escape(varying), rid, f"[red]invalid ({cause})[/red]" if cause else state)
        console.print(table)
    for why, cause in causes.items():
        count = sum(1 for row in rows if row[4] == cause)
        console.print(f"[red]({cause})[/red] {count} {'run' if count == 1 else 'runs'}: {escape(why)}", soft_wrap=True)


def _counts(planned, retry_failed: bool) -> str:
    from normbench.sweep import to_train

    states = [p.state for p in planned]
    todo = len(to_train(planned, retry_failed))
    return (f"{len(planned)} runs: {todo} to train, {states.count('completed') + states.count('diverged')} already "
            f"done, {states.count('failed')} failed, {states.count('invalid')} invalid")


@app.command()
def sweep(
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
    plugin: Plugins = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Runs at once on this machine, each in its own process with its share of the CPU threads.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and what is done; train nothing.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Train failed and diverged runs again.")] = False,
) -> None:
    """Run a sweep (Hydra syntax: norm=bn,ln,gn batch_size=2,4,8 seed=range(3)), then build its report.

    Finished runs are skipped, so running the same command again resumes an interrupted sweep.
    """
    from normbench import sweep as sweeps
    from normbench.display import planning_count

    load_plugins(plugin)
    with user_errors():
        jobs, note = sweeps.capped_jobs(jobs)
        if note:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        if dry_run:
            with planning_count() as planned_one:
                planned = sweeps.plan(overrides or [], config_dir, planned_one, dry_run=True)
            _print_plan(planned)
            console.print(_counts(planned, retry_failed))
            todo = sweeps.to_train(planned, retry_failed)
            if todo:
                console.print(f"estimated training time: about {duration(sweeps.estimated_seconds(todo))} sequentially "
                              "on a 2-core CPU like ours (the planner's cost estimate; measured within 2× per run)")
            raise typer.Exit(1 if any(p.state == "invalid" for p in planned) else 0)
        from normbench import report
        from normbench.progress import SweepDisplay

        with SweepDisplay() as display:
            outcome = sweeps.run(overrides or [], config_dir, jobs=jobs, retry_failed=retry_failed, display=display)
        command = "normbench sweep " + "".join(f"--plugin {p} " for p in plugin or []) + " ".join(overrides or []) \
            + (f" --jobs {jobs}" if jobs > 1 else "")
        try:
            reports = report.after_sweep(outcome, command)
        except UserError:
            if not outcome.failures:
                raise
            reports = []  # nothing finished: the failures below say why
        for rep, path in reports:
            _print_report(rep, path)
    console.print(_counts(outcome.planned, retry_failed).replace("to train", "planned to train")
                  + f"; trained {outcome.trained} in {outcome.seconds:.0f} s")
    if outcome.failures:
        _print_failures(outcome.failures)
        raise typer.Exit(1)


def _print_report(rep, path: Path) -> None:
    """The pivot and the verdict, as report.md has them, and where report.md is."""
    from normbench import report

    console.print(report.rich_pivot(rep))
    for panel, sentences in rep.verdict.items():
        console.print(f"[bold]{escape(panel)}[/bold]")
        for sentence in sentences:
            console.print(f"  {escape(sentence)}", soft_wrap=True)
    console.print(f"report: {path}")


def _print_failures(failures: list[tuple[str, str]]) -> None:
    """Each cause once: a hundred runs that fail for one reason (missing data, say) are one line."""
    by_cause: dict[str, list[str]] = {}
    for what, why in failures:
        by_cause.setdefault(str(why), []).append(what)
    console.print(f"[red]without a result (failed or invalid): {len(failures)}[/red]")
    for why, whats in by_cause.items():
        who = whats[0] if len(whats) == 1 else f"{len(whats)} runs ({whats[0]}, ...)"
        console.print(f"  {escape(who)}: {escape(why)}", soft_wrap=True)


@app.command("report")
def make_report(
    folder: Annotated[Path, typer.Argument(help="An experiment folder (results/NAME), or a results folder.")],
    plugin: Plugins = None,
) -> None:
    """Rebuild tables, figures and report.md from the run folders alone."""
    from normbench import report

    load_plugins(plugin)  # plugin norms are then labelled by what differs from their defaults, as in run ids

    with user_errors():
        experiments = [folder] if _has_runs(folder) else sorted(p for p in folder.glob("*") if _has_runs(p))
        if not experiments:
            raise UserError(f"no run folders under {folder}")
        for experiment in experiments:
            rep = report.build(experiment)
            for warning in rep.warnings:
                console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
            _print_report(rep, report.write(rep))


def _has_runs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and (p / "config.yaml").exists() for p in folder.iterdir())


@app.command()
def claims(
    args: Annotated[Optional[list[str]], typer.Argument(
        help="Claims to test (all by default; --list names them), then Hydra overrides such as data.root=PATH.",
        show_default=False, metavar="[NAMES]... [OVERRIDES]...")] = None,
    scale: Annotated[str, typer.Option("--scale", help="small: the MNIST stand-in on a CPU in minutes; paper: "
                                       "CIFAR / full MNIST at paper-like scale, for a GPU.")] = "small",
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Runs at once on this machine, as for sweep.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan every claim's runs; train nothing.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the claims and exit.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Train failed and diverged runs again.")] = False,
    config_dir: ConfigDir = None,
    plugin: Plugins = None,
) -> None:
    """Test common claims about normalization, each with a small experiment and a verdict computed from the data.

    Writes claims.md, claims.csv and a figure per claim into results/claims (or results/claims_paper). Finished runs
    are reused, so running it again resumes and only re-judges.
    """
    from normbench.claims import CLAIMS, select

    args = args or []
    names = [a for a in args if "=" not in a and not a.startswith(("+", "~"))]
    overrides = [a for a in args if a not in names]
    if list_:
        table = Table(header_style="bold")
        for col in ("claim", "statement", "source"):
            table.add_column(col, overflow="fold")
        for claim in CLAIMS:
            table.add_row(claim.id, escape(claim.statement), escape(claim.source))
        console.print(table)
        return
    load_plugins(plugin)
    from normbench import sweep as sweeps
    from normbench.claims import suite, writing
    from normbench.display import planning_count

    with user_errors():
        chosen = select(names)
        jobs, note = sweeps.capped_jobs(jobs)
        if note:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
        if dry_run:
            with planning_count() as planned_one:
                outcome = suite.plan(chosen, scale, overrides, config_dir, dry_run=True, shown=planned_one)
            _print_claims_plan(outcome, retry_failed)
            raise typer.Exit(1 if any(p.state == "invalid" for p in outcome.unique) else 0)
        from normbench.progress import SweepDisplay

        with SweepDisplay() as display:
            outcome = suite.run(chosen, scale, overrides, config_dir, jobs, retry_failed, display)
        judgements = suite.judge_all(chosen, outcome)
        command = " ".join(["normbench claims", *names, *overrides, *(["--scale", scale] if scale != "small" else []),
                            *([f"--jobs {jobs}"] if jobs > 1 else [])])
        path = writing.write(outcome.folder, judgements, scale, command, outcome.seconds)
    _print_claims(judgements)
    console.print(f"claims: {path}")
    if outcome.sweep is not None and outcome.sweep.failures:
        _print_failures(outcome.sweep.failures)
        raise typer.Exit(1)


def _print_claims_plan(outcome, retry_failed: bool) -> None:
    from normbench.sweep import estimated_seconds, to_train

    table = Table(title="claims", header_style="bold")
    for col in ("claim", "runs", "to train", "invalid"):
        table.add_column(col, justify="right" if col != "claim" else "left")
    for cid, planned in outcome.plans.items():
        invalid = sum(p.state == "invalid" for p in planned)
        table.add_row(cid, str(len(planned)), str(len(to_train(planned, retry_failed))),
                      f"[red]{invalid}[/red]" if invalid else "0")
    console.print(table)
    unique = outcome.unique
    todo = to_train(unique, retry_failed)
    console.print(f"{len(unique)} distinct runs (claims share some): {len(todo)} to train")
    for cid, planned in outcome.plans.items():
        for p in planned:
            if p.state == "invalid":
                console.print(f"[red]{cid}:[/red] {escape(p.label)}: {escape(str(p.error))}", soft_wrap=True)
                break
    if todo:
        console.print(f"estimated training time: about {duration(estimated_seconds(todo))} sequentially on a 2-core "
                      "CPU like ours (the planner's cost estimate; measured within 2× per run)")


def _print_claims(judgements) -> None:
    from normbench.claims.writing import effect_text

    colors = {"supported": "green", "contradicted": "red", "not detected": "white", "inconclusive": "yellow"}
    table = Table(title="claims", header_style="bold")
    for col in ("claim", "verdict", "measured", "effect (95%)"):
        table.add_column(col, overflow="fold")
    for j in judgements:
        effect, ci = effect_text(j.headline)
        table.add_row(j.claim.id, f"[{colors[j.verdict]}]{j.verdict}[/]",
                      escape(j.headline.says if j.headline is not None else j.why),
                      "" if effect == "-" else effect if ci == "-" else f"{effect} {ci}")
    console.print(table)


_ASCII = {"±": "+/-", "×": "x", "…": "...", "—": "-", "–": "-", "→": "->", "≥": ">=", "≤": "<=", "√": "sqrt",
          "σ": "sigma", "μ": "mu", "β": "beta", "γ": "gamma", "η": "eta", "·": "*", "²": "^2"}


def _transliterate(error: UnicodeEncodeError) -> tuple[str, int]:
    text = error.object[error.start:error.end]
    return "".join(_ASCII.get(c, "?") for c in text), error.end


def main() -> None:
    # A terminal or pipe that cannot encode "±" (PYTHONIOENCODING=ascii, a C locale) gets "+/-", not a crash
    # after the results are written.
    codecs.register_error("normbench", _transliterate)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="normbench")
    app()
