"""Everything a sweep asks of Hydra, and the only place normbench touches Hydra internals.

`hydra.compose()` has no multirun; the entry that ``@hydra.main`` uses does. The names imported
from ``hydra._internal`` below (and the basic sweeper that the grids sweeper plugin in
``hydra_plugins/normbench_sweeper`` extends) are the internals normbench relies on;
``tests/test_sweep.py`` checks their signatures, so a Hydra upgrade that moves them fails loudly
there rather than quietly here.

Hydra composes a job in two steps: the defaults list (which config-group options, e.g. ``norm=gn
experiment=quick``) is merged into a config (`compose_job`), then the other overrides (``seed=3``,
``norm.num_groups=8``, ``+a.b=1``, ``~key``) are applied to it (`apply_overrides`). `composing`
uses the two steps apart.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from normbench import results
from normbench.config import CONFIG_MODULE, clean_hydra_error, search_path_overrides
from normbench.config.rules import check_name
from normbench.errors import UserError

HYDRA_ERRORS = (HydraException, OmegaConfBaseException, yaml.YAMLError)


def _hydra() -> Hydra:
    """A fresh Hydra on the packaged configs (a user config dir comes in through the overrides)."""
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    return Hydra.create_main_hydra2(task_name="normbench", config_search_path=search_path)


def hydra_multirun(overrides: list[str], task_function, config_dir: str | Path | None = None) -> list:
    """Run `task_function` on every job of a Hydra sweep; return the jobs' return values in order."""
    try:
        batches = _hydra().multirun(config_name="config", task_function=task_function,
                                    overrides=list(overrides) + search_path_overrides(config_dir, overrides))
    except HYDRA_ERRORS as e:
        raise UserError(clean_hydra_error(e)) from e
    finally:
        GlobalHydra.instance().clear()
    return [job.return_value for batch in batches for job in batch]


def compose_primary(overrides: list[str], config_dir: str | Path | None = None):
    """The sweep's primary config (multirun mode) and the Hydra that composed it."""
    hydra = _hydra()
    try:
        return hydra, hydra.compose_config("config", list(overrides) + search_path_overrides(config_dir, overrides),
                                           run_mode=RunMode.MULTIRUN)
    except HYDRA_ERRORS as e:
        GlobalHydra.instance().clear()
        raise UserError(clean_hydra_error(e)) from e


def launcher_of(primary) -> str:
    """The Hydra launcher the sweep asks for (command line, preset or user config): 'basic' unless set."""
    return primary.hydra.runtime.choices.get("hydra/launcher") or "basic"


def configured_launcher(overrides: list[str], config_dir: str | Path | None = None) -> str:
    try:
        return launcher_of(compose_primary(overrides, config_dir)[1])
    finally:
        GlobalHydra.instance().clear()


def check_launcher(launcher: str) -> None:
    """A launcher whose scheduler is not on this machine fails here, in one line, not deep in the plugin."""
    import shutil

    if "slurm" in launcher and shutil.which("sbatch") is None:
        raise UserError(f"hydra/launcher={launcher} submits to SLURM, but this machine has no 'sbatch' "
                        "on its PATH: run the sweep from a SLURM login node, or without hydra/launcher")


def check_bookkeeping(primary) -> None:
    """Hydra's own folders (used by other launchers) stay inside results_dir, like every result."""
    try:
        root = Path(primary.results_dir).expanduser().resolve()
        check_name(str(primary.name))  # (a name like ../x would otherwise be reported as a hydra dir outside)
        results.inside(root, root / primary.name)  # the experiment folder next: a symlink there is the cause
        for key in ("sweep", "run"):
            where = primary.hydra[key].dir
            if where is not None:
                try:
                    results.inside(root, Path(where).expanduser())
                except UserError as e:
                    raise UserError(f"hydra.{key}.dir ({where}): Hydra's own folders must stay inside results_dir "
                                    f"too: {e}") from None
    except OmegaConfBaseException as e:
        raise UserError(clean_hydra_error(e)) from e


def expand_jobs(hydra, primary) -> list[list[str]]:
    """Every job's overrides, as the grids sweeper expands them (Hydra's basic sweeper is the same without grids)."""
    from hydra_plugins.normbench_sweeper.grids_sweeper import expand_jobs as expand_grids

    sweeper = primary.hydra.sweeper
    target = str(sweeper.get("_target_", ""))
    if not target.endswith((".GridsSweeper", ".BasicSweeper")):
        raise UserError(f"normbench plans sweeps with its grids sweeper (or Hydra's basic one), not {target}")
    batch = sweeper.get("max_batch_size")
    if batch is not None and batch < 1 and batch != -1:
        raise UserError(f"hydra.sweeper.max_batch_size must be >= 1, or -1 or null (all), got {batch}")
    arguments = [o for o in primary.hydra.overrides.task]
    try:
        return expand_grids(hydra.config_loader, sweeper.get("params"), sweeper.get("grids"), arguments)
    except HYDRA_ERRORS as e:
        raise UserError(clean_hydra_error(e)) from e


def group_repository(hydra, primary):
    """The config repository Hydra composes the sweep's jobs from: the packaged configs plus a
    --config-dir (hydra.searchpath); `group_exists(key)` says whether `key` names a config group."""
    _, repo = hydra.config_loader._parse_overrides_and_create_caching_repo(
        "config", list(primary.hydra.overrides.hydra))
    return repo


def apply_overrides(overrides: list, cfg: DictConfig) -> None:
    """Apply parsed overrides that are not group choices to a composed config, as Hydra's composition
    ends: ``key=value``, ``+key=value``, ``++key=value``, ``~key``."""
    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def compose_job(hydra, primary, overrides: list[str]) -> DictConfig:
    """One job's config composed by Hydra, without its ``hydra`` node (as Hydra hands it to a task function)."""
    cfg = hydra.config_loader.load_sweep_config(primary, list(overrides))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
