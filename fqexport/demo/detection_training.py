"""Training of the demo's detectors and segmenter (:mod:`fqexport.demo.detectors`) on scenes with
known boxes and masks (:mod:`fqexport.demo.scenes`): simplified YOLO losses on the decoded output.

Targets, assigned once per dataset:

- YOLOv5 layout: a box is assigned, at each stride, to every anchor whose width and height are
  within a factor 4 of the box's, in the cell holding the box centre and its two neighbours
  nearest the centre;
- YOLOv8 layout: a box is assigned to the cells of its stride (8 for boxes up to 16 pixels across,
  else 16) whose centre lies inside it (the cell holding its centre when none does).

Loss per batch, with P assigned anchors: 5 × the mean ``1 − IoU`` of their boxes, plus binary
cross-entropy summed and divided by P: of the class probabilities (YOLOv5: at the assigned
anchors, one-hot; YOLOv8: at every anchor, one-hot at the assigned ones, 0 elsewhere) and, for
YOLOv5, of the objectness (1 at assigned anchors, 0 elsewhere). The segmenter trains with
per-pixel cross-entropy.
AdamW with a cosine schedule; a fixed seed gives the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fqexport.calibration.annotations import Boxes
from fqexport.demo.detectors import STRIDES, V5_ANCHORS, YoloV5
from fqexport.errors import ConfigError
from fqexport.metrics.boxes import paired_iou_xywh

_EPS = 1e-6


@dataclass(frozen=True)
class Assigned:
    """Positive anchors over a dataset: image, anchor index, the box (cx, cy, w, h) and its class."""

    image: np.ndarray
    anchor: np.ndarray
    box: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class DetTrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"DetTrainConfig: epochs={self.epochs}, batch_size={self.batch_size} must be >= 1 "
                              f"and lr={self.lr} > 0")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                     boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)


def assign_v5(gt: Boxes, image_size: int) -> Assigned:
    """YOLOv5 targets (module docstring): anchor index = level offset + a·ny·nx + gy·nx + gx."""
    xywh = _xywh(gt.boxes)
    rows: list[tuple[int, int, int]] = []
    offset = 0
    for s, anchors in zip(STRIDES, V5_ANCHORS):
        n = image_size // s
        for a, (aw, ah) in enumerate(anchors):
            ratio = np.maximum.reduce([xywh[:, 2] / aw, aw / xywh[:, 2], xywh[:, 3] / ah, ah / xywh[:, 3]])
            for b in np.flatnonzero(ratio < 4.0):
                fx, fy = xywh[b, 0] / s, xywh[b, 1] / s
                gx, gy = min(int(fx), n - 1), min(int(fy), n - 1)
                # the centre cell and its two neighbours nearest the centre (YOLOv5's 0.5 offsets)
                nx = gx - 1 if fx - gx < 0.5 else gx + 1
                ny = gy - 1 if fy - gy < 0.5 else gy + 1
                for cx, cy in ((gx, gy), (nx, gy), (gx, ny)):
                    if 0 <= cx < n and 0 <= cy < n:
                        rows.append((b, int(gt.image[b]), offset + a * n * n + cy * n + cx))
        offset += len(anchors) * n * n
    return _assigned(rows, gt, xywh)


def assign_v8(gt: Boxes, image_size: int) -> Assigned:
    """YOLOv8 targets (module docstring): anchor index = level offset + gy·n + gx."""
    xywh = _xywh(gt.boxes)
    rows: list[tuple[int, int, int]] = []
    offsets = np.cumsum([0] + [(image_size // s) ** 2 for s in STRIDES])
    for b in range(len(gt)):
        level = 0 if max(xywh[b, 2], xywh[b, 3]) <= 16 else 1
        s, n = STRIDES[level], image_size // STRIDES[level]
        centres = (np.arange(n) + 0.5) * s
        xs = np.flatnonzero((centres > gt.boxes[b, 0]) & (centres < gt.boxes[b, 2]))
        ys = np.flatnonzero((centres > gt.boxes[b, 1]) & (centres < gt.boxes[b, 3]))
        if not xs.size or not ys.size:
            xs = np.array([min(int(xywh[b, 0] // s), n - 1)])
            ys = np.array([min(int(xywh[b, 1] // s), n - 1)])
        for gy in ys:
            for gx in xs:
                rows.append((b, int(gt.image[b]), int(offsets[level] + gy * n + gx)))
    return _assigned(rows, gt, xywh)


def _assigned(rows: list[tuple[int, int, int]], gt: Boxes, xywh: np.ndarray) -> Assigned:
    if not rows:
        return Assigned(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    b, img, k = (np.asarray(v, dtype=np.int64) for v in zip(*rows))
    return Assigned(img, k, xywh[b].astype(np.float32), gt.labels[b])


def _bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), target, reduction="sum")


def detection_loss(out: torch.Tensor, targets: Assigned, image_ids: np.ndarray, layout: str) -> torch.Tensor:
    """The batch's loss (module docstring); ``image_ids``: the dataset indices of the batch's images."""
    rows = out if layout == "v5" else out.transpose(1, 2)  # [B, K, 4 + ...]
    where = {int(i): j for j, i in enumerate(image_ids)}
    sel = np.flatnonzero(np.isin(targets.image, image_ids))
    b = torch.as_tensor([where[int(i)] for i in targets.image[sel]], dtype=torch.long)
    k = torch.as_tensor(targets.anchor[sel], dtype=torch.long)
    box_t = torch.as_tensor(targets.box[sel])
    cls_first = 5 if layout == "v5" else 4
    positives = max(len(sel), 1)
    cls_t = torch.zeros_like(rows[..., cls_first:])
    cls_t[b, k, torch.as_tensor(targets.label[sel], dtype=torch.long)] = 1.0
    if layout == "v5":  # classes at the assigned anchors; objectness everywhere
        obj_t = torch.zeros_like(rows[..., 4])
        obj_t[b, k] = 1.0
        loss = (_bce(rows[b, k, cls_first:], cls_t[b, k]) + _bce(rows[..., 4], obj_t)) / positives
    else:
        loss = _bce(rows[..., cls_first:], cls_t) / positives
    if len(sel):
        loss = loss + 5.0 * (1 - paired_iou_xywh(rows[b, k, :4], box_t)).mean()
    return loss


def _train(model: nn.Module, x: np.ndarray, loss_of: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
           config: DetTrainConfig, on_epoch: Callable[[int, float], None] | None) -> nn.Module:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for s in range(0, len(x), config.batch_size):
            idx = np.sort(order[s:s + config.batch_size])
            loss = loss_of(model(torch.from_numpy(x[idx])), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(x))
    return model.eval()


def train_detector(model: nn.Module, x: np.ndarray, boxes: Boxes, config: DetTrainConfig | None = None,
                   on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train a :class:`~fqexport.demo.detectors.YoloV5` or ``YoloV8`` in place on images ``x`` and
    their ``boxes``; returns it in eval mode."""
    config = config or DetTrainConfig()
    layout = "v5" if isinstance(model, YoloV5) else "v8"
    targets = (assign_v5 if layout == "v5" else assign_v8)(boxes, int(x.shape[-1]))
    return _train(model, x, lambda out, idx: detection_loss(out, targets, idx, layout), config, on_epoch)


def train_segmenter(model: nn.Module, x: np.ndarray, masks: np.ndarray, config: DetTrainConfig | None = None,
                    on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train a segmenter in place with per-pixel cross-entropy; returns it in eval mode."""
    config = config or DetTrainConfig()
    m = torch.from_numpy(masks)
    return _train(model, x, lambda out, idx: F.cross_entropy(out, m[idx]), config, on_epoch)
