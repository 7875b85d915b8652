"""Training planned runs on this machine, one after another, and the task function other launchers run.

A job skips itself when its folder already holds a finished run, and a run being trained holds a lock,
so two sweeps over one folder never train a run twice: each skips what the other is training
("busy") and comes back to it at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from normbench import results
from normbench.config import Config, run_id, to_config
from normbench.errors import ResultsError, RunFailed, UserError
from normbench.sweep.planning import RETRIED, Planned


def train_job(cfg: Config, retry_failed: bool = False, display=None, wait: bool = False) -> dict:
    """Train one planned job unless its folder already holds a finished run; a failed run is recorded in the
    outcome, not raised. Whether to train is decided again under the run's lock: another sweep over the
    same folder may have finished the run meanwhile, or be training it now (then the outcome's status is
    "busy", unless `wait`, which waits for that sweep and trains the run only if it is still unfinished)."""
    from normbench.runner import execute  # deferred: the runner imports torch models and data

    outcome = {"run_id": run_id(cfg), "status": "new", "error": None}
    try:
        if wait:
            with results.run_lock(results.run_dir(cfg), wait=True):
                pass  # the other process is done with it (or died): its state decides below
        result = execute(cfg, display, replace=RETRIED if retry_failed else False)
        outcome["status"] = result.summary["status"]
        if not result.trained:
            outcome.update(skipped=True, error=result.summary.get("error"))
    except results.Busy:
        outcome.update(status="busy", skipped=True)
    except ResultsError as e:
        outcome.update(status="failed", error=str(e))
    except UserError as e:
        outcome.update(status="invalid", error=str(e))
    except RunFailed as e:
        outcome.update(status="failed", error=e.error)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, and the sweep goes on
        outcome.update(status="failed", error=f"{type(e).__name__}: {e}")
    return outcome


def train_all(todo: Iterable[Planned], retry_failed: bool, display=None,
              train: Callable[..., dict] = train_job) -> list[dict]:
    """Train the planned runs one after another, as they come (`todo` may still be being planned);
    runs another sweep is training are taken up last."""
    done = [(p, train(p.cfg, retry_failed, display)) for p in todo]
    return [train(p.cfg, retry_failed, display, wait=True) if o["status"] == "busy" else o for p, o in done]


@dataclass
class HydraTask:
    """Task function of the training pass under another Hydra launcher (SLURM, ...); picklable, so the
    launcher can ship it to its workers."""

    retry_failed: bool = False

    def __call__(self, dict_cfg) -> dict:
        return train_job(to_config(dict_cfg), self.retry_failed)
