"""`validate_norms`: every norm of a built model checked before training, naming the layers that cannot work."""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms.group import GroupNorm
from normbench.norms.response import EvoNormS0
from normbench.norms.spec import SPATIAL

GROUPED = (GroupNorm, EvoNormS0)  # norms with num_groups, num_channels and kind


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_norms(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Check every norm of a built model before training, naming the layers that cannot work.

    GroupNorm needs C divisible by G; a group or instance of one value would normalize
    to zero. The error lists the group counts valid for every layer.
    """
    _check_group_counts(model)
    _check_single_values(model, input_shape)


def _check_single_values(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """A dry forward on two blank samples: any GN/IN/EvoNorm group holding one value is refused."""

    def hook(name):
        def check(module, inputs):
            x = inputs[0]
            groups = module.num_groups if isinstance(module, GROUPED) else x.shape[1]
            if x[0].numel() // groups <= 1:
                raise UserError(f"layer '{name}' sees input {tuple(x.shape[1:])}: each group or instance would "
                                "hold a single value, which normalizes to zero; use fewer stages, larger inputs "
                                "or fewer groups")
        return check

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (*GROUPED, nn.InstanceNorm2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _check_group_counts(model: nn.Module) -> None:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GROUPED) and m.num_groups > 1]
    bad = [(name, m) for name, m in layers
           if m.num_channels % m.num_groups or (m.kind != SPATIAL and m.num_channels == m.num_groups)]
    if not bad:
        return
    common = math.gcd(*(m.num_channels for _, m in layers))
    ok = [g for g in _divisors(common)
          if all(m.kind == SPATIAL or m.num_channels // g > 1 for _, m in layers)]
    name, m = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    why = ("does not divide" if m.num_channels % m.num_groups
           else "leaves one value per group in")
    raise UserError(f"norm.num_groups={m.num_groups} {why} layer '{name}' ({m.num_channels} channels){more}; "
                    f"num_groups values that work for every layer: {', '.join(map(str, ok))}")
