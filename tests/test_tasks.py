"""Tests of fqexport/tasks: each task's output check, losses, per-group metrics and export-check
comparison, and how a run's task is given, read back or inferred."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.annotations import Boxes, Masks
from fqexport.calibration.group_data import GroupData
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.tasks import Classification, Detection, Segmentation, make_task, resolve_task, task_from_dict
from fqexport.tasks.segmentation import MSG_ONE_CHANNEL

pytest.importorskip("pycocotools")


def _v5(boxes_xywh, obj, cls):
    """A YOLOv5-layout output [1, K, 5 + C] from per-anchor rows."""
    return np.concatenate([np.asarray(boxes_xywh, np.float32), np.asarray(obj, np.float32)[:, None],
                           np.asarray(cls, np.float32)], 1)[None]


TWO = _v5([[5, 5, 10, 10], [25, 25, 10, 10], [5.2, 5, 10, 10]], [0.9, 0.8, 0.5], [[1, 0], [0, 1], [1, 0]])


def test_detection_decodes_both_layouts_to_the_same_boxes():
    v5 = Detection(layout="v5")
    boxes, scores = v5.decode(TWO)
    np.testing.assert_allclose(boxes[0, 0], [0, 0, 10, 10])
    np.testing.assert_allclose(scores[0, :, :], [[0.9, 0], [0, 0.8], [0.5, 0]])
    rows = TWO[0]
    v8_out = np.concatenate([rows[:, :4], rows[:, 5:] * rows[:, 4:5]], 1).T[None]  # [1, 4 + C, K]
    b8, s8 = Detection(layout="v8").decode(v8_out)
    np.testing.assert_allclose(b8, boxes)
    np.testing.assert_allclose(s8, scores)
    d = v5.detections(TWO, 0.25)[0]  # the third box overlaps the first (IoU 0.96): suppressed
    assert d.labels.tolist() == [0, 1] and d.scores.tolist() == pytest.approx([0.9, 0.8])


def test_detection_compare_passes_rounding_and_fails_collapsed_scores():
    det = Detection()
    want = np.repeat(TWO, 4, axis=0)
    ok = det.compare(want + np.float32(0.01), want)
    assert ok.passed and ok.agreement == 1.0 and ok.samples == 16  # 2 decided boxes per image, both ways
    collapsed = want.copy()
    collapsed[..., 4] = 0.0  # what ORT's quantize_static does to the decoded objectness
    bad = det.compare(collapsed, want)
    assert not bad.passed and bad.agreement == 0.0
    assert bad.summary.startswith("agrees with the PyTorch fake-quant reference on only 0.00% of 8 boxes kept "
                                  "after NMS at confidence 0.25 ± 0.05")
    moved = want.copy()
    moved[..., 0] += 8.0  # every box 8 pixels to the right: IoU 0.11
    assert not det.compare(moved, want).passed


def test_detection_loss_is_zero_on_the_teacher_and_grows_with_the_error():
    det = Detection()
    t = torch.from_numpy(np.repeat(TWO, 2, 0))
    assert det.sample_loss(t, t).abs().max() < 1e-4
    s = t.clone()
    s[1, :, 0] += 3.0
    loss = det.sample_loss(s, t)
    assert loss[0] < 1e-4 < loss[1]


def test_detection_metrics_per_group_with_and_without_boxes():
    det = Detection()
    out = np.repeat(TWO, 2, 0)
    truth = Boxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32), np.array([0, 1, 1]),
                  np.array([0, 0, 1]))
    data = GroupData(np.zeros((2, 3, 32, 32), np.float32), None, np.array([0, 1]), ("a", "b"), "d", truth)
    m = det.evaluate(out, data)
    assert m.primary == "map" and m.metric_names == ("map", "map50", "loss")
    assert m.by_group["a"]["map"] == pytest.approx(1.0)
    assert m.by_group["b"]["map50"] < 0.5  # its box is class 1, the detector says 0 there
    assert m.group_min() == ("b", m.by_group["b"]["map"])
    bare = GroupData(data.x, None, data.group, data.group_names, "d")
    pseudo = det.evaluate(out, bare, reference=out)  # the float model's detections as ground truth
    assert pseudo.overall["map"] == pytest.approx(1.0) and pseudo.overall["loss"] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(DataError, match="no boxes"):
        det.evaluate(out, bare)


def test_detection_output_checks_name_the_layout():
    data = GroupData(np.zeros((2, 3, 8, 8), np.float32), None, np.array([0, 1]), ("a", "b"), "d.npz")
    assert Detection().check_output(torch.zeros(2, 10, 8), data) == 3
    assert Detection(layout="v8").check_output(torch.zeros(2, 7, 10), data) == 3
    with pytest.raises(DataError, match=r"d.npz: .*not a detector's \[batch, anchors, 5 \+ classes\]"):
        Detection().check_output(torch.zeros(2, 10), data)
    with pytest.raises(ModelLoadError, match="not a detector's"):
        Detection().check_outputs(np.zeros((2, 5)), "m.onnx", data)
    with pytest.raises(ConfigError, match=r"Detection.iou=1.5 must be in \[0, 1\]"):
        Detection(iou=1.5)


def test_a_layout_that_reads_more_classes_than_anchors_is_warned_about(caplog):
    data = GroupData(np.zeros((2, 3, 8, 8), np.float32), None, np.array([0, 1]), ("a", "b"), "d.npz")
    with caplog.at_level("WARNING", logger="fqexport.tasks.detection"):
        assert Detection(layout="v8").check_output(torch.zeros(2, 567, 10), data) == 563  # a v5 output read as v8
    assert ("layout 'v8' reads the model's output (2, 567, 10) as 563 classes over 10 anchors; a detector has more "
            "anchors than classes: check --layout (layout 'v5' would read 567 anchors and 5 classes)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fqexport.tasks.detection"):
        Detection().check_output(torch.zeros(2, 567, 10), data)
        Detection(layout="v8").check_output(torch.zeros(2, 9, 567), data)
    assert caplog.text == ""
    # validate's check of the session's outputs warns alike: --layout v5 on a v8 file gave 0.3 % mAP silently (survey 36)
    with caplog.at_level("WARNING", logger="fqexport.tasks.detection"):
        Detection(layout="v5").check_outputs(np.zeros((2, 6, 16), np.float32), "v8.onnx", data)
    assert "layout 'v5' reads the model's output (2, 6, 16) as 11 classes over 6 anchors" in caplog.text


def test_detection_map_counts_every_class_above_conf_unless_single_label():
    """An anchor's second class that matches the ground truth counts for the mAP, as the YOLO
    validators count it (survey 55: fqexport's mAP was 8-9 points below the user's own)."""
    out = _v5([[10, 10, 10, 10]], [1.0], [[0.4, 0.9]])  # one anchor: class 1 at 0.9, class 0 at 0.4
    data = GroupData(np.zeros((1, 3, 32, 32), np.float32), None, np.array([0]), ("a",), "d.npz",
                     Boxes(np.array([[5.0, 5.0, 15.0, 15.0]]), np.array([0]), np.array([0])))
    multi = Detection().evaluate(out, data).by_group["a"]
    single = Detection(multi_label=False).evaluate(out, data).by_group["a"]
    assert multi["map50"] == pytest.approx(1.0) and single["map50"] == 0.0
    with pytest.raises(ConfigError, match="Detection.multi_label='yes' must be True or False"):
        Detection(multi_label="yes")
    assert task_from_dict(Detection(multi_label=False).to_dict()) == Detection(multi_label=False)


def _v8_output(classes: int, anchors: int, seed: int = 0) -> torch.Tensor:
    """A YOLOv8-layout output [2, 4 + C, K]: pixel boxes (up to 64 px), then class probabilities."""
    gen = torch.Generator().manual_seed(seed)
    boxes = 64 * torch.rand(2, 4, anchors, generator=gen)
    return torch.cat([boxes, torch.rand(2, classes, anchors, generator=gen)], 1)


def test_the_layout_is_read_from_the_scores_where_the_shape_misleads():
    """A one-level YOLOv8 head with more classes than anchors ([N, 24, 16]: 20 classes, 16 anchors) was read
    as YOLOv5 by its shape alone: pixel coordinates became the scores, and every mAP, the export check and
    the gate measured nothing, exit 0 (survey 55)."""
    img = GroupData(np.zeros((2, 3, 64, 64), np.float32), None, np.array([0, 1]), ("a", "b"), "d.npz",
                    Boxes(np.array([[1.0, 1.0, 9.0, 9.0]]), np.array([0]), np.array([0])))
    v8 = _v8_output(20, 16)
    assert resolve_task(None, img, v8)[0] == Detection(layout="v8")
    v5 = v8.transpose(1, 2).contiguous()[..., [0, 1, 2, 3, 4, *range(4, 24)]]  # [2, 16, 25]: obj + 20 classes
    assert resolve_task(None, img, v5)[0] == Detection(layout="v5")
    # scores both readings accept (all values in [0, 1]) or neither: the shape decides, as before
    assert resolve_task(None, img, torch.rand(2, 7, 80))[0] == Detection(layout="v8")
    assert resolve_task(None, img, torch.rand(2, 24, 16))[0] == Detection(layout="v5")
    assert resolve_task(None, img, 5 + torch.rand(2, 16, 24))[0] == Detection(layout="v8")
    # the scores settle it: no "more classes than anchors" warning for the v8 reading
    assert Detection(layout="v8").check_output(v8, img) == 20
    assert ("v8", (24, 16)) not in __import__("fqexport.tasks.detection", fromlist=["_"])._warned_layouts


def test_a_layout_whose_scores_are_not_probabilities_is_refused_where_the_other_reads_them():
    """compress --layout v5 on a YOLOv8 model warned about the anchor count, wrote the file, and validate's
    drop-only gate passed with every group at 0 mAP (survey 55)."""
    data = GroupData(np.zeros((2, 3, 64, 64), np.float32), None, np.array([0, 1]), ("a", "b"), "d.npz")
    v8 = _v8_output(2, 64)
    with pytest.raises(ConfigError, match=r"layout 'v5' reads the model's output \(2, 6, 64\) as scores .* that reach "
                                          r"6\d\.\d+, outside \[0, 1\], while layout 'v8' reads probabilities there: "
                                          r"pass --layout v8"):
        Detection(layout="v5").check_output(v8, data)
    with pytest.raises(ConfigError, match="pass --layout v8"):
        Detection(layout="v5").check_outputs(v8.numpy(), "v8.onnx", data)
    assert Detection(layout="v8").check_output(v8, data) == 2
    # neither reading holds probabilities (score logits): nothing to tell them apart by, no refusal
    assert Detection(layout="v5").check_output(v8 * 10 - 5, data) == 59


def test_segmentation_metrics_loss_and_compare():
    seg = Segmentation()
    logits = np.zeros((2, 3, 2, 2), np.float32)
    logits[:, 1] = 1.0  # everything class 1
    masks = np.array([[[1, 1], [1, 1]], [[0, 1], [2, 255]]])
    data = GroupData(np.zeros((2, 3, 2, 2), np.float32), None, np.array([0, 1]), ("a", "b"), "s", Masks(masks))
    m = seg.evaluate(logits, data)
    assert m.by_group["a"]["miou"] == pytest.approx(1.0)
    # group b: 3 counted pixels, class 1 right once; classes 0 and 2 IoU 0, class 1 IoU 1/3
    assert m.by_group["b"]["miou"] == pytest.approx((0 + 1 / 3 + 0) / 3)
    assert m.by_group["b"]["pixel_accuracy"] == pytest.approx(1 / 3)
    t = torch.from_numpy(logits)
    assert seg.sample_loss(t, t).abs().max() < 1e-6
    flipped = logits.copy()
    flipped[:, 2] = 2.0
    assert not seg.compare(flipped, logits).passed and seg.compare(logits + 0.001, logits).passed
    with pytest.raises(DataError, match=r"not per-pixel logits \[batch, classes, 2, 2\]"):
        seg.check_output(torch.zeros(2, 3, 4, 4), data)
    # a single (sigmoid) logit per pixel: every argmax is 0, nothing would be measured
    with pytest.raises(ModelLoadError) as err:
        seg.check_output(torch.zeros(2, 1, 2, 2), data)
    assert str(err.value) == MSG_ONE_CHANNEL.format(model="the model", channels=1, shape=(2, 1, 2, 2))
    with pytest.raises(ModelLoadError, match=r"model m.onnx returns 1 channel\(s\) per pixel"):
        seg.check_outputs(np.zeros((2, 1, 2, 2)), "m.onnx", data)


def test_a_segmentation_image_without_a_counted_pixel_has_no_loss():
    """Not 0 (a perfect score): NaN, left out of its group's and the overall mean, like its mIoU."""
    seg = Segmentation()
    logits = np.random.default_rng(0).normal(size=(3, 3, 2, 2)).astype(np.float32)
    masks = np.array([[[0, 1], [2, 1]], [[1, 1], [0, 255]], [[255, 255], [255, 255]]])
    data = GroupData(np.zeros((3, 3, 2, 2), np.float32), None, np.array([0, 0, 1]), ("a", "b"), "s", Masks(masks))
    losses = seg.sample_losses(logits, data, None)
    assert np.isfinite(losses[:2]).all() and (losses[:2] > 0).all() and np.isnan(losses[2])
    m = seg.evaluate(logits, data)
    assert np.isnan(m.by_group["b"]["loss"]) and np.isnan(m.by_group["b"]["miou"])
    assert m.overall["loss"] == pytest.approx(losses[:2].mean()) == m.by_group["a"]["loss"]


def test_classification_is_the_default_and_its_comparison_is_top1():
    data = GroupData(np.zeros((4, 5), np.float32), np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), ("a", "b"), "c")
    task, why = resolve_task(None, data, torch.zeros(4, 2))
    assert task == Classification() and why == "inferred: the data holds no boxes or masks"
    c = task.compare(np.eye(2)[[0, 1, 0, 1]], np.eye(2)[[0, 1, 0, 1]])
    assert c.passed and c.agreement == 1.0


def test_tasks_are_inferred_given_and_read_back():
    img = GroupData(np.zeros((2, 3, 8, 8), np.float32), None, np.array([0, 1]), ("a", "b"), "d")
    assert resolve_task(None, img, torch.zeros(2, 4, 8, 8))[0] == Segmentation()
    assert resolve_task(None, img, torch.zeros(2, 240, 8))[0] == Detection(layout="v5")
    assert resolve_task(None, img, torch.zeros(2, 7, 80))[0] == Detection(layout="v8")
    assert resolve_task("detection", img, torch.zeros(2, 7, 80)) == (Detection(layout="v8"), "given")
    assert resolve_task(None, img, torch.zeros(2, 4, 6, 6))[0] == Classification()  # not the input's size
    det = Detection(layout="v8", iou=0.7)
    assert task_from_dict({**det.to_dict(), "chosen": "given"}) == det
    assert task_from_dict(None) is None
    with pytest.raises(ConfigError, match="task='pose' is not one of classification, detection, segmentation"):
        make_task("pose")


def test_samples_the_reference_flips_at_its_rounding_ties_are_near_ties():
    """ORT and the reference differ only at rounding ties; in a model whose logits turn on them
    (random-weight EfficientNets) 2-4 % of samples flipped and a correct file was refused. A
    sample whose top-1 the jittered reference changes, or that moves by half its margin, is a
    near-tie; the check still fails on flips of stable samples."""
    from fqexport.tasks import Classification

    rng = np.random.default_rng(0)
    want = rng.normal(size=(100, 3)).astype(np.float32) * 10
    shaken = want.copy()
    unstable = np.arange(0, 100, 25)  # 4 samples whose top-1 the reference itself flips
    top = want.argmax(1)
    shaken[unstable, top[unstable]] -= 100.0
    got = want.copy()
    got[unstable, top[unstable]] -= 100.0  # the file flips exactly those
    task = Classification()
    assert not task.compare(got, want).passed  # 4 % flipped: refused without the jitter
    c = task.compare(got, want, shaken)
    from fqexport.tasks.classification import decided, tie_threshold

    n = int(decided(want, tie_threshold(want), shaken).sum())
    assert n == int(decided(want, tie_threshold(want)).sum()) - 4  # the 4 left out
    assert c.passed and c.decided_agreement == 1.0 and f"of the {n} calibration samples" in c.summary
    stable_flips = got.copy()
    stable_flips[[1, 2], top[[1, 2]]] -= 100.0
    assert not task.compare(stable_flips, want, shaken).passed  # 2 stable samples flipped: still refused


def test_rounding_jitter_moves_only_values_near_a_tie_and_leaves_the_callers_rng():
    import torch

    from fqexport.graph.act_quant import ActQuantizer, GroupContext, rounding_jitter

    q = ActQuantizer(lambda: None, GroupContext())
    q.observing, q.scale, q.zero_point = False, 0.1, 0
    x = torch.tensor([0.05, 0.0502, 0.12, 0.3])  # 0.5 step (a tie), 0.002 step past it, 1.2, 3 steps
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    with rounding_jitter(q, 1e-4) as jittered:
        assert getattr(q, "jitter", 0.0) == 0.0  # a copy jitters: q itself (another thread's) is untouched
        shaken = [jittered(x) for _ in range(20)]
    assert torch.equal(torch.rand(2), expected)
    assert {round(float(s[0]), 6) for s in shaken} == {0.0, 0.1}  # the tie goes both ways
    unmoved = q(x)[1:]
    assert all(torch.equal(s[1:], unmoved) for s in shaken)  # the others never move
