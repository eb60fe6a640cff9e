"""Tiny models and a tiny 2-group task shared by the core tests (importable as a factory spec:
``fixtures_models:tiny_cnn``, ``fixtures_models:tiny_mlp`` when the tests folder is on sys.path
or the working directory).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData

IMAGE_SHAPE = (3, 16, 16)
NUM_CLASSES = 4
MLP_FEATURES = 64


class TinyCNN(nn.Module):
    """Conv+BN+ReLU stem, a residual block, a depthwise conv, a 1x1 conv, avg pool, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        x = self.relu(x + y)
        x = self.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class TinyMLP(nn.Module):
    def __init__(self, in_features: int = MLP_FEATURES, hidden: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_cnn(num_classes: int = NUM_CLASSES) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes)


def tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def failing_factory() -> nn.Module:
    raise RuntimeError("boom from the factory")


def not_a_module() -> int:
    return 3


def image_task(n: int = 400, minority: float = 0.25, seed: int = 0) -> GroupData:
    """Label = the quadrant holding a bright blob; the minority has inverted, brighter images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    group = (rng.random(n) < minority).astype(np.int64)
    x = 0.3 * rng.standard_normal((n, *IMAGE_SHAPE)).astype(np.float32)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        r0, c0 = 8 * r + rng.integers(1, 4), 8 * c + rng.integers(1, 4)
        x[i, :, r0:r0 + 4, c0:c0 + 4] += 1.5
    x[group == 1] = 1.0 - 2.0 * x[group == 1]  # inverted contrast, larger values
    return GroupData(x.astype(np.float32), y.astype(np.int64), group, ("majority", "minority"), "image-task")


def tabular_task(n: int = 400, seed: int = 1) -> GroupData:
    """Labels from a fixed random linear teacher; the minority is shifted and scaled."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(123).standard_normal((MLP_FEATURES, NUM_CLASSES))
    group = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.standard_normal((n, MLP_FEATURES)).astype(np.float32)
    x[group == 1] = 2.0 * x[group == 1] + 0.5
    y = (x @ teacher).argmax(1)
    return GroupData(x.astype(np.float32), y.astype(np.int64), group, ("a", "b"), "tabular-task")


def train(model: nn.Module, data: GroupData, epochs: int = 15, lr: float = 0.01, seed: int = 0) -> nn.Module:
    """A few Adam epochs; returns the model in eval mode."""
    torch.manual_seed(seed)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 50):
            idx = perm[start:start + 50]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, data: GroupData) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x)).argmax(1).numpy()
    return float((pred == data.y).mean())


def save_npz(data: GroupData, path) -> None:
    np.savez(path, x=data.x, y=data.y, group=data.group, group_names=np.array(data.group_names))
