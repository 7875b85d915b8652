"""Probes: measurements taken during training that explain *why* a norm helps or fails, never changing the run.

=============== ==================================================== =============================================
probe           what it measures, per step it runs at                definition
=============== ==================================================== =============================================
``batch_stats`` relative error of a batch's mean and std against the Ioffe & Szegedy 2015 §3; Wu & Johnson 2021
                population's, per norm layer and batch size B
``landscape``   loss range, gradient predictiveness and effective    Santurkar et al. 2018 §3.1, Figure 4
                beta-smoothness along the gradient
``ics``         ||G - G'|| and cos(G, G') per layer                  Santurkar et al. 2018 §2.2, Definition 2.1
``residual``    Var(F(x)) / Var(skip(x)) per block (resnet20)        De & Smith 2020 §2
``scales``      gradient norm and activation std per layer           Ioffe & Szegedy 2015 §3.3
=============== ==================================================== =============================================

Each probe is switched on by ``probes.<name>.every=STEPS`` and runs at the start of every step that is a
multiple of it (step 0 is the initial weights), on that step's batch. The training loop makes one call per
step, `Probes.at_step`; with every probe off there is no `Probes` at all (`build` returns None), so no hook
is installed and no step does extra work. A probe puts back everything it touched (`base.RunState`): the
metrics of a run are bit for bit those of the same run without probes (on the CPU).

A probe module has `applies(cfg)` (None, or why it does not apply), `KEYS` (its CSV's key columns between
``layer, depth`` and ``value``), and a class built from (options, cfg, model, data) whose `measure(view)`
returns rows. `Probes` keeps the rows and each probe's time; `write` puts one tidy CSV per probe,
``probe_<name>.csv``, in the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from normbench.errors import UserError
from normbench.probes import batch_stats, ics, landscape, residual, scales
from normbench.probes.base import RunState, StepView

MODULES = {"batch_stats": batch_stats, "landscape": landscape, "ics": ics, "residual": residual, "scales": scales}
PROBES = {"batch_stats": batch_stats.BatchStats, "landscape": landscape.Landscape, "ics": ics.ICS,
          "residual": residual.Residual, "scales": scales.Scales}
COMMON = ("step", "layer", "depth")


def columns(name: str) -> list[str]:
    """The columns of probe `name`'s CSV: step, layer, depth, its keys, value."""
    return [*COMMON, *MODULES[name].KEYS, "value"]


def enabled(cfg) -> list[str]:
    """The probes this config switches on."""
    return [name for name in PROBES if getattr(cfg.probes, name).every]


def validate_probes(cfg) -> None:
    """Each probe setting's meaning, and each probe switched on applies to the model: one clear line each."""
    for name in PROBES:
        options = getattr(cfg.probes, name)
        if options.every is not None and options.every < 0:
            raise UserError(f"probes.{name}.every must be >= 0 or null (0 and null: off), got {options.every}")
    bs = cfg.probes.batch_stats
    if bs.samples < 2:
        raise UserError(f"probes.batch_stats.samples must be >= 2, got {bs.samples}")
    if not bs.sizes or any(b < 1 or b > bs.samples for b in bs.sizes) or len(set(bs.sizes)) != len(bs.sizes):
        raise UserError(f"probes.batch_stats.sizes must be a non-empty list of distinct batch sizes in "
                        f"[1, probes.batch_stats.samples={bs.samples}], got {list(bs.sizes)}")
    if not bs.quantiles or any(not 0 <= q <= 1 for q in bs.quantiles):
        raise UserError(f"probes.batch_stats.quantiles must be a non-empty list of values in [0, 1], "
                        f"got {list(bs.quantiles)}")
    ms = cfg.probes.landscape.lr_multiples
    if not ms or any(not m > 0 for m in ms) or len(set(ms)) != len(ms):
        raise UserError(f"probes.landscape.lr_multiples must be a non-empty list of distinct step sizes > 0 "
                        f"(multiples of the step's lr), got {list(ms)}")
    for name in enabled(cfg):
        why = MODULES[name].applies(cfg)
        if why:
            raise UserError(why)


class Probes:
    """The probes a run switched on, their rows so far, and the seconds each has taken."""

    def __init__(self, cfg, model, data):
        self.every = {name: getattr(cfg.probes, name).every for name in enabled(cfg)}
        self.probes = {name: PROBES[name](getattr(cfg.probes, name), cfg, model, data) for name in self.every}
        self.rows: dict[str, list[dict]] = {name: [] for name in self.every}
        self.seconds: dict[str, float] = {name: 0.0 for name in self.every}

    def at_step(self, step: int, model, x, y, optimizer, precision) -> None:
        """Run every probe due at `step` on the step's batch, then put the run back exactly as it was."""
        due = [name for name, every in self.every.items() if step % every == 0]
        if not due:
            return
        state = RunState(model, optimizer)
        view = StepView(model, x, y, optimizer, precision, step, state)
        try:
            for name in due:
                t0 = time.perf_counter()
                try:
                    rows = self.probes[name].measure(view)
                finally:
                    state.restore()
                self.rows[name] += [{"step": step, **r} for r in rows]
                self.seconds[name] += time.perf_counter() - t0
        finally:
            state.restore()

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run continues its probe tables."""
        return {"rows": self.rows, "seconds": self.seconds}

    def load(self, state: dict | None) -> None:
        if state:
            self.rows = {name: list(state["rows"].get(name, [])) for name in self.every}
            self.seconds = {name: float(state["seconds"].get(name, 0.0)) for name in self.every}


def build(cfg, model, data) -> Probes | None:
    """The run's probes, or None when every probe is off: then the loop does nothing extra."""
    if not enabled(cfg):
        return None
    validate_probes(cfg)
    return Probes(cfg, model, data)


def tables(rows: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    """Each probe's rows as its long-format table, in `columns` order."""
    return {name: pd.DataFrame(r, columns=columns(name)) for name, r in rows.items()}


def write(folder: Path, rows: dict[str, list[dict]]) -> list[Path]:
    """One ``probe_<name>.csv`` per probe that ran, written atomically; returns the paths."""
    from normbench import results

    paths = []
    for name, frame in tables(rows).items():
        path = folder / f"probe_{name}.csv"
        results.write_table(path, frame)
        paths.append(path)
    return paths


__all__ = ["COMMON", "MODULES", "PROBES", "Probes", "RunState", "StepView", "build", "columns", "enabled",
           "tables", "validate_probes", "write"]
