"""COCO box mAP with the field's own evaluator, ``pycocotools`` (the optional extra
``fqexport[detection]``), restricted to a set of images: per group, COCO evaluation of that
group's images only.

``mAP`` is COCO's AP@[.5:.95] (``stats[0]``), ``mAP50`` its AP@.5 (``stats[1]``), both over
areas "all" at 100 detections per image. A set without a ground-truth box has no mAP (NaN); a
set with boxes and no detection has mAP 0 (pycocotools cannot load an empty result list).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Sequence

import numpy as np

from fqexport.errors import ConfigError
from fqexport.metrics.boxes import Detections

MSG_NO_PYCOCOTOOLS = (
    "COCO mAP needs pycocotools, an optional extra: pip install 'fqexport[detection]' (or pip install "
    "pycocotools)"
)


def _coco_tools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # the optional extra
        raise ConfigError(MSG_NO_PYCOCOTOOLS) from err
    return COCO, COCOeval


def coco_map(truth: Sequence[tuple[np.ndarray, np.ndarray]], found: Sequence[Detections], num_classes: int,
             images: np.ndarray | None = None) -> tuple[float, float]:
    """``(mAP@[.5:.95], mAP@.5)`` of the detections ``found`` against ``truth`` (per image:
    ``(boxes [m, 4] xyxy, labels [m])``), over the images at ``images`` (default all)."""
    COCO, COCOeval = _coco_tools()
    ids = np.arange(len(truth)) if images is None else np.asarray(images, dtype=np.int64)
    gt = {"images": [{"id": int(i) + 1} for i in ids], "categories": [{"id": c + 1} for c in range(num_classes)],
          "annotations": []}
    for i in ids:
        for k, (b, c) in enumerate(zip(*truth[i])):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": int(i) + 1, "category_id": int(c) + 1,
                                      "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
    if not gt["annotations"]:
        return math.nan, math.nan
    dets = [{"image_id": int(i) + 1, "category_id": int(c) + 1, "score": float(s),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for i in ids for b, s, c in zip(found[i].boxes, found[i].scores, found[i].labels)]
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluation.params.imgIds = [int(i) + 1 for i in ids]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return tuple(float(v) if v >= 0 else math.nan for v in evaluation.stats[:2])  # type: ignore[return-value]
