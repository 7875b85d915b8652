"""A small VGG-style conv net for 28x28 and 32x32 images."""

from __future__ import annotations

from torch import nn

from normbench.models import MODELS
from normbench.norms import SPATIAL, NormFactory


@MODELS.register("cnn")
def cnn(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory) -> nn.Module:
    """Small VGG-style CNN: stages of 3x3 conv -> norm -> ReLU, 2x2 max-pool between stages, then a linear layer
    on the channels averaged over positions (head gap) or on every position's channels (head flatten)."""
    layers: list[nn.Module] = []
    c_in = input_shape[0]
    for stage, c_out in enumerate(cfg.channels):
        if stage > 0:
            layers.append(nn.MaxPool2d(2))  # (N, C, H, W) -> (N, C, H/2, W/2)
        for _ in range(cfg.convs_per_stage):
            layers += [norm.conv(c_in, c_out, 3, padding=1), norm.block(c_out, SPATIAL)]
            c_in = c_out
    if cfg.head.value == "flatten":
        h, w = input_shape[1:]
        for _ in cfg.channels[1:]:
            h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c_in * h * w, num_classes)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
