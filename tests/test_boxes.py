"""Tests of fqexport/metrics/boxes.py: IoU, NMS and per-image box selection on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.metrics.boxes import box_iou, class_nms, nms, paired_diou_xywh, select_boxes, xywh_to_xyxy

A = [0.0, 0.0, 10.0, 10.0]
B = [1.0, 1.0, 11.0, 11.0]  # overlaps A by 9x9 = 81 of 100 + 100 - 81 = 119
C = [20.0, 20.0, 30.0, 30.0]


def test_box_iou_by_hand():
    iou = box_iou(np.array([A, B]), np.array([B, C]))
    assert iou[0, 0] == pytest.approx(81 / 119)
    assert iou[0, 1] == 0.0 and iou[1, 0] == pytest.approx(1.0)
    assert box_iou(np.array([[0, 0, 0, 0.0]]), np.array([[0, 0, 0, 0.0]]))[0, 0] == 0.0  # empty union


def test_xywh_to_xyxy():
    np.testing.assert_allclose(xywh_to_xyxy(np.array([[5.0, 6.0, 4.0, 2.0]])), [[3.0, 5.0, 7.0, 7.0]])


def test_nms_suppresses_the_overlapping_lower_score():
    boxes, scores = np.array([A, B, C]), np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]  # 0.68 <= 0.7: kept


def test_class_nms_keeps_overlapping_boxes_of_other_classes_and_caps_max_det():
    boxes, scores = np.array([A, B, C]), np.array([0.9, 0.8, 0.7])
    assert class_nms(boxes, scores, np.array([0, 1, 0]), 0.5, 10).tolist() == [0, 1, 2]
    assert class_nms(boxes, scores, np.array([0, 0, 0]), 0.5, 10).tolist() == [0, 2]
    assert class_nms(boxes, scores, np.array([0, 1, 0]), 0.5, 2).tolist() == [0, 1]


def test_select_boxes_takes_each_anchors_best_class_above_conf():
    scores = np.array([[0.1, 0.9], [0.85, 0.2], [0.05, 0.1]])
    d = select_boxes(np.array([A, B, C]), scores, conf=0.25, iou=0.5, max_det=10)
    assert d.labels.tolist() == [1, 0] and d.scores.tolist() == pytest.approx([0.9, 0.85])
    assert len(d.above(0.88)) == 1


def test_select_boxes_multi_label_keeps_every_class_above_conf_as_yolo_validators_do():
    """The mAP kept each anchor's best class only, 8-9 points below the user's own YOLOv5/Ultralytics
    validation (multi_label=True) on the same outputs, undocumented (survey 55)."""
    scores = np.array([[0.4, 0.9], [0.85, 0.2], [0.05, 0.1]])
    d = select_boxes(np.array([A, B, C]), scores, conf=0.25, iou=0.5, max_det=10, multi_label=True)
    # anchor 0 as class 1 (0.9) and class 0 (0.4); anchor 1's class 0 (0.85) overlaps anchor 0's class 0
    # by IoU 0.68 > 0.5 and scores higher, so NMS drops anchor 0's class-0 box; anchor 2 is below conf
    assert sorted(zip(d.labels.tolist(), [round(float(v), 2) for v in d.scores])) == [(0, 0.85), (1, 0.9)]
    d = select_boxes(np.array([A, C]), np.array([[0.4, 0.9], [0.3, 0.1]]), conf=0.25, iou=0.5, max_det=10,
                     multi_label=True)
    assert sorted(zip(d.labels.tolist(), [round(float(v), 2) for v in d.scores])) == [(0, 0.3), (0, 0.4), (1, 0.9)]
    np.testing.assert_array_equal(d.boxes[np.isclose(d.scores, 0.3)], [C])
    assert len(select_boxes(np.array([A, C]), np.array([[0.4, 0.9], [0.3, 0.1]]), 0.25, 0.5, 10)) == 2  # best class
    d = select_boxes(np.array([A, C]), np.array([[0.4, 0.9], [0.3, 0.1]]), conf=0.25, iou=0.5, max_det=2,
                     multi_label=True)
    assert [round(float(v), 2) for v in d.scores] == [0.9, 0.4]  # max_det keeps the best


def test_diou_is_iou_for_concentric_boxes_and_moves_boxes_that_do_not_overlap():
    a = torch.tensor([[10.0, 10.0, 4.0, 4.0]])
    np.testing.assert_allclose(paired_diou_xywh(a, torch.tensor([[10.0, 10.0, 2.0, 4.0]])).numpy(), [0.5], rtol=1e-6)
    # apart: IoU 0 (no gradient), DIoU = -rho^2 / c^2 = -(10^2) / (14^2 + 4^2)
    far = torch.tensor([[20.0, 10.0, 4.0, 4.0]], requires_grad=True)
    np.testing.assert_allclose(paired_diou_xywh(a, far).detach().numpy(), [-100 / 212], rtol=1e-6)
    paired_diou_xywh(a, far).sum().backward()
    assert far.grad[0, 0] < 0  # raising DIoU moves the far box's centre towards a


def test_the_detection_check_compares_boxes_when_none_reaches_the_deploy_confidence():
    """Every score 0.25 (below deploy_conf + margin): "100 % of 0 boxes" passed a file whose boxes
    had all moved (survey 21); now boxes at half the reference's top score are compared."""
    from fqexport.tasks import Detection

    rng = np.random.default_rng(0)
    want = np.zeros((8, 16, 7), np.float32)  # YOLOv5 [N, K, 5 + 2]
    want[..., :4] = rng.random((8, 16, 4)) * 16
    want[..., 4:6] = 0.5
    moved = want.copy()
    moved[..., :4] = rng.random((8, 16, 4)) * 16
    c = Detection(layout="v5").compare(moved, want)
    assert c.samples > 0 and not c.passed and "at confidence 0.125" in c.summary
    same = Detection(layout="v5").compare(want.copy(), want)
    assert same.samples > 0 and same.passed and same.agreement == 1.0
