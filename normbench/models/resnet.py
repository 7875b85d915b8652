"""The CIFAR ResNet of He et al. 2016 (section 4.2): 6n+2 layers, widths 16/32/64.

ResNet-20 (n=3, 0.27M parameters) is normbench's small-scale stand-in for the
Group Norm paper's ResNet-50. Shortcuts that change shape use option A
(stride-2 subsampling plus zero channels), as in the paper's CIFAR models.
With norm.position=post_act the first conv of each block becomes conv -> ReLU -> norm;
the second conv's norm stays before the residual sum, where no activation follows it.

model.residual=skipinit (De & Smith 2020, arXiv 2002.10444; meant for norm=none) scales each
block's residual branch by a learnable scalar alpha that starts at 0: relu(shortcut(x) + alpha F(x)).
At init every block is then its shortcut: the identity on its input, which is non-negative since a
ReLU precedes every block (the stem's with pre_act), and in the blocks that change shape, the
parameter-free option-A shortcut (stride-2 subsampling plus zero channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.models import MODELS
from normbench.norms import SPATIAL, NormFactory


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, skipinit: bool = False):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None  # SkipInit's branch scale
        self.conv1 = norm.conv(c_in, c_out, 3, stride=stride, padding=1)
        self.act1 = norm.block(c_out, SPATIAL)
        self.conv2 = norm.conv(c_out, c_out, 3, padding=1, bias=not norm.spec.centers)  # feeds norm2 directly
        self.norm2 = norm(c_out, SPATIAL)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))  # zero channels up to c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.conv1(x))))
        if self.alpha is not None:
            out = self.alpha * out
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int, norm: NormFactory,
                 skipinit: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise UserError(f"model.depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(norm.conv(in_channels, width, 3, padding=1),
                                  norm.block(width, SPATIAL))
        blocks, c_in = [], width
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, norm, skipinit))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (N, 4*width, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))


@MODELS.register("resnet20")
def resnet20(cfg, input_shape: tuple[int, int, int], num_classes: int, norm: NormFactory) -> nn.Module:
    """CIFAR ResNet (He et al. 2016), depth 20 by default: stand-in for the GN paper's ResNet-50."""
    return CifarResNet(cfg.depth, cfg.width, input_shape[0], num_classes, norm, cfg.residual == "skipinit")
