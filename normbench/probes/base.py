"""What every probe shares: the training step it looks at (`StepView`), the run's state it must put back
(`RunState`), and the layers it reports on (`weight_layers`).

A probe runs at the start of a training step, after the step's learning rate is set and before its
forward, on the step's batch. It may run forwards and backwards, move the weights and even take an
optimizer step; `RunState` then puts back everything the step depends on: weights, BN running averages
and counters, each norm's noise generator (all in the model's state dict), the gradients, the
optimizer's state, every module's train/eval mode, and torch's global random generators. So the step
that follows is bit for bit the step that would have run without the probe.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import StepNorm, is_norm


def _cloned(value):
    """A copy that later in-place updates of `value` cannot reach."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _cloned(v)) for k, v in value.items())
    return copy.deepcopy(value)


class RunState:
    """A snapshot of everything a probe could change, taken once per probe call.

    `restore_model` (weights, buffers, noise generators, modes) is cheap enough to call between a probe's
    own evaluations, so each of them starts from the step's exact state: the same BN buffers and, with
    norm.noise, the same noise draw as the step will make. `restore` puts back everything.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        self.weights = _cloned(model.state_dict())
        self.grads = [p.grad for p in self.params]
        self.opt_state = {p: _cloned(s) for p, s in optimizer.state.items()}
        self.modes = [(m, m.training) for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore_model(self) -> None:
        self.model.load_state_dict(_cloned(self.weights))
        for m, training in self.modes:
            m.training = training

    def restore(self) -> None:
        self.restore_model()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.optimizer.state.clear()
        for p, s in self.opt_state.items():
            self.optimizer.state[p] = _cloned(s)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


@dataclass
class StepView:
    """The training step a probe looks at: the model as the step will see it, the step's batch, the optimizer
    (its lr already set for the step), the forward's precision context, and the run's state to restore."""

    model: nn.Module
    x: torch.Tensor  # the step's batch, augmented as the step sees it
    y: torch.Tensor
    optimizer: torch.optim.Optimizer
    precision: Callable
    step: int  # updates done so far: 0 is the initial weights
    state: RunState

    def loss(self) -> torch.Tensor:
        """The step's training loss, in the step's mode (train: batch statistics, noise on)."""
        with self.precision():
            return F.cross_entropy(self.model(self.x), self.y)

    def gradients(self, params: list[nn.Parameter]) -> tuple[float, list[torch.Tensor]]:
        """(loss, its gradient wrt `params`) from the state restored to the step's: one forward and backward."""
        self.state.restore_model()
        loss = self.loss()
        return loss.item(), gradient(loss, params)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def gradient(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params; a parameter the loss does not use gets zeros, as the optimizer step would see it."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers, in the order they are built (which is the order they run in every
    normbench model), with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every norm layer (a recurrent cell's `StepNorm` counts once, not also its inner norm); none's
    identity is not a norm."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if id(m) in inside or not is_norm(m):
            continue
        if isinstance(m, StepNorm):
            inside |= {id(c) for c in m.modules()}
            if not is_norm(m.norm):
                continue
        out.append((name, m))
    return out


@contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Removes the hooks in `handles` on the way out, however it is left."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def norm2(tensors) -> float:
    """The l2 norm of a list of tensors taken as one vector, in float64."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))
