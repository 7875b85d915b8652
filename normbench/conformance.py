"""The conformance battery: what a well-behaved norm (or model) does, measured, for built-in and plugin entries.

`normbench check norm=NAME` runs it on every kind of features (flat, spatial, recurrent) and inside every
model; `normbench check model=NAME` runs the model with a few built-in norms. tests/test_norms.py holds every
built-in norm to the same battery. Each check, on a fresh module, in float32 on the CPU:

* builds (C channels, 2 per group of num_groups if more; H x W = 5 x 5; batch N): the builder returns a module (a refusal with a UserError is "refused", not a failure);
* finite: a training forward and backward give finite outputs and gradients;
* shape: a norm keeps its input's shape; a model gives (N, num_classes);
* state_dict: after some training steps, a fresh module loaded with its state_dict gives the same eval output;
* deterministic: two builds under the same seed give identical outputs and gradients;
* train≈eval: a norm trained on batches from one distribution normalizes a large batch of it in eval mode as
  it does in training mode (mean difference under TRAIN_EVAL_TOLERANCE of the output's std); a model's eval
  output is finite;
* batch-dependent (measured, not declared): in training mode, the output for one sample changes when the
  other samples of the batch change. Informational: bn yes, ln/gn/in no.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from normbench.errors import UserError

CHECKS = ("builds", "finite", "shape", "state_dict", "deterministic", "train≈eval", "batch-dependent")
C, H, W, T, N = 8, 5, 5, 6, 16  # channels, positions, recurrent steps, batch
INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10  # what models are checked on
MODEL_BATCH = 4
MODEL_NORMS = ("bn", "ln", "in", "none")  # the norms `check model=NAME` builds the model with
TRAIN_EVAL_STEPS = 60  # momentum 0.1: 0.9^60 < 0.2% of the initial running values left
TRAIN_EVAL_TOLERANCE = 0.1
BATCH_TOLERANCE = 1e-4  # relative change of one sample's output that counts as depending on the batch


@dataclass
class Outcome:
    status: str  # ok | fail | refused | n/a | yes | no
    detail: str = ""


@dataclass
class Row:
    entry: str  # norm=loo_bn
    where: str  # a kind of features, or model=NAME
    results: dict[str, Outcome] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(o.status == "fail" for o in self.results.values())


def _sample(kind: str, n: int, seed: int, c: int = C) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, H, W) if kind == "spatial" else (n, c)
    return 0.5 * torch.randn(shape, generator=g) + 0.3


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal values, NaN equal to NaN (a norm that gives NaN fails `finite`, not also `deterministic`)."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _finite(*tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


class _Probe:
    """What the battery calls: a norm on one kind, or a model; `fresh()` builds it under a fixed seed."""

    def __init__(self, build, forward, sample, out_shape, n: int = N, large: int = 2048):
        self.build, self.forward, self.sample, self.out_shape = build, forward, sample, out_shape
        self.n, self.large = n, large  # the batch of most checks; the batch train≈eval compares on

    def fresh(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build()


def _battery(probe: _Probe, norm_like: bool) -> dict[str, Outcome]:
    res: dict[str, Outcome] = {}
    try:
        module = probe.fresh().train()
    except UserError as e:
        return {"builds": Outcome("refused", str(e)), **{k: Outcome("n/a") for k in CHECKS[1:]}}
    except Exception as e:  # noqa: BLE001 - the entry's own code: every error is a finding
        return {"builds": Outcome("fail", f"{type(e).__name__}: {e}"), **{k: Outcome("n/a") for k in CHECKS[1:]}}
    res["builds"] = Outcome("ok")
    x = probe.sample(probe.n, 0).requires_grad_()
    try:
        out = probe.forward(module, x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    except Exception as e:  # noqa: BLE001
        res["finite"] = Outcome("fail", f"forward/backward raised {type(e).__name__}: {e}")
        return {**res, **{k: Outcome("n/a") for k in CHECKS[2:]}}
    grads = [p.grad for p in module.parameters()]
    res["finite"] = Outcome("ok") if _finite(out, x.grad, *grads) else Outcome("fail", "non-finite output or gradient")
    want = probe.out_shape(x)
    res["shape"] = Outcome("ok") if tuple(out.shape) == want else Outcome("fail", f"{tuple(out.shape)}, expected {want}")
    res["state_dict"] = _round_trip(probe)
    res["deterministic"] = _deterministic(probe, x.detach())
    res["train≈eval"] = _train_eval(probe) if norm_like else _eval_finite(probe)
    res["batch-dependent"] = _batch_dependence(probe)
    return res


def _guard(check):
    def run(probe: _Probe, *args) -> Outcome:
        try:
            return check(probe, *args)
        except Exception as e:  # noqa: BLE001
            return Outcome("fail", f"{type(e).__name__}: {e}")

    return run


@_guard
def _round_trip(probe: _Probe) -> Outcome:
    module = probe.fresh().train()
    with torch.no_grad():
        for step in range(3):
            probe.forward(module, probe.sample(probe.n, 10 + step))
    again = probe.fresh()
    again.load_state_dict(module.state_dict())
    x = probe.sample(probe.n, 20)
    with torch.no_grad():
        same = _same(probe.forward(module.eval(), x), probe.forward(again.eval(), x))
    return Outcome("ok") if same else Outcome("fail", "a module loaded from its state_dict gives another eval output")


@_guard
def _deterministic(probe: _Probe, x: torch.Tensor) -> Outcome:
    outs = []
    for _ in range(2):
        module = probe.fresh().train()
        xi = x.clone().requires_grad_()
        out = probe.forward(module, xi)
        out.sum().backward()
        outs.append((out.detach(), xi.grad))
    same = _same(outs[0][0], outs[1][0]) and _same(outs[0][1], outs[1][1])
    return Outcome("ok") if same else Outcome("fail", "two builds under one seed differ")


@_guard
def _train_eval(probe: _Probe) -> Outcome:
    module = probe.fresh().train()
    with torch.no_grad():
        for step in range(TRAIN_EVAL_STEPS):
            probe.forward(module, probe.sample(probe.large // 8, 100 + step))
        big = probe.sample(probe.large, 99)
        trained = probe.forward(copy.deepcopy(module).train(), big)
        evaluated = probe.forward(module.eval(), big)
    if not _finite(evaluated):
        return Outcome("fail", "non-finite output in eval mode")
    gap = float((trained - evaluated).abs().mean() / trained.std().clamp_min(1e-12))
    return Outcome("ok", f"{gap:.2g}") if gap < TRAIN_EVAL_TOLERANCE else \
        Outcome("fail", f"eval differs from training by {gap:.2g} of the output's std")


@_guard
def _eval_finite(probe: _Probe) -> Outcome:
    module = probe.fresh().train()
    with torch.no_grad():
        probe.forward(module, probe.sample(probe.n, 30))
        out = probe.forward(module.eval(), probe.sample(probe.n, 31))
    return Outcome("ok") if _finite(out) else Outcome("fail", "non-finite output in eval mode")


@_guard
def _batch_dependence(probe: _Probe) -> Outcome:
    module = probe.fresh().train()
    x = probe.sample(probe.n, 40)
    y = torch.cat([x[:1], probe.sample(probe.n - 1, 41)])  # the same first sample among other ones
    with torch.no_grad():
        a = probe.forward(copy.deepcopy(module), x)[0]
        b = probe.forward(copy.deepcopy(module), y)[0]
    change = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    return Outcome("yes", f"{change:.2g}") if change > BATCH_TOLERANCE else Outcome("no")


def norm_on_kind(name: str, kind: str, options=None) -> Row:
    """The battery for norm `name` built alone on `kind` features (C channels; recurrent: step 0 of T)."""
    from normbench.norms import RECURRENT, NormOptions, create_norm

    options = options or NormOptions()
    c = max(C, 2 * options.num_groups)  # two channels a group (gn's 32 groups: 64 channels)

    def forward(m, x):
        return m(x, 0) if kind == RECURRENT else m(x)

    probe = _Probe(lambda: create_norm(name, c, kind, options, steps=T), forward,
                   lambda n, seed: _sample(kind, n, seed, c), lambda x: tuple(x.shape),
                   large=256 if kind == "spatial" else 2048)  # spatial: x 25 positions
    return Row(f"norm={name}", kind, _battery(probe, norm_like=True))


def in_model(cfg) -> Row:
    """The battery for the model and norm of `cfg`, built as a run builds them (on 1x28x28 inputs)."""
    from normbench.models import build_model
    from normbench.runner import norm_factory

    probe = _Probe(lambda: build_model(cfg.model, INPUT_SHAPE, NUM_CLASSES, norm_factory(cfg), cfg.seed),
                   lambda m, x: m(x), lambda n, seed: torch.randn((n, *INPUT_SHAPE),
                                                                  generator=torch.Generator().manual_seed(seed)),
                   lambda x: (x.shape[0], NUM_CLASSES), n=MODEL_BATCH)
    return Row(f"norm={cfg.norm.name}", f"model={cfg.model.name}", _battery(probe, norm_like=False))


def check(overrides: list[str], config_dir=None) -> list[Row]:
    """`normbench check`: with norm=NAME, the norm on every kind and in every model (or the one model=
    names); with model=NAME alone, the model with each of MODEL_NORMS. Other overrides apply as in a run."""
    from normbench.config import compose
    from normbench.models import MODELS
    from normbench.norms import KINDS
    from normbench.runner import norm_factory

    groups = {o.split("=", 1)[0].lstrip("+") for o in overrides if "=" in o}
    if "norm" not in groups and "model" not in groups:
        raise UserError("check what? name a norm (norm=NAME) or a model (model=NAME)")
    rows: list[Row] = []
    if "norm" in groups:
        cfg = compose(overrides, config_dir)
        rows += [norm_on_kind(cfg.norm.name, kind, norm_factory(cfg).options) for kind in KINDS]
        models = [cfg.model.name] if "model" in groups else MODELS.names()
        rows += [in_model(compose([*overrides, f"model={m}"], config_dir)) for m in models]
    else:
        for norm in MODEL_NORMS:
            rows.append(in_model(compose([*overrides, f"norm={norm}"], config_dir)))
    return rows


def frame(rows: list[Row]):
    import pandas as pd

    return pd.DataFrame([{"entry": r.entry, "where": r.where, **{k: o.status for k, o in r.results.items()},
                          "detail": "; ".join(f"{k}: {o.detail}" for k, o in r.results.items()
                                              if o.status in ("fail", "refused"))} for r in rows])


STYLE = {"ok": "green", "yes": "cyan", "no": "cyan", "fail": "bold red", "refused": "yellow", "n/a": "dim"}


def table(rows: list[Row]):
    from rich.table import Table

    t = Table(title="conformance", title_justify="left", header_style="bold")
    for col in ("entry", "where", *CHECKS):
        t.add_column(col, no_wrap=col in ("entry", "where"))
    for r in rows:
        t.add_row(r.entry, r.where, *(f"[{STYLE[o.status]}]{o.status}[/]" for o in (r.results[c] for c in CHECKS)))
    return t


def notes(rows: list[Row]) -> list[str]:
    """One line per failure or refusal, with why."""
    return [f"{r.entry} on {r.where}: {k} {o.status}: {o.detail}" for r in rows for k, o in r.results.items()
            if o.status in ("fail", "refused") and o.detail]
