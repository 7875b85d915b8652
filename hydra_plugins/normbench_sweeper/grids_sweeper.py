"""A Hydra sweeper that runs the union of several grids.

Hydra's basic sweeper expands one Cartesian product. A comparison often wants
several: every norm on the MLP, plus a smaller slice on the CNN; BN with per-step
and shared statistics, but the other norms once. ``grids`` is a list of grids; each
is expanded like the basic sweeper's ``params`` (which apply to every grid), a grid's
values win over ``params``, command-line values win over both, and a job that
two grids both produce runs once. Without ``grids`` it is the basic sweeper.

Unlike the basic sweeper it does not compose every job once more before launching
it (``validate_batch_is_legal``): the launcher composes each job anyway, and normbench's
planning pass has composed and validated every job before any training starts.

    hydra:
      sweeper:
        params: {seed: "0,1,2"}
        grids:
          - {model: mlp, norm: "bn,ln,gn,none", batch_size: "2,4,8,16,32,64,128"}
          - {model: cnn, norm: "bn,gn", batch_size: "2,8,32,128"}
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.normbench_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    grids: Optional[List[Dict[str, str]]] = None


# Hydra loads plugin modules without registering them in sys.modules: annotations must stay evaluable.
ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="normbench")


def expand_jobs(config_loader, params: Optional[dict], grids: Optional[list], arguments: list[str]) -> list[list[str]]:
    """Every job's overrides: the union of the grids, in order, without repeats."""
    parser = OverridesParser.create(config_loader=config_loader)
    jobs, seen = [], set()
    for grid in grids or [{}]:
        values = {**(params or {}), **grid}
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in values.items()] + list(arguments))
        for job in BasicSweeper.split_arguments(overrides, None)[0]:
            key = tuple(sorted(job))
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    return jobs


class GridsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict[str, str]] = None,
                 grids: Optional[list[dict[str, str]]] = None) -> None:
        if max_batch_size is not None and max_batch_size < 1 and max_batch_size != -1:
            raise ValueError(f"hydra.sweeper.max_batch_size must be >= 1, or -1 or null (all), got {max_batch_size}")
        super().__init__(max_batch_size, params)
        self.grids = [dict(g) for g in grids] if grids else [{}]

    def expand(self, arguments: list[str]) -> list[list[str]]:
        return expand_jobs(self.hydra_context.config_loader, self.params, self.grids, arguments)

    def sweep(self, arguments: list[str]) -> Any:
        jobs = self.expand(arguments)
        n = (len(jobs) or 1) if self.max_batch_size in (None, -1) else self.max_batch_size
        self.overrides = [jobs[i: i + n] for i in range(0, len(jobs), n)]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # a job that raised stops the sweep, as in the basic sweeper
            first += len(batch)
            returns.append(results)
        return returns
