"""A plain bottleneck ResNet-50 (He et al. 2016, the torchvision v1.5 layout) for timing.

No torchvision (its wheels do not match this torch). 7x7/2 stem conv + BN + ReLU + 3x3/2 max
pool, four stages of 3, 4, 6, 3 :class:`Bottleneck` blocks (1x1 reduce, 3x3 with the stage's
stride, 1x1 expand x4; widths 64, 128, 256, 512 → 256..2048 channels; the first block of each
stage has a 1x1 conv + BN shortcut), global average pool, Linear. 53 convs + 1 Linear = 54
quantizable layers; 25.6 M parameters with 1000 classes (23.5 M with 10). Plain modules only,
so ``torch.fx`` traces it.
"""

from __future__ import annotations

import torch
from torch import nn

from resnet18 import ResNet

BLOCKS_PER_STAGE = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + downsample(x))``."""

    expansion = EXPANSION

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet50(ResNet):
    """ResNet-50 for ``[N, in_channels, H, W]`` images (any H, W >= 32)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__(Bottleneck, BLOCKS_PER_STAGE, num_classes, in_channels)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                # a small last-BN scale keeps the random network's activations bounded over
                # 16 residual additions (the "zero-init residual" idea, not quite zero)
                nn.init.constant_(m.bn3.weight, 0.2)


def resnet50(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet50:
    """A randomly initialised :class:`ResNet50` (deterministic for a given ``seed``)."""
    torch.manual_seed(seed)
    return ResNet50(num_classes=num_classes, in_channels=in_channels)
