"""The claims command: every claim's runs planned, trained as one sweep, judged, and written."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from normbench.cli.common import ConfigDir, Plugins, app, command_line, load_plugins, print_failures, user_errors
from normbench.display import console, duration


@app.command()
def claims(
    args: Annotated[Optional[list[str]], typer.Argument(
        help="Claims to test (all by default; --list names them), then Hydra overrides such as data.root=PATH.",
        show_default=False, metavar="[NAMES]... [OVERRIDES]...")] = None,
    scale: Annotated[str, typer.Option("--scale", help="small: the MNIST stand-in on a CPU in minutes; paper: "
                                       "CIFAR / full MNIST at paper-like scale, for a GPU.")] = "small",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs at once on this machine, as for sweep.")] = 1,
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
    from normbench.display import note, planning_count

    with user_errors():
        suite.check_scale(scale)  # before any claim, whose name would prefix the error
        chosen = select(names)
        jobs, capped = sweeps.capped_jobs(jobs)
        note(capped)
        if dry_run:
            if jobs > 1:  # (the launcher matters only then)
                sweeps.check_jobs(jobs, suite.launcher_of(chosen, scale, overrides, config_dir))
            sweeps.worker_start_seconds()  # training reads it with or without --jobs
            with planning_count() as planned_one:
                outcome = suite.plan(chosen, scale, overrides, config_dir, dry_run=True, shown=planned_one)
            _print_claims_plan(outcome, retry_failed)
            note(sweeps.paying_jobs(outcome.unique, jobs, retry_failed)[1])  # what training would do with --jobs
            bad = any(p.state == "invalid" for p in outcome.unique) or outcome.uncovered
            raise typer.Exit(1 if bad else 0)
        from normbench.progress import SweepDisplay

        with SweepDisplay() as display:
            outcome = suite.run(chosen, scale, overrides, config_dir, jobs, retry_failed, display)
        judgements = suite.judge_all(chosen, outcome)
        for warning in outcome.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
        command = command_line("claims", [*names, *overrides, *(["--scale", scale] if scale != "small" else [])],
                               plugin, config_dir, jobs, retry_failed)
        done = (f"this invocation trained {outcome.trained} runs ({outcome.already_done} already finished) in "
                f"{outcome.seconds:.0f} s wall")
        path = writing.write(outcome.folder, judgements, scale, command, done)
    _print_claims(judgements)
    console.print(f"claims: {path}")
    if outcome.failures:
        print_failures(outcome.failures)
        raise typer.Exit(1)


def _print_claims_plan(outcome, retry_failed: bool) -> None:
    from normbench.sweep import estimated_seconds, to_train
    from normbench.sweep.planning import ESTIMATE_NOTE

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
    for cid, missing in outcome.uncovered.items():
        console.print(f"[red]{cid}:[/red] no planned runs can make the comparison "
                      f"{', '.join(repr(m) for m in missing)} (an override replaced a setting it compares)",
                      soft_wrap=True)
    if todo:
        console.print(f"estimated training time: about {duration(estimated_seconds(todo))} sequentially on a 2-core "
                      f"CPU like ours ({ESTIMATE_NOTE})")


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
