"""Demo models: a small ResNet (BatchNorm, residual adds) and an MLP.

Plain modules only (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.Linear``,
``nn.AdaptiveAvgPool2d``, ``nn.Flatten``), no in-place ops and no data-dependent control flow,
so both trace with ``torch.fx.symbolic_trace`` and export with ``torch.onnx.export(dynamo=True)``.

The CLI loads them as ``fqexport.demo.models:small_resnet`` / ``fqexport.demo.models:mlp``
plus a ``state_dict`` file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fqexport.errors import ConfigError


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 stride-s conv + BN when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, 3 stages of :class:`BasicBlock` (widths w, 2w, 4w; the 2nd and 3rd
    stages start with stride 2), global average pool, flatten, Linear.

    The stem has stride ``stem_stride`` (2 by default): a 32x32 input runs its stages at 16, 8
    and 4 pixels, 4x cheaper to train on CPU than stride 1, while the stem conv still sees the
    full-resolution input.

    With ``blocks=(1, 1, 1)``: 9 convs (7 3x3 + 2 1x1 shortcuts) and one Linear layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width,
                        stem_stride=stem_stride)
        blocks = tuple(blocks)
        if len(blocks) != 3:
            raise ConfigError(f"blocks={blocks!r} must give the block count of each of 3 stages")
        _check_positive(**{f"blocks[{i}]": b for i, b in enumerate(blocks)})
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages = []
        channels = width
        for i, count in enumerate(blocks):
            out = width * 2**i
            layers = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(channels, out, stride))
                channels = out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class MLP(nn.Module):
    """``depth`` Linear layers: (depth-1) hidden Linear+ReLU of width ``hidden``, then a Linear
    classifier."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 3
    ) -> None:
        super().__init__()
        _check_positive(in_features=in_features, num_classes=num_classes, hidden=hidden,
                        depth=depth)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def small_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> SmallResNet:
    """Factory for the CLI (``fqexport.demo.models:small_resnet``): a fresh :class:`SmallResNet`."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, width=width)


def mlp(in_features: int = 32, num_classes: int = 4, hidden: int = 256, depth: int = 3) -> MLP:
    """Factory for the CLI (``fqexport.demo.models:mlp``): a fresh :class:`MLP`."""
    return MLP(in_features=in_features, num_classes=num_classes, hidden=hidden, depth=depth)
