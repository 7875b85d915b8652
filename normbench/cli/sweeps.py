"""Commands over many runs: sweep (plan, train, report) and report (rebuild from the run folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from normbench.cli.common import (ConfigDir, Overrides, Plugins, all_invalid, app, command_line, load_plugins,
                                  print_failures, user_errors)
from normbench.display import console, duration, note
from normbench.errors import UserError


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
    _print_duplicates(planned)
    _print_threads_note(planned)


def _print_threads_note(planned) -> None:
    from normbench.threads import over_cores_note

    note(over_cores_note(p.cfg.threads for p in planned if p.cfg is not None))


def _print_duplicates(planned) -> None:
    from normbench.sweep.planning import duplicate_notes

    for text in duplicate_notes(planned):
        note(text)


def _counts(planned, retry_failed: bool) -> str:
    from normbench.sweep import to_train
    from normbench.sweep.planning import RETRIED

    todo = to_train(planned, retry_failed)
    training = {id(t) for t in todo}
    states = [p.state for p in planned if id(p) not in training]  # each job counted once
    diverged = states.count("diverged")
    done, repeats = states.count("completed") + diverged, states.count("duplicate")
    runs = f"{len(planned)} run{'' if len(planned) == 1 else 's'}"
    retried = sum(p.state in RETRIED for p in todo) if retry_failed else 0
    return (f"{runs}: {len(todo)} to train" + (f" ({retried} failed or diverged, again)" if retried else "")
            + f", {done} already done" + (f" ({diverged} diverged)" if diverged else "")
            + f", {states.count('failed')} failed, {states.count('invalid')} invalid"
            + (f", {repeats} the same run as an earlier job" if repeats else ""))


def _what_happened(outcome) -> str:
    """'trained 4', and what else became of the runs planned to train: failed, or finished by another process."""
    return (f"trained {outcome.trained - outcome.failed_now}"
            + (f", {outcome.failed_now} failed" if outcome.failed_now else "")
            + (f", {outcome.finished_elsewhere} finished by another process meanwhile"
               if outcome.finished_elsewhere else ""))


@app.command()
def sweep(
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
    plugin: Plugins = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs at once on this machine, each in its own process with its share of the CPU threads.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and what is done; train nothing.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Train failed and diverged runs again.")] = False,
) -> None:
    """Run a sweep (Hydra syntax: norm=bn,ln,gn batch_size=2,4,8 'seed=range(3)', quoted for the shell), then build its report.

    Finished runs are skipped, so running the same command again resumes an interrupted sweep.
    """
    from normbench import sweep as sweeps
    from normbench.display import planning_count

    load_plugins(plugin)
    with user_errors():
        jobs, capped = sweeps.capped_jobs(jobs)
        note(capped)
        if dry_run:
            launcher = sweeps.configured_launcher(overrides or [], config_dir)
            sweeps.check_jobs(jobs, launcher)
            if jobs > 1:
                sweeps.worker_start_seconds()
            with planning_count() as planned_one:
                planned = sweeps.plan(overrides or [], config_dir, planned_one, dry_run=True)
            _print_plan(planned)
            console.print(_counts(planned, retry_failed))
            todo = sweeps.to_train(planned, retry_failed)
            if todo:
                console.print(f"estimated training time: about {duration(sweeps.estimated_seconds(todo))} sequentially "
                              f"on a 2-core CPU like ours ({sweeps.planning.ESTIMATE_NOTE})")
            note(sweeps.jobs_note(planned, jobs, retry_failed))
            try:
                sweeps.check_launcher(launcher)
            except UserError as e:  # planning here and submitting from elsewhere is fine: a note
                note(f"{e} (the sweep itself stops here)")
            raise typer.Exit(1 if any(p.state == "invalid" for p in planned) else 0)
        from normbench import report
        from normbench.progress import SweepDisplay

        with SweepDisplay() as display:
            outcome = sweeps.run(overrides or [], config_dir, jobs=jobs, retry_failed=retry_failed, display=display)
        if (nothing := all_invalid(outcome.planned)) is not None:
            raise nothing
        command = command_line("sweep", overrides or [], plugin, config_dir, jobs, retry_failed)
        try:
            reports = report.after_sweep(outcome, command)
        except UserError:
            if not outcome.failures:
                raise
            reports = []  # nothing finished: the failures below say why
        for rep, path in reports:
            _print_report(rep, path)
    _print_duplicates(outcome.planned)
    console.print(_counts(outcome.planned, retry_failed).replace("to train", "planned to train")
                  + f"; {_what_happened(outcome)} in {outcome.seconds:.0f} s")
    if outcome.failures:
        print_failures(outcome.failures)
        raise typer.Exit(1)


def _print_report(rep, path: Path) -> None:
    """The pivot and the verdict, as report.md has them, and where report.md is."""
    from normbench import report

    for warning in rep.warnings:  # folders left out (damaged, unreadable), runs that do not mix
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    console.print(report.rich_pivot(rep))
    for panel, sentences in rep.verdict.items():
        console.print(f"[bold]{escape(panel)}[/bold]")
        for sentence in sentences:
            console.print(f"  {escape(sentence)}", soft_wrap=True)
    console.print(f"report: {path}")


@app.command("report")
def make_report(
    folder: Annotated[Path, typer.Argument(help="An experiment folder (results/NAME), or a results folder.")],
    plugin: Plugins = None,
) -> None:
    """Rebuild tables, figures and report.md from the run folders alone."""
    from normbench import report

    load_plugins(plugin)  # plugin norms are then labelled by what differs from their defaults, as in run ids

    with user_errors():
        if not folder.is_dir():
            raise UserError(f"no folder at {folder}" if not folder.exists() else f"{folder} is not a folder")
        experiments = [folder] if _has_runs(folder) else sorted(p for p in folder.glob("*") if _has_runs(p))
        if not experiments and (folder / "summary.json").exists():
            raise UserError(f"{folder} is one run's folder; report reads the experiment folder that holds the runs: "
                            f"normbench report {folder.parent}")
        if not experiments:
            raise UserError(f"no run folders under {folder}")
        if len(experiments) == 1:
            rep = report.build(experiments[0])
            _print_report(rep, report.write(rep))
            return
        refused = []  # of a results folder, each experiment that can be reported is, whatever the others hold
        for experiment in experiments:
            try:
                rep = report.build(experiment)
                _print_report(rep, report.write(rep))
            except UserError as e:
                refused.append(e)
                console.print(f"[yellow]warning:[/yellow] no report for {escape(str(experiment))}: {escape(str(e))}",
                              soft_wrap=True)
        if len(refused) == len(experiments):
            raise UserError(f"no experiment under {folder} could be reported ({len(refused)}); the first: {refused[0]}")


def _has_runs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and (p / "config.yaml").exists() for p in folder.iterdir())
