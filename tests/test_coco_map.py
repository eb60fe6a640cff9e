"""Tests of fqexport/metrics/coco_map.py: pycocotools' mAP restricted to a set of images, on cases
whose precision-recall curves are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fqexport.metrics.boxes import Detections
from fqexport.metrics.coco_map import coco_map

pytest.importorskip("pycocotools")

GT = (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([0]))


def _dets(boxes, scores, labels) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(labels, np.int64))


def test_a_true_positive_ranked_first_scores_one():
    found = [_dets([[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.8], [0, 0])]
    assert coco_map([GT], found, 1) == pytest.approx((1.0, 1.0))


def test_a_false_positive_ranked_first_halves_the_precision():
    # rank 1: FP (precision 0), rank 2: TP (precision 1/2, recall 1): interpolated precision 0.5
    found = [_dets([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    assert coco_map([GT], found, 1) == pytest.approx((0.5, 0.5))


def test_iou_062_counts_at_three_of_ten_thresholds():
    found = [_dets([[0, 0, 10, 6.2]], [0.9], [0])]  # IoU 0.62: TP at 0.50, 0.55, 0.60 only
    assert coco_map([GT], found, 1) == pytest.approx((0.3, 1.0))


def test_restricted_to_images_and_edge_cases():
    truth = [GT, (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([1]))]
    found = [_dets([[0, 0, 10, 10]], [0.9], [0]), _dets([[0, 0, 10, 10]], [0.9], [0])]  # image 1: wrong class
    assert coco_map(truth, found, 2, images=[0]) == pytest.approx((1.0, 1.0))
    assert coco_map(truth, found, 2, images=[1]) == pytest.approx((0.0, 0.0))
    assert coco_map(truth, [_dets([], [], []), _dets([], [], [])], 2) == (0.0, 0.0)  # no detection at all
    none = [(np.zeros((0, 4)), np.zeros(0, np.int64))]
    assert all(math.isnan(v) for v in coco_map(none, [_dets([[0, 0, 1, 1]], [0.5], [0])], 1))  # no ground truth
