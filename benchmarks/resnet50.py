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

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + downsample(x))``."""

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


class ResNet50(nn.Module):
    """ResNet-50 for ``[N, in_channels, H, W]`` images (any H, W >= 32)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        channels = 64
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE)):
            blocks = []
            for j in range(count):
                blocks.append(Bottleneck(channels, width, 2 if (i > 0 and j == 0) else 1))
                channels = width * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                # a small last-BN scale keeps the random network's activations bounded over
                # 16 residual additions (the "zero-init residual" idea, not quite zero)
                nn.init.constant_(m.bn3.weight, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet50(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet50:
    """A randomly initialised :class:`ResNet50` (deterministic for a given ``seed``)."""
    torch.manual_seed(seed)
    return ResNet50(num_classes=num_classes, in_channels=in_channels)
