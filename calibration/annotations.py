"""Annotations beyond class labels, kept beside ``x`` by a GroupData: the boxes of a detection
set and the masks of a segmentation set.

- :class:`Boxes`: COCO-like flat arrays, ``boxes [M, 4]`` (x1, y1, x2, y2 in pixels of ``x``),
  ``labels [M]`` (class ids) and ``image [M]`` (the index into ``x`` of each box's image); an
  image may have no box.
- :class:`Masks`: ``masks [N, H, W]`` class ids per pixel, one mask per sample of ``x``, with an
  ``ignore_index`` (default 255) for pixels no metric counts.

Both are immutable and follow :meth:`GroupData.subset`: :meth:`subset` keeps the samples at an
index (boxes are renumbered to their image's new position). :func:`check_boxes` and
:func:`check_masks` hold them to the rules of the readers; a failure is one :class:`DataError`
naming the source, the field and the first offending index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fqexport.errors import DataError

log = logging.getLogger(__name__)

MSG_FIELD_SHAPE = "{source}: field '{field}' must be {want}, got shape {shape}"
MSG_FIELD_LENGTH = "{source}: field '{field}' has {got} entries but field 'boxes' has {want}"
MSG_NOT_FINITE = "{source}: field 'boxes' holds NaN or Inf at index {index}"
MSG_NORMALISED = (
    "%s: every one of the %d boxes lies within [0, 1] while the images are %dx%d pixels: boxes are xyxy "
    "*pixels* (a YOLO label file's normalised coordinates must be multiplied by the width and height), else "
    "no detection can match them and mAP is 0"
)
MSG_BOX_ORDER = (
    "{source}: field 'boxes' index {index} is {box}: not x1 < x2 and y1 < y2 (xyxy pixels; a box of zero width or "
    "height can never be matched, so it would count as a missed object whatever the model does)"
)
MSG_BOX_OUTSIDE = (
    "{source}: field 'boxes' index {index} is {box}, outside its image (field 'box_image' {image}) of "
    "width {width} and height {height} pixels; boxes are xyxy pixels of x"
)
MSG_IMAGE_INDEX = (
    "{source}: field 'box_image' index {index} is {value}, not an image of x (0..{last}); box_image "
    "holds each box's index into x"
)
MSG_BOX_LABEL = (
    "{source}: field 'box_labels' index {index} is {value}, outside the model's {num_classes} classes "
    "(0..{last})"
)
MSG_NEGATIVE_LABEL = "{source}: field '{field}' index {index} is {value}; class ids must be >= 0"
MSG_MASK_SIZE = (
    "{source}: field 'masks' has masks of {got} (H, W) but the images of x are {want}; a mask per "
    "sample, of the image's size"
)
MSG_CHANNELS_LAST = (
    "; x's samples {shape} look channels-last (H, W, C): the model takes [N, C, H, W], so save x as "
    "x.transpose(0, 3, 1, 2), i.e. samples ({c}, {h}, {w})"
)
MSG_MASK_COUNT = "{source}: field 'masks' has {got} masks but field 'x' has {want} samples"
MSG_MASK_LABEL = (
    "{source}: field 'masks' sample {index} holds the class {value}, outside the model's {num_classes} "
    "classes (0..{last}; {ignore} is ignored)"
)
MSG_NOT_INTEGER = "{source}: field '{field}' must hold integers, got dtype {dtype}"


@dataclass(frozen=True)
class Boxes:
    """Detection ground truth in COCO-like flat arrays (see the module docstring)."""

    boxes: np.ndarray  # float32 [M, 4] xyxy pixels
    labels: np.ndarray  # int64 [M]
    image: np.ndarray  # int64 [M], index into x

    kind = "boxes"

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def subset(self, index: np.ndarray) -> "Boxes":
        """The boxes of the images at ``index``, renumbered to their position in ``index``
        (an image taken twice keeps its boxes twice)."""
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(self.image, kind="stable")
        starts = np.searchsorted(self.image[order], index, side="left")
        stops = np.searchsorted(self.image[order], index, side="right")
        picks = [order[a:b] for a, b in zip(starts, stops)]
        rows = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        new_image = np.repeat(np.arange(len(index), dtype=np.int64), [len(p) for p in picks])
        return Boxes(self.boxes[rows], self.labels[rows], new_image)

    def of_image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes [m, 4], labels [m])`` of image ``i``."""
        sel = self.image == i
        return self.boxes[sel], self.labels[sel]

    def max_label(self) -> int:
        return int(self.labels.max()) if len(self) else -1


@dataclass(frozen=True)
class Masks:
    """Segmentation ground truth: class ids per pixel (see the module docstring)."""

    masks: np.ndarray  # int64 [N, H, W]
    ignore_index: int = 255

    kind = "masks"

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def subset(self, index: np.ndarray) -> "Masks":
        return Masks(self.masks[np.asarray(index, dtype=np.int64)], self.ignore_index)

    def max_label(self) -> int:
        counted = self.masks[self.masks != self.ignore_index]
        return int(counted.max()) if counted.size else -1


def _int_field(a: np.ndarray, field: str, source: str) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64)
        raise DataError(MSG_NOT_INTEGER.format(source=source, field=field, dtype=a.dtype))
    return a.astype(np.int64, copy=False)


def check_boxes(boxes: np.ndarray, labels: np.ndarray, image: np.ndarray, sample_shape: tuple[int, ...],
                source: str, num_images: int) -> Boxes:
    """``Boxes`` of the raw arrays, checked: shapes, finite xyxy boxes inside their image (``x``'s
    last two dims are height and width), class ids >= 0, image indices into ``x``."""
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise DataError(MSG_FIELD_SHAPE.format(source=source, field="boxes", want="[M, 4] (x1, y1, x2, y2)",
                                               shape=b.shape))
    m = b.shape[0]
    for field, arr in (("box_labels", labels), ("box_image", image)):
        if np.ndim(arr) != 1:
            raise DataError(MSG_FIELD_SHAPE.format(source=source, field=field, want="[M]", shape=np.shape(arr)))
        if len(arr) != m:
            raise DataError(MSG_FIELD_LENGTH.format(source=source, field=field, got=len(arr), want=m))
    b = b.astype(np.float32)
    lab = _int_field(labels, "box_labels", source)
    img = _int_field(image, "box_image", source)
    bad = np.flatnonzero(~np.isfinite(b).all(axis=1))
    if bad.size:
        raise DataError(MSG_NOT_FINITE.format(source=source, index=int(bad[0])))
    bad = np.flatnonzero((img < 0) | (img >= num_images))
    if bad.size:
        raise DataError(MSG_IMAGE_INDEX.format(source=source, index=int(bad[0]), value=int(img[bad[0]]),
                                               last=num_images - 1))
    bad = np.flatnonzero(lab < 0)
    if bad.size:
        raise DataError(MSG_NEGATIVE_LABEL.format(source=source, field="box_labels", index=int(bad[0]),
                                                  value=int(lab[bad[0]])))
    bad = np.flatnonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    if bad.size:
        raise DataError(MSG_BOX_ORDER.format(source=source, index=int(bad[0]), box=b[bad[0]].tolist()))
    height, width = (int(sample_shape[-2]), int(sample_shape[-1])) if len(sample_shape) >= 2 else (0, 0)
    bad = np.flatnonzero((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height))
    if bad.size:
        i = int(bad[0])
        raise DataError(MSG_BOX_OUTSIDE.format(source=source, index=i, box=b[i].tolist(), image=int(img[i]),
                                               width=width, height=height))
    if len(b) and min(width, height) > 4 and float(b.max()) <= 1.0:
        log.warning(MSG_NORMALISED, source, len(b), width, height)
    return Boxes(b, lab, img)


def check_masks(masks: np.ndarray, sample_shape: tuple[int, ...], source: str, num_images: int,
                ignore_index: int = 255) -> Masks:
    """``Masks`` of a raw ``[N, H, W]`` array, checked: one integer mask per sample, of the image's
    (H, W), class ids >= 0 (or ``ignore_index``)."""
    a = np.asarray(masks)
    if a.ndim != 3:
        raise DataError(MSG_FIELD_SHAPE.format(source=source, field="masks", want="[N, H, W]", shape=a.shape))
    if a.shape[0] != num_images:
        raise DataError(MSG_MASK_COUNT.format(source=source, got=a.shape[0], want=num_images))
    want = tuple(int(d) for d in sample_shape[-2:])
    if tuple(a.shape[1:]) != want:
        hint = ""
        if len(sample_shape) == 3 and tuple(a.shape[1:]) == tuple(sample_shape[:2]):
            hint = MSG_CHANNELS_LAST.format(shape=tuple(sample_shape), c=sample_shape[2], h=sample_shape[0],
                                            w=sample_shape[1])
        raise DataError(MSG_MASK_SIZE.format(source=source, got=tuple(a.shape[1:]), want=want) + hint)
    a = _int_field(a, "masks", source)
    bad = (a < 0) & (a != int(ignore_index))  # a negative ignore_index (-1, -100) is allowed
    neg = np.flatnonzero(bad.reshape(a.shape[0], -1).any(axis=1))
    if neg.size:
        i = int(neg[0])
        raise DataError(MSG_NEGATIVE_LABEL.format(source=source, field="masks", index=i, value=int(a[i][bad[i]].min()))
                        + f" (or the ignore_index, {int(ignore_index)})")
    return Masks(a, int(ignore_index))


def check_box_labels(boxes: Boxes, num_classes: int, source: str) -> None:
    """DataError naming the first box whose class is not one of the model's ``num_classes``."""
    bad = np.flatnonzero(boxes.labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise DataError(MSG_BOX_LABEL.format(source=source, index=i, value=int(boxes.labels[i]),
                                             num_classes=num_classes, last=num_classes - 1))


def check_mask_labels(masks: Masks, num_classes: int, source: str) -> None:
    """DataError naming the first sample with a pixel class outside the model's ``num_classes``."""
    out = (masks.masks >= num_classes) & (masks.masks != masks.ignore_index)
    bad = np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise DataError(MSG_MASK_LABEL.format(source=source, index=i, value=int(masks.masks[i][out[i]][0]),
                                              num_classes=num_classes, last=num_classes - 1,
                                              ignore=masks.ignore_index))
