"""Tests of fqexport/metrics/segmentation_metrics.py: mIoU, Dice and pixel accuracy by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fqexport.metrics.segmentation_metrics import confusion, segmentation_scores


def test_confusion_and_scores_by_hand():
    pred = np.array([[0, 1], [1, 1]])
    truth = np.array([[0, 0], [1, 1]])
    m = confusion(pred, truth, 2, ignore_index=255)
    assert m.tolist() == [[1, 1], [0, 2]]
    s = segmentation_scores(m)
    # class 0: TP 1, FN 1 → IoU 1/2, Dice 2/3; class 1: TP 2, FP 1 → IoU 2/3, Dice 4/5
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)


def test_ignored_pixels_and_absent_classes_are_left_out():
    pred = np.array([[0, 1, 2]])
    truth = np.array([[0, 255, 0]])
    m = confusion(pred, truth, 4, ignore_index=255)
    assert m.sum() == 2
    s = segmentation_scores(m)  # classes 0 (IoU 1/2) and 2 (IoU 0) present; 1 and 3 absent
    assert s["miou"] == pytest.approx(0.25)
    assert all(math.isnan(v) for v in segmentation_scores(np.zeros((3, 3))).values())


def test_an_ignore_index_that_is_a_class_id_is_left_out_of_the_means():
    # ignore_index=0 (a background): its pixels are dropped, and a counted pixel predicted as 0 is
    # a miss of its true class, not a class 0 with IoU 0 in the mean (survey 62: 66 % for 99 %)
    truth = np.array([[0, 1, 1, 2, 2, 0]])
    pred = np.array([[1, 1, 0, 2, 2, 0]])
    m = confusion(pred, truth, 3, ignore_index=0)
    assert m.sum() == 4
    s = segmentation_scores(m, ignore_index=0)
    assert s["miou"] == pytest.approx((1 / 2 + 1) / 2)  # class 1: TP 1, FN 1; class 2: exact
    assert s["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)
    assert segmentation_scores(m)["miou"] == pytest.approx((0 + 1 / 2 + 1) / 3)  # without it: class 0 at 0
    # an ignore_index outside the class ids (255, -1) changes nothing
    assert segmentation_scores(m, ignore_index=255) == segmentation_scores(m) == segmentation_scores(m, ignore_index=-1)
