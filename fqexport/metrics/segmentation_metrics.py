"""Segmentation metrics from a confusion matrix: mIoU, Dice and pixel accuracy of a set of images.

Pure numpy. Over the pixels of the set that are not ``ignore_index``, with ``M[t, p]`` the
count of pixels of true class t predicted as p, per class c: ``TP = M[c, c]``,
``FP = Σ_t M[t, c] − TP``, ``FN = Σ_p M[c, p] − TP``;
``IoU_c = TP / (TP + FP + FN)``, ``Dice_c = 2 TP / (2 TP + FP + FN)``; mIoU and Dice are the
means over the classes present in the set's truth or predictions (a class absent from both is
left out, as torchmetrics and mmseg do), never the ignored class itself when ``ignore_index`` is
a class id (``ignore_index=0`` for a background: as torchmetrics' ``JaccardIndex`` gives it
weight 0; a counted pixel predicted as it is a miss of its true class); pixel accuracy
``Σ_c TP / Σ M``.
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


def segmentation_scores(m: np.ndarray, ignore_index: int | None = None) -> dict[str, float]:
    """``{"miou", "dice", "pixel_accuracy"}`` of a confusion matrix (module docstring; the class
    ``ignore_index``, when it is one, is left out of the means); NaN when the set has no counted
    pixel."""
    m = np.asarray(m, dtype=np.float64)
    tp = np.diag(m)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    if ignore_index is not None and 0 <= ignore_index < len(present):
        present[ignore_index] = False  # its pixels were dropped; predictions of it only cost other classes
    if not present.any():
        return {"miou": math.nan, "dice": math.nan, "pixel_accuracy": math.nan}
    iou = tp[present] / (tp + fp + fn)[present]
    dice = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return {"miou": float(iou.mean()), "dice": float(dice.mean()), "pixel_accuracy": float(tp.sum() / m.sum())}
