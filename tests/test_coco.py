"""Tests of calibration/coco.py: a COCO JSON and its image folder as group-labeled detection data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fqexport.calibration.annotations import Boxes
from fqexport.calibration.groups import GroupsFromCSV
from fqexport.calibration.readers import load_data
from fqexport.errors import DataError

Image = pytest.importorskip("PIL.Image")


def _write(tmp_path, images=None, annotations=None, size=(12, 10)):
    (tmp_path / "img").mkdir()
    for i in range(3):
        arr = np.full((size[1], size[0], 3), 40 * i, np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
    doc = {
        "images": images or [{"id": 10 + i, "file_name": f"img/{i}.png", "group": ["day", "night"][i % 2]}
                             for i in range(3)],
        "annotations": annotations if annotations is not None else [
            {"image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4]},
            {"image_id": 12, "category_id": 3, "bbox": [0, 0, 12, 10]}],
        "categories": [{"id": 7}, {"id": 3}],
    }
    (tmp_path / "det.json").write_text(json.dumps(doc))
    return tmp_path / "det.json"


def test_coco_json_becomes_detection_data(tmp_path):
    data = load_data(_write(tmp_path))
    assert data.x.shape == (3, 3, 10, 12) and data.group_names == ("day", "night")
    assert data.group.tolist() == [0, 1, 0]
    assert isinstance(data.annotations, Boxes)
    np.testing.assert_array_equal(data.annotations.boxes, [[1, 2, 4, 6], [0, 0, 12, 10]])
    assert data.annotations.labels.tolist() == [1, 0]  # categories 3, 7 in id order
    assert data.annotations.image.tolist() == [0, 2]
    np.testing.assert_allclose(data.x[2], 80 / 255)


def test_groups_from_a_csv_of_image_files(tmp_path):
    path = _write(tmp_path, images=[{"id": i, "file_name": f"img/{i}.png"} for i in range(3)], annotations=[])
    with open(tmp_path / "groups.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group"])
        w.writerows([[f"img/{i}.png", "b" if i else "a"] for i in range(3)])
    data = load_data(path, groups=GroupsFromCSV(tmp_path / "groups.csv"))
    assert data.group_names == ("a", "b") and data.group.tolist() == [0, 1, 1] and len(data.annotations) == 0
    with pytest.raises(DataError, match="field 'images' index 0 has no 'group': give every image its group"):
        load_data(path)


@pytest.mark.parametrize("annotations, message", [
    ([{"image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1]}],
     "field 'annotations' index 0 names image_id 99, not an id of field 'images'"),
    ([{"image_id": 10, "category_id": 7, "bbox": [0, 0, 1, 1]}, {"image_id": 10, "category_id": 5, "bbox": [0, 0, 1, 1]}],
     "field 'annotations' index 1 names category_id 5, not an id of field 'categories'"),
    ([{"image_id": 10, "category_id": 7, "bbox": [0, 0, 1, 1]}, {"image_id": 11, "category_id": 7, "bbox": [5, 5, 8, 2]}],
     "field 'boxes' index 1 is [5.0, 5.0, 13.0, 7.0], outside its image (field 'box_image' 1) of width 12"),
])
def test_bad_coco_names_the_file_field_and_index(tmp_path, annotations, message):
    path = _write(tmp_path, annotations=annotations)
    with pytest.raises(DataError) as info:
        load_data(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_crowd_annotations_are_left_out_with_a_warning(tmp_path, caplog):
    """iscrowd=1 regions were scored as objects to detect: perfect detections got mAP 0.60 where
    pycocotools gives 1.0 (survey 21)."""
    path = _write(tmp_path, annotations=[
        {"image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4]},
        {"image_id": 11, "category_id": 7, "bbox": [0, 0, 8, 8], "iscrowd": 1},
        {"image_id": 12, "category_id": 3, "bbox": [0, 0, 12, 10], "iscrowd": 0}])
    with caplog.at_level("WARNING", logger="calibration.coco"):
        data = load_data(path)
    assert data.annotations.boxes.tolist() == [[1, 2, 4, 6], [0, 0, 12, 10]]
    assert data.annotations.image.tolist() == [0, 2]
    assert "1 crowd annotation(s) (iscrowd=1, the first is field 'annotations' index 1) left out" in caplog.text
