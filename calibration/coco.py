"""A COCO JSON file and its image folder as detection data: :func:`load_coco` (``load_data`` of a
``.json`` path).

The JSON holds ``images`` (``id``, ``file_name`` relative to the JSON's folder, and the image's
group in a field, ``"group"`` by default), ``annotations`` (``image_id``, ``category_id``,
``bbox`` as COCO's x, y, width, height in pixels) and ``categories`` (``id``); class ids are
the categories' positions in ascending id order. The groups may instead come from a CSV
(``groups=GroupsFromCSV("groups.csv")``, a row per image file) or an array. Every image must
have one size (CHW float in [0, 1], no resize: resize the files first, or save an ``.npz``).
Boxes become the flat arrays of :class:`~.annotations.Boxes` in annotation order, so a bad box
is named by its index in ``annotations`` (``field 'boxes' index j`` is ``annotations[j]``, counting
only the annotations kept: crowd annotations, ``iscrowd=1``, are left out with a warning, since
pycocotools ignores them rather than asking for their detection).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .annotations import Boxes
from .checks import data_error, validate_group_data
from .group_data import GroupData
from .groups import groups_up_front
from .images import read_image

log = logging.getLogger(__name__)

MSG_JSON = "cannot read COCO JSON ({err}); write it with json.dump"
MSG_CROWD = (
    "%s: %d crowd annotation(s) (iscrowd=1, the first is field 'annotations' index %d) left out: fqexport scores "
    "every box it keeps as an object to detect, while pycocotools treats a crowd region as one to ignore; a "
    "detection on a crowd region counts as a false positive here"
)
MSG_KEY = "field '{field}' index {index} has no {key!r}{hint}"
MSG_IMAGE_ID = "field 'annotations' index {index} names image_id {value}, not an id of field 'images'"
MSG_CATEGORY = "field 'annotations' index {index} names category_id {value}, not an id of field 'categories'"
MSG_SIZE = ("field 'images' index {index} ({file}) is {got} (C, H, W) but index 0 is {want}: every image must have "
            "one size; resize the files or save an .npz")
_GROUP_HINT = ": give every image its group (or load_data(..., groups=GroupsFromCSV(...)))"


def _field(entry: dict, key: str, field: str, index: int, source: str, hint: str = "") -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise data_error(source, MSG_KEY.format(field=field, index=index, key=key, hint=hint))
    return entry[key]


def load_coco(path: str | os.PathLike, groups: Any = None, group_field: str = "group") -> GroupData:
    """Detection data from a COCO JSON file and the images it names (module docstring)."""
    path = Path(path)
    source = str(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise data_error(source, MSG_JSON.format(err=err)) from err
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise data_error(source, "field 'images' must be a non-empty list of images")
    files = [str(_field(im, "file_name", "images", i, source)) for i, im in enumerate(images)]
    index = {_field(im, "id", "images", i, source): i for i, im in enumerate(images)}
    xs = [read_image(path.parent / f, source) for f in files]
    for i, x in enumerate(xs):
        if x.shape != xs[0].shape:
            raise data_error(source, MSG_SIZE.format(index=i, file=files[i], got=x.shape, want=xs[0].shape))
    group = groups_up_front(groups, len(images), source, lambda: [str(path.parent / f) for f in files])
    if group is None:
        group = np.asarray([_field(im, group_field, "images", i, source, _GROUP_HINT) for i, im in enumerate(images)])
    categories = sorted(_field(c, "id", "categories", i, source) for i, c in enumerate(doc.get("categories") or []))
    label_of = {c: k for k, c in enumerate(categories)}
    boxes, labels, image, crowd = [], [], [], []
    for j, a in enumerate(doc.get("annotations") or []):
        if isinstance(a, dict) and a.get("iscrowd"):
            crowd.append(j)  # a region to ignore, not an object to detect (counted as one it was missed)
            continue
        image_id, category = _field(a, "image_id", "annotations", j, source), _field(a, "category_id", "annotations", j, source)
        if image_id not in index:
            raise data_error(source, MSG_IMAGE_ID.format(index=j, value=image_id))
        if category not in label_of:
            raise data_error(source, MSG_CATEGORY.format(index=j, value=category))
        x0, y0, w, h = (float(v) for v in _field(a, "bbox", "annotations", j, source))
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(label_of[category])
        image.append(index[image_id])
    if crowd:
        log.warning(MSG_CROWD, source, len(crowd), crowd[0])
    found = Boxes(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), np.asarray(image, np.int64))
    return validate_group_data(np.stack(xs), None, group, None, source, found)
