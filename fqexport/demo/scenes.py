"""The embedded detection and segmentation task: scenes of a few shapes with known boxes and masks,
generated in memory (numpy only).

Each 3×64×64 image holds 1 to 3 objects of :data:`SCENE_CLASSES` (disk, square, triangle), 8 to
22 pixels across, anywhere inside the image, in a random colour over a textured background (a
colour gradient and noise). A minority acquisition condition, ``"low-light"`` (~10%), renders the
same scenes at 30% of the light with 3× the sensor noise: the quantization ranges a majority of
daylight scenes sets resolve its small activations coarsely.

Boxes are the objects' pixel extents (xyxy); masks hold class id + 1 per pixel (0: background;
a later object covers an earlier one). Inputs are normalised with the training set's per-channel
mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fqexport.calibration.annotations import Boxes, Masks
from fqexport.calibration.group_data import GroupData
from fqexport.errors import ConfigError

SCENE_CLASSES = ("disk", "square", "triangle")
SCENE_GROUPS = ("daylight", "low-light")
IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 8, 22
LOW_LIGHT_GAIN = 0.3
LOW_LIGHT_NOISE = 3.0
_NOISE = 0.04


@dataclass(frozen=True)
class SceneSplit:
    """One split: images, groups, and both kinds of ground truth."""

    x: np.ndarray  # float32 [N, 3, H, W], normalised
    group: np.ndarray  # int64 [N]
    boxes: Boxes
    masks: np.ndarray  # int64 [N, H, W]

    def detection(self, source: str) -> GroupData:
        """The split as detection data (annotations: the boxes)."""
        return GroupData(self.x, None, self.group, SCENE_GROUPS, source, self.boxes)

    def segmentation(self, source: str) -> GroupData:
        """The split as segmentation data (annotations: the masks)."""
        return GroupData(self.x, None, self.group, SCENE_GROUPS, source, Masks(self.masks))


@dataclass(frozen=True)
class SceneTask:
    train: SceneSplit
    test: SceneSplit
    mean: np.ndarray
    std: np.ndarray


def _object_mask(kind: int, size: float, cx: float, cy: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    r = size / 2.0
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        return dx * dx + dy * dy <= r * r
    if kind == 1:
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # an upward triangle inside the size × size square
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2.0)


def _render(n: int, group: np.ndarray, rng: np.random.Generator):
    h = w = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    images = np.empty((n, 3, h, w), np.float32)
    masks = np.zeros((n, h, w), np.int64)
    boxes, labels, image = [], [], []
    for i in range(n):
        base = rng.uniform(0.15, 0.45, size=3).astype(np.float32)
        slope = rng.uniform(-0.25, 0.25, size=(3, 2)).astype(np.float32)
        img = base[:, None, None] + slope[:, 0, None, None] * (xx / w - 0.5) + slope[:, 1, None, None] * (yy / h - 0.5)
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, len(SCENE_CLASSES)))
            size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
            cx = float(rng.uniform(size / 2, w - size / 2))
            cy = float(rng.uniform(size / 2, h - size / 2))
            m = _object_mask(kind, size, cx, cy, yy, xx)
            if not m.any():
                continue
            colour = rng.uniform(0.55, 1.0, size=3).astype(np.float32) * rng.permutation([1.0, 0.6, 0.3])
            img = np.where(m[None], colour[:, None, None], img)
            masks[i][m] = kind + 1
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(kind)
            image.append(i)
        noise = _NOISE * (LOW_LIGHT_NOISE if group[i] == 1 else 1.0)
        gain = LOW_LIGHT_GAIN if group[i] == 1 else 1.0
        images[i] = gain * img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    found = Boxes(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                  np.asarray(image, np.int64))
    return images, found, masks


def _groups(n: int, minority_fraction: float, rng: np.random.Generator) -> np.ndarray:
    g = np.zeros(n, np.int64)
    k = max(1, int(round(minority_fraction * n)))
    g[rng.choice(n, size=k, replace=False)] = 1
    return g


def make_scene_task(n_train: int = 2000, n_test: int = 600, minority_fraction: float = 0.1,
                    seed: int = 0) -> SceneTask:
    """Training and test scenes (module docstring), normalised with the training set's statistics."""
    if n_train < 2 or n_test < 2 or not 0.0 < minority_fraction < 0.5:
        raise ConfigError(f"make_scene_task: n_train={n_train}, n_test={n_test} must be >= 2 and "
                          f"minority_fraction={minority_fraction} in (0, 0.5)")
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        group = _groups(n, minority_fraction, rng)
        images, boxes, masks = _render(n, group, rng)
        splits.append((images, group, boxes, masks))
    mean = splits[0][0].mean(axis=(0, 2, 3), keepdims=True)
    std = splits[0][0].std(axis=(0, 2, 3), keepdims=True) + 1e-6
    train, test = (SceneSplit(((im - mean) / std).astype(np.float32), g, b, m) for im, g, b, m in splits)
    return SceneTask(train, test, mean.reshape(-1), std.reshape(-1))
