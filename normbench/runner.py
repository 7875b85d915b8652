"""One run, end to end: config -> data -> model -> fit -> run folder.

Everything that can be refused (data, model/norm pairs, group counts, a results
dir that cannot be written) is checked before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from normbench import probes, results, threads, tracking
from normbench.config import Config, config_hash, effective_lr, run_id, to_dict
from normbench.data import Data, decoded, load_data
from normbench.errors import RunFailed, UserError
from normbench.models import build_model, count_parameters, forward_work
from normbench.norms import NormFactory, NormOptions
from normbench.train import EpochRecord, FitResult, Progress, fit, resolve_device


@dataclass
class RunResult:
    folder: Path
    summary: dict
    trained: bool = True  # false: the folder already held a finished result, returned as it was
    kept_aside: str | None = None  # a damaged result that was in the folder: where it went, and why


def norm_factory(cfg: Config) -> NormFactory:
    """The norm config as the factory that models receive."""
    from normbench import plugins

    known = {f.name for f in dataclasses.fields(NormOptions)} - {"extra"}
    options = NormOptions(**{k: v for k, v in vars(cfg.norm).items() if k in known})
    plugin = plugins.entry("norm", cfg.norm.name)
    if plugin is not None:  # a plugin's norm gets its own options dataclass
        options = dataclasses.replace(options, extra=plugin.options_of(cfg.norm))
    return NormFactory(cfg.norm.name, options, cfg.norm.position)


class _SaveEachEpoch(Progress):
    """Passes progress on and rewrites metrics.csv after every epoch, so a long run shows its curve."""

    def __init__(self, inner: Progress, folder: Path, resume: dict | None = None, tracker=None):
        self.inner, self.folder, self.tracker = inner, folder, tracker
        self.records = [EpochRecord(**r) for r in resume["records"]] if resume else []

    def run_start(self, name: str, epochs: int, batch_size: int) -> None:
        self.inner.run_start(name, epochs, batch_size)

    def epoch_start(self, epoch: int, steps: int) -> None:
        self.inner.epoch_start(epoch, steps)

    def update(self, steps_done: int, loss: float) -> None:
        self.inner.update(steps_done, loss)

    def epoch_end(self, record: EpochRecord) -> None:
        self.records.append(record)
        results.write_metrics(self.folder, self.records)
        if self.tracker is not None:
            self.tracker.epoch(record)
        self.inner.epoch_end(record)


def _peak_memory_mb(device: torch.device) -> dict:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize(cfg: Config, fitted: FitResult | None, status: str, *, seconds: float, params: int,
              device: torch.device, started: str, error: str | None = None, tb: str | None = None) -> dict:
    records = fitted.records if fitted else []
    done = [r for r in records if not math.isnan(r.test_acc)]
    final = {k: _finite(v) for k, v in asdict(done[-1]).items()} if done else None
    steps_per_epoch = fitted.steps_per_epoch if fitted else None
    return {
        "run_id": run_id(cfg), "config_hash": config_hash(cfg), "status": status, "error": error, "traceback": tb,
        "diverged_step": fitted.diverged_step if fitted else None,
        "epochs": cfg.epochs, "epochs_completed": len(done), "steps_per_epoch": steps_per_epoch,
        "steps": done[-1].step if done else 0, "effective_lr": effective_lr(cfg),
        "final": final, "best_test_acc": max((r.test_acc for r in done), default=None),
        **({"shifts": fitted.shifts} if fitted and fitted.shifts else {}),  # only with eval.shifts set
        **({"probe_seconds": {k: round(v, 3) for k, v in fitted.probe_seconds.items()}}
           if fitted and fitted.probe_seconds else {}),  # only with probes on: their time, apart from training's
        "wall_seconds": round(seconds, 3), "num_parameters": params, "device": str(device),
        "threads": torch.get_num_threads(),
        **_kernels(cfg, device),
        **(_peak_memory_mb(device)), "versions": results.versions(), "git_sha": results.git_sha(),
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")
        if status != "running" else None,
        "config": to_dict(cfg),
    }


def _kernels(cfg: Config, device: torch.device) -> dict:
    """For a CPU run that normbench's C kernels can speed up (a recurrent net; ghost batch norm), which
    kernels it ran on (normbench/kernels/build.py): C, or PyTorch's alone where they cannot be built,
    and why. Each step agrees to rounding either way."""
    if device.type != "cpu" or (cfg.model.name != "rnn" and cfg.norm_batch_size is None):
        return {}
    from normbench.kernels import build
    return {"kernels": build.status()}


def _check_batch_fits(cfg: Config, n_train: int) -> None:
    if n_train < cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({n_train} samples)")


# What one module call costs a training step (forward and backward, launch and Python overhead) in
# multiply-accumulates of arithmetic: measured on a 2-core CPU from the quick preset's MLP and CNN runs.
CALL_COST_MACS = 1.5e6


def built_model(cfg: Config, shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, tuple[int, int]]:
    """`build_model`, and the work of one sample's forward pass (`forward_work`: module calls and
    multiply-accumulates; its passes of zero samples, in eval mode, change nothing). Also checks what a
    plugin's code can get wrong: building or a forward pass that fails (a norm that changes the shape or
    the dtype, or works on one model and not another) and an output other than one row of `num_classes`
    scores; each is a user error naming the plugin's entries."""
    from normbench.plugins.entries import WHAT, provenance_record

    mine = [f"{WHAT[group]} '{getattr(cfg, group).name}'" for group in ("norm", "model", "data")
            if provenance_record(group, getattr(cfg, group).name) is not None]
    where = f"{' and '.join(mine)} (a plugin's) on model={cfg.model.name}" if mine else f"model={cfg.model.name}"
    try:
        model = build_model(cfg.model, shape, num_classes, norm_factory(cfg), cfg.seed)
        outputs = []
        hook = model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            work = forward_work(model, shape)
        finally:
            hook.remove()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a plugin's code raises
        if not mine:
            raise
        message = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{where}: building the model or a forward pass of a sample fails: "
                        f"{type(e).__name__}: {message}") from e
    out = outputs[-1] if outputs else None
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) == (1, num_classes)):
        got = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise UserError(f"{where}: one sample gives {got}; a model gives one row of {num_classes} class scores "
                        f"(floats of shape (1, {num_classes}))")
    return model, work


def check(cfg: Config) -> float:
    """Every refusal `prepare` can give, cheaply: data present and intact, model and norm compatible,
    batch not larger than the training set, results writable. Used to plan sweeps.

    Returns the run's estimated training cost (relative units: steps x (module calls x their overhead
    + batch x multiply-accumulates)), by which parallel sweeps start the longest runs first."""
    if cfg.tensorboard:
        tracking.require()
    probes.validate_probes(cfg)
    raw = decoded(cfg.data)
    n_train = len(raw.train_y) if cfg.data.train_size is None else min(cfg.data.train_size, len(raw.train_y))
    _check_batch_fits(cfg, n_train)
    shape = tuple(raw.train_x.shape[1:])
    model, (calls, macs) = built_model(cfg, shape, raw.num_classes)
    results.check_writable(results.experiment_dir(cfg), create=False)
    return cfg.epochs * (n_train // cfg.batch_size) * (calls * CALL_COST_MACS + cfg.batch_size * macs)


def prepare(cfg: Config, device: torch.device) -> tuple[Data, nn.Module]:
    """Load the data and build the model: every check that can refuse a config, before anything is written."""
    experiment = results.experiment_dir(cfg)
    probes.validate_probes(cfg)
    if cfg.tensorboard:
        tracking.require()
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, device)
    _check_batch_fits(cfg, len(data.train_y))
    model, (_, macs) = built_model(cfg, data.input_shape, data.num_classes)  # before .to(device): samples on the CPU
    torch.set_num_threads(threads.choose(cfg.threads, cfg.batch_size, macs))
    model = model.to(device)
    if device.type == "cuda" and cfg.perf.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # NHWC: faster conv kernels, same numbers
    results.check_writable(experiment)
    return data, model


CHECKPOINT_KEYS = {"epoch": int, "step": int, "seconds": float, "records": list, "model": dict,
                   "optimizer": dict, "generators": list, "config_hash": str}


def _usable_checkpoint(state: dict, cfg: Config, model: nn.Module) -> bool:
    """Whether a checkpoint read from disk fits this run: a damaged or forged one means a fresh start."""
    from normbench.train import make_optimizer

    if any(not isinstance(state.get(k), t) or isinstance(state.get(k), bool) for k, t in CHECKPOINT_KEYS.items()
           if t is not float) or not isinstance(state.get("seconds"), (int, float)):
        return False
    if state["config_hash"] != config_hash(cfg) or not 1 <= state["epoch"] <= cfg.epochs:
        return False
    fields = {f.name for f in dataclasses.fields(EpochRecord)}
    if len(state["records"]) != state["epoch"] or any(not isinstance(r, dict) or set(r) != fields
                                                      for r in state["records"]):
        return False
    own = model.state_dict()
    theirs = state["model"]
    if set(theirs) != set(own) or any(not isinstance(theirs[k], torch.Tensor) or theirs[k].shape != v.shape
                                      for k, v in own.items()):
        return False
    try:
        make_optimizer(cfg, model).load_state_dict(state["optimizer"])  # a throwaway: checks groups and shapes
        for g, saved in zip((torch.Generator(), torch.Generator()), state["generators"], strict=True):
            g.set_state(saved)
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError):
        return False
    return True


def _resume_state(folder: Path, cfg: Config, model: nn.Module) -> tuple[dict | None, bool]:
    """The checkpoint of an unfinished run of this same config, if there is a usable one; and whether
    there was one that cannot be used (damaged, or not this run's), which the user is told about."""
    summary = results.read_summary(folder)
    if summary is None or summary.get("config_hash") != config_hash(cfg) or summary.get("status") != "running":
        return None, False
    if not (folder / results.CHECKPOINT).exists():
        return None, False
    state = results.load_checkpoint(folder)
    if state is not None and _usable_checkpoint(state, cfg, model):
        return state, False
    return None, True


def finished_summary(folder: Path, cfg: Config) -> dict | None:
    """The summary of a finished run of this config in `folder`, or None."""
    summary = results.read_summary(folder)
    return summary if results.sound(summary, folder, config_hash(cfg)) and summary["status"] in results.FINISHED \
        else None


def _aside(folder: Path, what: str) -> Path:
    """Where a new attempt at a finished run trains (``attempt``), or its old result waits (``replaced``):
    hidden beside the run folder, so nothing reads them as results."""
    return folder.with_name(f".{folder.name}.{what}")


def recover(folder: Path) -> None:
    """Finish a replacement that a kill interrupted (see `execute`): the run folder ends up holding
    the newer finished result. Call with the run's lock held."""
    import shutil

    replaced, attempt = _aside(folder, "replaced"), _aside(folder, "attempt")
    if not replaced.exists():
        return
    if not folder.exists():
        done = results.read_summary(attempt) if attempt.exists() else None
        (attempt if done and done.get("status") in results.FINISHED else replaced).rename(folder)
    if replaced.exists():
        shutil.rmtree(replaced, ignore_errors=True)


def _replace(folder: Path, attempt: Path) -> None:
    """Put a finished attempt in place of the old result: two renames, then the old one is removed.
    A kill between them is mended by `recover`."""
    import shutil

    replaced = _aside(folder, "replaced")
    try:
        folder.rename(replaced)
        attempt.rename(folder)
    except OSError as e:
        raise results.ResultsError(f"could not replace {folder}: {e.strerror or e}; run again to finish") from e
    shutil.rmtree(replaced, ignore_errors=True)


def execute(cfg: Config, progress: Progress | None = None, *, replace: bool | tuple[str, ...] = False) -> RunResult:
    """Run one config and write its folder. User errors are raised before anything is written.

    A finished result is never overwritten: a config whose folder holds one is not trained again
    (`RunResult.trained` is false) unless `replace` says so (True, or the finished statuses to retrain);
    then the new attempt trains in a hidden folder beside it and takes its place only when it finishes.
    The run holds its lock while it trains: a second process asking for the same run gets a `UserError`.
    After every epoch a checkpoint is saved; a run that was killed continues from its last epoch
    when it is started again, with the same results as if it had never stopped.
    """
    folder = results.run_dir(cfg)
    results.check_run_folder(folder)
    device = resolve_device(cfg.device)
    data, model = prepare(cfg, device)
    with results.run_lock(folder):  # raises results.Busy while another process trains this run
        results.adopt_legacy(cfg, folder, holding_lock=True)  # a finished run under its 0.2 name (gn8, bn_shared) moves here
        recover(folder)
        done = finished_summary(folder, cfg)
        retrain = replace is True or (replace and done is not None and done["status"] in replace)
        if done is not None and not retrain:
            return RunResult(folder, done, trained=False)
        kept = None
        if done is None and (why := results.damaged_result(folder)):  # not a result: trained again, kept
            kept = (f"{folder}: its summary.json cannot be trusted ({why}); the folder is kept aside as "
                    f"{results.keep_damaged_aside(folder)}, and the run trains afresh")
        target = _aside(folder, "attempt") if done is not None else folder
        results.check_writable(target)  # an interrupted run's read-only folder: refused before, not after, an epoch
        summary = _train(cfg, target, data, model, device, progress)
        if target != folder:
            _replace(folder, target)
        return RunResult(folder, summary, kept_aside=kept)


def _train(cfg: Config, folder: Path, data: Data, model: nn.Module, device: torch.device,
           progress: Progress | None) -> dict:
    """Train into `folder` (resuming its checkpoint, if usable) and return the finished summary."""
    if cfg.tensorboard:  # TensorBoard writes into its folder itself: it must not lead out of results_dir
        results.inside(results.results_root(cfg), folder / tracking.FOLDER)
    params = count_parameters(model)
    resume, unusable = _resume_state(folder, cfg, model)
    results.remove_stale_temp_files(folder)  # a killed run may have left one mid-write
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if resume is None:
        results.remove_checkpoint(folder)
        results.write_config(folder, cfg)
        results.write_summary(folder, summarize(cfg, None, "running", seconds=0, params=params, device=device,
                                                started=started))
    progress = progress or Progress()
    progress.run_start(run_id(cfg), cfg.epochs, cfg.batch_size)
    if resume is not None:
        progress.resumed(resume["epoch"], cfg.epochs)
    elif unusable:
        progress.unusable_checkpoint(cfg.epochs)
    t0 = time.perf_counter() - (resume["seconds"] if resume else 0.0)  # wall time counts the earlier processes' epochs
    fitted = None

    def checkpoint(state: dict) -> None:
        if cfg.checkpoint:
            results.save_checkpoint(folder, {**state, "config_hash": config_hash(cfg)})

    tracker = tracking.TensorBoardLog(folder, resume["epoch"] + 1 if resume else 1) if cfg.tensorboard else None
    try:
        fitted = fit(cfg, model, data, _SaveEachEpoch(progress, folder, resume, tracker), resume=resume,
                     on_epoch_end=checkpoint)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        results.write_summary(folder, summarize(cfg, fitted, "failed", seconds=time.perf_counter() - t0,
                                                params=params, device=device, started=started,
                                                error=error, tb=traceback.format_exc(limit=-12)))  # the innermost frames
        raise RunFailed(folder, error) from e
    finally:
        if tracker is not None:
            tracker.close()
    results.write_metrics(folder, fitted.records)
    probes.write(folder, fitted.probe_rows)
    summary = summarize(cfg, fitted, fitted.status, seconds=time.perf_counter() - t0, params=params,
                        device=device, started=started)
    results.write_summary(folder, summary)
    if not cfg.keep_checkpoint:
        results.remove_checkpoint(folder)
    return summary
