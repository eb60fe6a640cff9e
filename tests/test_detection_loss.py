"""Tests of fqexport/tasks/detection_loss.py: positives assigned from the float model's decoded boxes,
and the YOLO-style loss per image that fine-tuning adds when the data has boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.annotations import Boxes
from fqexport.tasks import Detection, Segmentation
from fqexport.tasks.detection_loss import assign, train_loss


def _pred():
    """Four anchors (cx, cy, w, h) and their scores of 2 classes."""
    boxes = torch.tensor([[10.0, 10.0, 8.0, 8.0],    # on box A
                          [11.0, 10.0, 8.0, 8.0],    # near box A, lower score
                          [40.0, 40.0, 10.0, 10.0],  # on box B
                          [60.0, 5.0, 4.0, 4.0]])    # background
    scores = torch.tensor([[0.9, 0.0], [0.3, 0.0], [0.0, 0.8], [0.1, 0.1]])
    return boxes, scores


def test_assign_takes_the_aligned_anchors_of_each_box_and_leaves_background_negative():
    boxes, scores = _pred()
    gt = torch.tensor([[6.0, 6.0, 14.0, 14.0], [35.0, 35.0, 45.0, 45.0]])
    t = assign(boxes, scores, gt, torch.tensor([0, 1]), topk=1)
    assert t[:, 0].tolist() == [0.0, -1.0, 1.0, -1.0]  # top-1: the better aligned anchor of A
    np.testing.assert_allclose(t[0, 2:].numpy(), [10, 10, 8, 8])
    np.testing.assert_allclose(t[2, 2:].numpy(), [40, 40, 10, 10])
    assert t[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]  # each box's best anchor aims at its IoU (1 here)
    t2 = assign(boxes, scores, gt, torch.tensor([0, 1]), topk=10)
    assert t2[:, 0].tolist() == [0.0, 0.0, 1.0, -1.0]  # both anchors inside A
    # anchor 1 (IoU 7·8 / (64 + 64 − 56) = 7/9, score 0.3) aims at its alignment over the best's
    iou1 = 7 / 9
    np.testing.assert_allclose(float(t2[1, 1]), (0.3 ** 0.5 * iou1 ** 6) / 0.9 ** 0.5, rtol=1e-5)
    v5 = assign(boxes, scores, gt, torch.tensor([0, 1]), topk=10, objectness=True)
    np.testing.assert_allclose(v5[:, 1].numpy(), [1.0, iou1, 1.0, 0.0], rtol=1e-5)  # YOLOv5: its own IoU


def test_assign_gives_a_box_without_candidates_its_best_overlap_and_no_box_no_positive():
    boxes, scores = _pred()
    # the box holds no predicted centre: the anchor of largest IoU becomes its positive
    t = assign(boxes, scores, torch.tensor([[56.0, 0.5, 59.0, 4.0]]), torch.tensor([1]))
    assert t[:, 0].tolist() == [-1.0, -1.0, -1.0, 1.0]
    empty = assign(boxes, scores, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
    assert (empty[:, 0] == -1).all()


def test_an_anchor_positive_for_two_boxes_keeps_the_larger_overlap():
    boxes, scores = _pred()
    gt = torch.tensor([[0.0, 0.0, 30.0, 30.0], [6.0, 6.0, 14.0, 14.0]])  # both hold anchors 0 and 1
    t = assign(boxes, scores, gt, torch.tensor([1, 0]))
    assert t[0, 0] == 0.0 and t[1, 0] == 0.0  # the tight box B (IoU ~1) wins over the loose one


@pytest.mark.parametrize("objectness", [True, False])
def test_loss_is_smallest_for_the_truth_and_falls_with_gradient_steps(objectness):
    torch.manual_seed(0)
    k, c = 6, 3
    targets = torch.full((2, k, 6), -1.0)
    targets[:, :, 1] = 0.0
    targets[0, 1] = torch.tensor([2.0, 1.0, 20.0, 20.0, 10.0, 10.0])
    targets[1, 4] = torch.tensor([0.0, 1.0, 30.0, 12.0, 6.0, 8.0])
    extra = 1 if objectness else 0

    def perfect():
        rows = torch.zeros(2, k, 4 + extra + c)
        rows[..., :4] = torch.tensor([5.0, 5.0, 2.0, 2.0])
        for b, a in ((0, 1), (1, 4)):
            rows[b, a, :4] = targets[b, a, 2:]
            rows[b, a, 4 + extra + int(targets[b, a, 0])] = 1.0
            if objectness:
                rows[b, a, 4] = 1.0
        return rows

    good = train_loss(perfect(), targets, objectness)
    assert good.shape == (2,) and float(good.max()) < 1e-3
    logits = torch.randn(2, k, 4 + extra + c, requires_grad=True)

    def rows_of(z):
        return torch.cat([5 + 30 * torch.sigmoid(z[..., :4]), torch.sigmoid(z[..., 4:])], -1)

    opt = torch.optim.Adam([logits], lr=0.1)
    first = float(train_loss(rows_of(logits), targets, objectness).sum().detach())
    for _ in range(100):
        loss = train_loss(rows_of(logits), targets, objectness).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.0 and float(loss.detach()) < 0.2 * first


def test_detection_targets_come_from_the_data_boxes_and_are_none_without_them():
    task = Detection(layout="v8")
    # one image, 3 anchors in layout v8 [N, 4 + C, K]: anchor 2 sits on the box
    rows = torch.tensor([[[5, 5, 3, 3, 0.1, 0.2], [30, 30, 4, 4, 0.1, 0.1], [20, 20, 10, 10, 0.1, 0.9]]])
    out = rows.transpose(1, 2)

    class Data:
        annotations = Boxes(np.array([[15.0, 15.0, 25.0, 25.0]], np.float32), np.array([1]), np.array([0]))

    t = task.train_targets(Data, out)
    assert t.shape == (1, 3, 6) and t[0, :, 0].tolist() == [-1.0, -1.0, 1.0]
    assert float(task.train_loss(out, t)[0]) < float(task.train_loss(out.flip(2), t)[0])

    class NoBoxes:
        annotations = None

    assert task.train_targets(NoBoxes, out) is None


def test_segmentation_training_loss_is_cross_entropy_over_counted_pixels():
    from fqexport.calibration.annotations import Masks
    task = Segmentation()
    masks = np.array([[[0, 1], [255, 1]]])

    class Data:
        annotations = Masks(masks, ignore_index=255)

    t = task.train_targets(Data, torch.zeros(1, 2, 2, 2))
    assert t.tolist() == [[[0, 1], [-100, 1]]]
    logits = torch.tensor([[[[2.0, 0.0], [9.0, 0.0]], [[0.0, 2.0], [-9.0, 2.0]]]])
    want = float(torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])))
    np.testing.assert_allclose(task.train_loss(logits, t).numpy(), [want], rtol=1e-6)  # the ignored pixel is not counted
