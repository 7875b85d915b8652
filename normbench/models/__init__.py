"""Model registry. Every model takes (config, input shape, class count, norm factory).

Models ask the norm factory for a norm and never branch on which norm it is.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from normbench.norms import NormFactory, validate_norms
from normbench.registry import Registry

MODELS: Registry = Registry("model")

# Importing the modules registers their models.
from normbench.models import cnn, mlp, resnet, rnn  # noqa: E402,F401


def seeded_init(model: nn.Module, seed: int) -> None:
    """Re-initialize each conv/linear layer from a seed derived from (seed, layer name).

    The same seed then gives the same weights to same-named layers whatever the
    norm (a norm's own parameters start at fixed values), and whether or not a
    layer has a bias.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            module.reset_parameters()
    for module in model.modules():
        if hasattr(module, "reset_cell_parameters"):
            module.reset_cell_parameters()


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory,
                seed: int) -> nn.Module:
    """Build model `cfg.name`, validate its norms, and initialize it from `seed`."""
    model = MODELS.get(cfg.name)(cfg, input_shape, num_classes, norm)
    validate_norms(model, input_shape)
    seeded_init(model, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
