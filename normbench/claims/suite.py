"""Running the claims suite: plan every claim's preset, train what is not finished through the sweep machinery,
judge each claim from its own runs, and write ``claims.md`` and ``claims.csv``.

Each claim's runs are the jobs its preset (``experiment=claims/<id>``, plus the paper-scale overrides with
``--scale paper``, plus the user's overrides) plans. They all go to one experiment folder (``claims``, or
``claims_paper``), so a run two claims need is trained once, and a second ``normbench claims`` resumes
where the first stopped. On this machine the union of the plans is trained as one sweep (``--jobs`` as
``normbench sweep``'s); with another Hydra launcher each claim's sweep is handed to it in turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from normbench import analysis, results
from normbench.claims.catalog import Claim
from normbench.claims.judge import Judgement, judge
from normbench.errors import UserError

SCALES = ("small", "paper")


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")


def claim_overrides(claim: Claim, scale: str, overrides: list[str]) -> list[str]:
    """The sweep overrides of one claim: its preset, the paper-scale changes, then the user's."""
    check_scale(scale)
    paper = [*claim.paper, "name=claims_paper"] if scale == "paper" else []
    return [f"experiment={claim.preset}", *paper, *overrides]


@dataclass
class SuiteOutcome:
    plans: dict[str, list]  # claim id -> its Planned jobs
    uncovered: dict[str, list[str]] = field(default_factory=dict)  # claim id -> comparisons no planned runs make
    warnings: list[str] = field(default_factory=list)  # run folders and probe files left out while judging
    sweeps: list = field(default_factory=list)  # the SweepOutcome(s) of the training: one, or one per claim
    seconds: float = 0.0
    judgements: list[Judgement] = field(default_factory=list)
    folder: Path | None = None

    @property
    def trained(self) -> int:
        return sum(s.trained for s in self.sweeps)

    @property
    def already_done(self) -> int:
        return sum(s.already_done for s in self.sweeps)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [f for s in self.sweeps for f in s.failures]

    @property
    def unique(self) -> list:
        """The planned jobs of every claim, each run once (claims share runs)."""
        seen, out = set(), []
        for planned in self.plans.values():
            for p in planned:
                key = p.run_id or p.label
                if key not in seen:
                    seen.add(key)
                    out.append(p)
        return out


def plan(claims: list[Claim], scale: str, overrides: list[str], config_dir=None, dry_run: bool = False,
         shown=None) -> SuiteOutcome:
    """Every claim's jobs, planned as `normbench sweep` plans them, and the comparisons no planned runs can make
    (`judge.uncovered`: an override replaced a setting the claim compares). Writes nothing with dry_run."""
    from normbench import sweep as sweeps
    from normbench.claims import judge as judge_module
    from normbench.config import run_id, to_dict

    plans, uncovered = {}, {}
    for claim in claims:
        try:
            planned = sweeps.plan(claim_overrides(claim, scale, overrides), config_dir, shown, dry_run=dry_run)
        except UserError as e:
            raise UserError(f"claim {claim.id}: {e}") from e
        for p in planned:
            if p.cfg is not None and p.run_id is None:
                p.run_id = run_id(p.cfg)
        plans[claim.id] = planned
        valid = [p for p in planned if p.cfg is not None and p.state != "invalid"]
        if len(valid) == len(planned):  # (invalid jobs are reported as such)
            missing = judge_module.uncovered(claim, [{"run_id": p.run_id, "config": to_dict(p.cfg)} for p in valid])
            if missing:
                uncovered[claim.id] = missing
    return SuiteOutcome(plans, uncovered=uncovered)


def launcher_of(claims: list[Claim], scale: str, overrides: list[str], config_dir=None) -> str:
    """The Hydra launcher the claims' sweeps go through (the overrides choose it, so it is the same for all)."""
    from normbench import sweep as sweeps

    try:
        return sweeps.configured_launcher(claim_overrides(claims[0], scale, overrides), config_dir)
    except UserError as e:
        raise UserError(f"claim {claims[0].id}: {e}") from e


def run(claims: list[Claim], scale: str, overrides: list[str], config_dir=None, jobs: int = 1,
        retry_failed: bool = False, display=None) -> SuiteOutcome:
    """Plan every claim, stop before training if any job is invalid, train, then judge and write."""
    from normbench import sweep as sweeps

    t0 = time.perf_counter()
    shown = display.planned if display is not None else None
    launcher = launcher_of(claims, scale, overrides, config_dir)
    sweeps.check_jobs(jobs, launcher)
    outcome = plan(claims, scale, overrides, config_dir, shown=shown)
    invalid = [(cid, p) for cid, planned in outcome.plans.items() for p in planned if p.state == "invalid"]
    if invalid:
        cid, p = invalid[0]
        raise UserError(f"claim {cid}: {len(invalid)} invalid {'job' if len(invalid) == 1 else 'jobs'}, "
                        f"the first: {p.error} (normbench claims {cid} --dry-run lists them)")
    if outcome.uncovered:
        cid, missing = next(iter(outcome.uncovered.items()))
        raise UserError(f"claim {cid}: with these overrides no planned runs can make the comparison "
                        f"'{missing[0]}' (an override replaced a setting the claim compares; drop it, or "
                        "leave this claim out)")
    if launcher == "basic":
        outcome.sweeps = [sweeps.train_planned(outcome.unique, jobs, retry_failed, display)]
    else:
        outcome.sweeps = [sweeps.run(claim_overrides(claim, scale, overrides), config_dir, retry_failed=retry_failed,
                                     display=display) for claim in claims]
    outcome.seconds = time.perf_counter() - t0
    return outcome


def judge_all(claims: list[Claim], outcome: SuiteOutcome) -> list[Judgement]:
    """Each claim judged on the finished runs its preset planned (read back from their folders)."""
    planned = [p for p in outcome.unique if p.cfg is not None]
    if not planned:
        raise UserError("no valid runs planned")
    folder = results.experiment_dir(planned[0].cfg)
    summaries, _, skipped = results.scan(folder) if folder.is_dir() else ([], {}, [])
    by_id = {s["run_id"]: s for s in summaries}
    planned_ids = {p.run_id for p in planned}
    outcome.warnings = [w for w in skipped if any(rid in w for rid in planned_ids)]  # others are not ours to judge
    probes, probe_warnings = probe_metrics([folder / rid for rid in by_id if rid in planned_ids])
    outcome.warnings += probe_warnings
    judgements = []
    for claim in claims:
        mine = [by_id[p.run_id] for p in outcome.plans[claim.id] if p.run_id in by_id]
        runs = analysis.runs_table(mine) if mine else pd.DataFrame()
        if not runs.empty and not probes.empty:
            runs = runs.merge(probes, on="run_id", how="left")
        judgements.append(judge(claim, runs))
    outcome.judgements, outcome.folder = judgements, folder
    return judgements


def probe_metrics(folders: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """One number per run and probe quantity a claim compares: ``ics_l2`` (‖G − G′‖ over layers after the first
    and steps), ``loss_range`` and ``beta_smoothness`` (over steps), ``residual_ratio`` (Var(branch)/Var(skip)
    at the first measured step, over blocks), ``bstats_slope`` (log-log slope of the batch mean's median error
    against B at the last measured step, over layers). Empty when no run carries probes. With the warnings
    for the probe files left out (damaged)."""
    if not any(any(f.glob("probe_*.csv")) for f in folders if f.is_dir()):
        return pd.DataFrame(), []
    from normbench.analysis import probes as ap
    from normbench.probes.section import read_tables

    tables, _, warnings = read_tables(folders)
    frames = []
    if "ics" in tables:
        frames.append(_wide(ap.per_run(tables["ics"], ["l2_diff"], min_depth=1), {"l2_diff": "ics_l2"}))
    if "landscape" in tables:
        frames.append(_wide(ap.per_run(tables["landscape"], ["loss_range", "beta_smoothness"]), {}))
    if "residual" in tables:
        frames.append(_wide(ap.per_run(tables["residual"], ["ratio"], steps="first"), {"ratio": "residual_ratio"}))
    if "batch_stats" in tables:
        frames.append(_slopes(tables["batch_stats"]))
    out = None
    for frame in frames:
        out = frame if out is None else out.merge(frame, on="run_id", how="outer")
    return (out if out is not None else pd.DataFrame()), warnings


def _wide(per_run: pd.DataFrame, names: dict) -> pd.DataFrame:
    wide = per_run.pivot_table(index="run_id", columns="quantity", values="value").reset_index()
    wide.columns.name = None
    return wide.rename(columns=names)


def _slopes(frame: pd.DataFrame) -> pd.DataFrame:
    from normbench.analysis.probes import loglog_slope

    f = frame[(frame.stat == "mean") & (frame["quantile"].astype(float).round(6) == 0.5)]
    f = f[f.step == f.groupby("run_id").step.transform("max")]
    per_layer = f.groupby(["run_id", "depth"])[["batch_size", "value"]].apply(
        lambda g: loglog_slope(g.batch_size, g.value)).rename("bstats_slope").reset_index()
    return per_layer.groupby("run_id", as_index=False).bstats_slope.mean()
