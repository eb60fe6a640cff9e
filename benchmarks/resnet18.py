"""A plain ResNet-18 (He et al. 2016, the torchvision layout) for timing the pipeline.

No torchvision: its wheels do not match this torch. Same structure and parameter count
(11.7 M with 1000 classes, 11.2 M with 10): 7x7/2 stem conv + BN + ReLU + 3x3/2 max pool,
four stages of two :class:`BasicBlock` each (64, 128, 256, 512 channels; stages 2-4 start with
stride 2 and a 1x1/2 conv + BN shortcut), global average pool, Linear. 20 convs + 1 Linear =
21 quantizable layers. Plain modules only, so ``torch.fx`` traces it.
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class ResNet(nn.Module):
    """The ResNet stem, four stages of ``block`` and the head; ``block.expansion`` is the ratio
    of a block's output channels to its width (1 for :class:`BasicBlock`). Shared by the
    ResNet-18 here and the ResNet-50 of ``resnet50.py``."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: tuple[int, ...], num_classes: int = 1000,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        channels = 64
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            blocks = []
            for j in range(count):
                blocks.append(block(channels, width, 2 if (i > 0 and j == 0) else 1))
                channels = width * block.expansion
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class ResNet18(ResNet):
    """ResNet-18 for ``[N, in_channels, H, W]`` images (any H, W >= 32)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__(BasicBlock, BLOCKS_PER_STAGE, num_classes, in_channels)


def resnet18(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet18:
    """A randomly initialised :class:`ResNet18` (deterministic for a given ``seed``)."""
    torch.manual_seed(seed)
    return ResNet18(num_classes=num_classes, in_channels=in_channels)
