"""Multi-layer perceptron on flattened images (the Layer Norm paper's setting)."""

from __future__ import annotations

import math

from torch import nn

from normbench.models import MODELS
from normbench.norms import FLAT, NormFactory


@MODELS.register("mlp")
def mlp(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory) -> nn.Module:
    """MLP on flattened pixels: `depth` hidden layers of `width`, each linear -> norm -> ReLU."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(cfg.depth):
        layers += [norm.linear(fan_in, cfg.width), norm.block(cfg.width, FLAT)]
        fan_in = cfg.width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
