"""Boxes after a detector: IoU, class-aware non-maximum suppression, and box matching.

Pure numpy (no I/O): what runs after the model, outside the ONNX file, as users deploy it.
Boxes are ``[n, 4]`` x1, y1, x2, y2 in pixels.

NMS (greedy, per class): candidates with score >= ``conf`` in descending score order; a box is
kept unless a kept box of the same class overlaps it with IoU > ``iou``; at most ``max_det``
boxes per image. Each anchor proposes its best class only (score = objectness · class
probability for the YOLOv5 layout, the class probability for YOLOv8's); at most
:data:`MAX_CANDIDATES` of an image's best go into NMS (Ultralytics' ``max_nms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_CANDIDATES = 3000

@dataclass(frozen=True)
class Detections:
    """The boxes one image keeps after NMS, in descending score order."""

    boxes: np.ndarray  # float32 [n, 4] xyxy
    scores: np.ndarray  # float32 [n]
    labels: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def above(self, conf: float) -> "Detections":
        keep = self.scores >= conf
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """Centre, width, height → corners: ``(cx − w/2, cy − h/2, cx + w/2, cy + h/2)``."""
    half = b[..., 2:4] / 2.0
    return np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)


def paired_iou_xywh(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of paired boxes ``[..., 4]`` given as centre, width, height (differentiable: the
    detectors' losses)."""
    a1, a2 = a[..., :2] - a[..., 2:4] / 2, a[..., :2] + a[..., 2:4] / 2
    b1, b2 = b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2
    inter = (torch.minimum(a2, b2) - torch.maximum(a1, b1)).clamp_min(0).prod(-1)
    union = a[..., 2:4].clamp_min(0).prod(-1) + b[..., 2:4].clamp_min(0).prod(-1) - inter
    return inter / union.clamp_min(eps)


def paired_diou_xywh(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Distance-IoU of paired boxes (cx, cy, w, h): IoU − ρ²/c², ρ the distance of the centres and c
    the diagonal of the smallest box holding both (Zheng et al., 2020): its gradient moves boxes
    that do not overlap, where IoU's is zero."""
    a1, a2 = a[..., :2] - a[..., 2:4] / 2, a[..., :2] + a[..., 2:4] / 2
    b1, b2 = b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2
    rho2 = (a[..., :2] - b[..., :2]).pow(2).sum(-1)
    c2 = (torch.maximum(a2, b2) - torch.minimum(a1, b1)).pow(2).sum(-1)
    return paired_iou_xywh(a, b, eps) - rho2 / c2.clamp_min(eps)


def box_area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a [n, 4]`` with every box of ``b [m, 4]``: ``[n, m]``, |a∩b| / |a∪b|."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps (one class), highest score first: each box in score
    order is kept unless a kept box overlaps it with IoU > ``iou``."""
    order = np.argsort(-scores, kind="stable")
    overlap = box_iou(boxes[order], boxes[order]) > iou
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[np.asarray(keep, dtype=np.int64)]


def class_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Class-aware NMS: :func:`nms` within each class; the kept indices by descending score,
    at most ``max_det``."""
    kept = [np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou)]
            for c in np.unique(labels)]
    if not kept:
        return np.zeros(0, dtype=np.int64)
    idx = np.concatenate(kept)
    return idx[np.argsort(-scores[idx], kind="stable")][:max_det]


def select_boxes(boxes: np.ndarray, class_scores: np.ndarray, conf: float, iou: float, max_det: int,
                 max_candidates: int = MAX_CANDIDATES, multi_label: bool = False) -> Detections:
    """One image's detections: each anchor's best class (``class_scores [K, C]``) with score >=
    ``conf`` — or, ``multi_label``, every (anchor, class) pair with score >= ``conf``, as YOLOv5's
    ``val.py`` and Ultralytics' validator evaluate mAP — the ``max_candidates`` best of them, then
    :func:`class_nms`. ``boxes [K, 4]`` xyxy."""
    if multi_label and class_scores.shape[1]:
        anchor, labels = np.nonzero(class_scores >= conf)
        scores = class_scores[anchor, labels]
    else:
        labels = class_scores.argmax(axis=1) if class_scores.shape[1] else np.zeros(len(boxes), np.int64)
        scores = class_scores[np.arange(len(boxes)), labels] if len(boxes) else np.zeros(0, np.float32)
        anchor = np.flatnonzero(scores >= conf)
        labels, scores = labels[anchor], scores[anchor]
    if anchor.size > max_candidates:
        top = np.argsort(-scores, kind="stable")[:max_candidates]
        anchor, labels, scores = anchor[top], labels[top], scores[top]
    keep = class_nms(boxes[anchor], scores, labels, iou, max_det)
    return Detections(boxes[anchor[keep]].astype(np.float32), scores[keep].astype(np.float32),
                      labels[keep].astype(np.int64))
