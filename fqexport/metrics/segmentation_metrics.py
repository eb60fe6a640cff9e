"""Segmentation metrics from a confusion matrix: mIoU, Dice and pixel accuracy of a set of images.

Pure numpy. Over the pixels of the set that are not ``ignore_index``, with ``M[t, p]`` the
count of pixels of true class t predicted as p, per class c: ``TP = M[c, c]``,
``FP = Σ_t M[t, c] − TP``, ``FN = Σ_p M[c, p] − TP``;
``IoU_c = TP / (TP + FP + FN)``, ``Dice_c = 2 TP / (2 TP + FP + FN)``; mIoU and Dice are the
means over the classes present in the set's truth or predictions (a class absent from both is
left out, as torchmetrics and mmseg do); pixel accuracy ``Σ_c TP / Σ M``.
"""

from __future__ import annotations

import math

import numpy as np


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """``M [C, C]`` (int64) of predicted class ids ``pred`` against ``truth`` (same shape)."""
    keep = truth != ignore_index
    t = truth[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(m: np.ndarray) -> dict[str, float]:
    """``{"miou", "dice", "pixel_accuracy"}`` of a confusion matrix (module docstring); NaN when
    the set has no counted pixel."""
    m = np.asarray(m, dtype=np.float64)
    tp = np.diag(m)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return {"miou": math.nan, "dice": math.nan, "pixel_accuracy": math.nan}
    iou = tp[present] / (tp + fp + fn)[present]
    dice = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return {"miou": float(iou.mean()), "dice": float(dice.mean()), "pixel_accuracy": float(tp.sum() / m.sum())}
