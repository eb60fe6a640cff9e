"""Tests of calibration/annotations.py and the .npz fields of detection and segmentation data:
boxes and masks follow every subset, and bad input names the file, the field and the first
offending index."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fqexport.calibration.annotations import Boxes, Masks, check_box_labels, check_mask_labels
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import MSG_BOXES_AND_MASKS, save_npz
from fqexport.calibration.readers import load_data, open_stream
from fqexport.errors import DataError

X = np.zeros((4, 3, 8, 10), np.float32)  # height 8, width 10
GROUP = np.array([0, 1, 0, 1])
BOXES = np.array([[0, 0, 4, 4], [1, 1, 10, 8], [2, 2, 3, 3]], np.float32)


def _npz(tmp_path, **fields) -> str:
    path = tmp_path / "det.npz"
    np.savez(path, x=X, group=GROUP, **fields)
    return str(path)


def _error(path) -> str:
    with pytest.raises(DataError) as info:
        load_data(path)
    return str(info.value)


def test_npz_boxes_load_and_follow_a_subset(tmp_path):
    data = load_data(_npz(tmp_path, boxes=BOXES, box_labels=[0, 2, 1], box_image=[0, 2, 2]))
    assert isinstance(data.annotations, Boxes) and len(data.annotations) == 3
    part = data.subset(np.array([2, 1]))
    assert part.annotations.image.tolist() == [0, 0] and part.annotations.labels.tolist() == [2, 1]
    boxes, labels = part.annotations.of_image(1)
    assert boxes.shape == (0, 4) and labels.size == 0
    back = load_data(save_npz(data, tmp_path / "again.npz"))
    np.testing.assert_array_equal(back.annotations.boxes, BOXES)
    stream = open_stream(str(tmp_path / "again.npz"))  # memory-mapped: the boxes come along
    assert stream.subset(np.array([2])).take().annotations.labels.tolist() == [2, 1]


@pytest.mark.parametrize("fields, message", [
    (dict(boxes=BOXES, box_labels=[0, 2, 1]), "field 'boxes' needs fields 'box_image' beside it"),
    (dict(boxes=BOXES, box_labels=[0, 2, 1], box_image=[0, 4, 2]),
     "field 'box_image' index 1 is 4, not an image of x (0..3)"),
    (dict(boxes=BOXES + [[0, 0, 1, 0]], box_labels=[0, 2, 1], box_image=[0, 1, 2]),
     "field 'boxes' index 1 is [1.0, 1.0, 11.0, 8.0], outside its image (field 'box_image' 1) of width 10 "
     "and height 8 pixels"),
    (dict(boxes=BOXES[::-1].copy() * [1, 1, 0, 1], box_labels=[0, 2, 1], box_image=[0, 1, 2]),
     "field 'boxes' index 0 is [2.0, 2.0, 0.0, 3.0]: not x1 < x2 and y1 < y2"),
    # zero width: never matched, a missed object whatever the model does (survey 21)
    (dict(boxes=np.concatenate([[[1.0, 1.0, 1.0, 5.0]], BOXES[1:]]), box_labels=[0, 2, 1], box_image=[0, 1, 2]),
     "field 'boxes' index 0 is [1.0, 1.0, 1.0, 5.0]: not x1 < x2 and y1 < y2 (xyxy pixels; a box of zero width"),
    (dict(boxes=BOXES, box_labels=[0, -2, 1], box_image=[0, 1, 2]), "field 'box_labels' index 1 is -2"),
    (dict(masks=np.zeros((4, 8, 9), np.int64)), "field 'masks' has masks of (8, 9) (H, W) but the images of x "
     "are (8, 10)"),
    (dict(masks=np.zeros((3, 8, 10), np.int64)), "field 'masks' has 3 masks but field 'x' has 4 samples"),
    (dict(boxes=BOXES, box_labels=[0, 2, 1], box_image=[0, 1, 2], masks=np.zeros((4, 8, 10), np.int64)),
     MSG_BOXES_AND_MASKS),  # was read as a detector's data, its masks dropped
    # survey 62: the first element was taken, class 0 scored although the user asked to ignore it
    (dict(masks=np.zeros((4, 8, 10), np.int64), ignore_index=[255, 0]),
     "field 'ignore_index' must be one integer, the mask value of pixels left out (e.g. 255), got [255, 0]"),
    (dict(masks=np.zeros((4, 8, 10), np.int64), ignore_index=255.7),  # was truncated to 255
     "field 'ignore_index' must be one integer, the mask value of pixels left out (e.g. 255), got 255.7"),
])
def test_bad_annotations_name_file_field_and_first_index(tmp_path, fields, message):
    path = _npz(tmp_path, **fields)
    assert _error(path).startswith(f"{path}: ") and message in _error(path)


def test_class_ids_beyond_the_model_name_the_first_index():
    boxes = Boxes(BOXES, np.array([0, 3, 5]), np.array([0, 1, 2]))
    with pytest.raises(DataError, match=re.escape("d.npz: field 'box_labels' index 1 is 3, outside the model's 3 "
                                                  "classes (0..2)")):
        check_box_labels(boxes, 3, "d.npz")
    masks = np.zeros((3, 2, 2), np.int64)
    masks[2, 1, 0] = 4
    masks[1, 0, 0] = 255  # ignored
    with pytest.raises(DataError, match=re.escape("d.npz: field 'masks' sample 2 holds the class 4, outside the "
                                                  "model's 4 classes (0..3; 255 is ignored)")):
        check_mask_labels(Masks(masks), 4, "d.npz")
    check_mask_labels(Masks(masks), 5, "d.npz")


def test_group_data_with_masks_round_trips(tmp_path):
    masks = np.arange(4 * 8 * 10).reshape(4, 8, 10) % 3
    data = load_data(GroupData(X, None, GROUP, ("a", "b"), "mem", Masks(masks)))
    back = load_data(save_npz(data, tmp_path / "seg.npz"))
    np.testing.assert_array_equal(back.annotations.masks, masks)
    np.testing.assert_array_equal(back.subset(np.array([3])).annotations.masks[0], masks[3])


def test_a_negative_ignore_index_is_accepted_and_other_negatives_named():
    """PyTorch's cross-entropy ignores -100 by default: masks may mark their ignored pixels so."""
    from fqexport.calibration.annotations import check_masks

    masks = np.zeros((3, 4, 5), np.int64)
    masks[:, 0] = -100
    got = check_masks(masks, (3, 4, 5), "seg.npz", 3, ignore_index=-100)
    assert got.ignore_index == -100 and int(got.masks.min()) == -100
    masks[1, 2, 2] = -1
    with pytest.raises(DataError) as info:
        check_masks(masks, (3, 4, 5), "seg.npz", 3, ignore_index=-100)
    assert str(info.value) == ("seg.npz: field 'masks' index 1 is -1; class ids must be >= 0 (or the ignore_index, "
                               "-100)")


def test_boxes_that_all_look_normalised_are_warned_about(tmp_path, caplog):
    """Boxes in 0-1 (a YOLO label file's coordinates) gave mAP 0 with no hint (survey 21)."""
    with caplog.at_level("WARNING"):
        load_data(_npz(tmp_path, boxes=[[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.8]], box_labels=[0, 1],
                       box_image=[0, 1]))
    assert "every one of the 2 boxes lies within [0, 1] while the images are 10x8 pixels" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_data(_npz(tmp_path, boxes=BOXES, box_labels=[0, 2, 1], box_image=[0, 1, 2]))
    assert "lies within [0, 1]" not in caplog.text


def test_an_ignore_index_field_of_one_whole_number_is_read_as_it(tmp_path):
    for value in (0, np.uint8(255), 255.0, [-100]):
        data = load_data(_npz(tmp_path, masks=np.zeros((4, 8, 10), np.int64), ignore_index=value))
        assert data.annotations.ignore_index == int(np.asarray(value).reshape(-1)[0])


def test_masks_beside_channels_last_images_or_in_y_say_where_the_mistake_is(tmp_path):
    # survey 62: the masks were blamed for images saved [N, H, W, C], and masks given as y were
    # "must be 1-D" with no word of the masks field
    path = tmp_path / "nhwc.npz"
    np.savez(path, x=np.zeros((4, 8, 10, 1), np.float32), group=GROUP, masks=np.zeros((4, 8, 10), np.int64))
    assert ("x's samples (8, 10, 1) look channels-last (H, W, C): the model takes [N, C, H, W], so save x as "
            "x.transpose(0, 3, 1, 2), i.e. samples (1, 8, 10)") in _error(path)
    path = tmp_path / "y.npz"
    np.savez(path, x=X, group=GROUP, y=np.zeros((4, 8, 10), np.int64))
    assert ("field 'y' must be 1-D [N], got shape (4, 8, 10); per-pixel labels [N, H, W] of a segmenter go into "
            "the npz field 'masks'") in _error(path)
