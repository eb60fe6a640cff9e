"""Object detection: the model's output as users export it, NMS after the model, COCO mAP per group.

Layouts (:data:`LAYOUTS`):

- ``"v5"``: ``[N, K, 5 + C]`` per anchor: cx, cy, w, h in pixels, objectness, class
  probabilities (what YOLOv5's ``export.py --include onnx`` writes); score = obj · p_c;
- ``"v8"``: ``[N, 4 + C, K]``: cx, cy, w, h in pixels, then class probabilities (YOLOv8); score = p_c.

NMS (:mod:`fqexport.metrics.boxes`, class-aware, ``iou`` and ``conf`` thresholds) runs on the
outputs, outside the ONNX file. Per group, COCO mAP@[.5:.95] and mAP@.5 with pycocotools on that
group's images (:mod:`fqexport.metrics.coco_map`); without the data's own boxes the float model's
detections at the deploy threshold stand in for them (distillation, like a classifier's top-1).

The label-free loss per sample compares the decoded outputs of the quantized (s) and float (t)
model, which the float decode makes a loss on the raw head maps:

    ℓ = (1/K) Σ_k Σ_c KL(t_kc ‖ s_kc) + Σ_k w_k (1 − IoU(b^s_k, b^t_k)) / Σ_k w_k,

KL of Bernoulli probabilities over the objectness and class channels, w_k the float model's
score of anchor k (its best class), so boxes count where the float model sees an object.

With the data's boxes, the report's loss and fine-tuning's own term are the detector's training
loss on them (:mod:`fqexport.tasks.detection_loss`: positives assigned from the float model's
decoded boxes, DIoU box loss, BCE of classes and objectness).

The export check (:meth:`Detection.compare`) compares the boxes each image keeps after NMS at the
deploy threshold: a decided reference box (score >= deploy_conf + margin) must be proposed by the
session (an anchor of its class with IoU >= ``match_iou`` and a score within ``margin`` of its
score, before the session's NMS: of near-duplicates with near-equal scores NMS may keep either),
and every decided box of the session must be proposed by the reference; agreement is the matched
share of decided boxes (>= 99%, or one unmatched box). Boxes within the margin of the threshold
may cross it at the export's resolution and are not counted. A correct export differs from its
reference by kernel rounding (the demo's detectors: max |output diff| below 1e-2 at W8A8 and
W4A8, every decided box matched); a broken one (scores quantized with the pixel coordinates, as
ORT's quantize_static does to the decode) proposes no box at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.fx

from fqexport.calibration.annotations import Boxes, check_box_labels
from fqexport.config import check_choice
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.graph.float_tail import float_tail
from fqexport.metrics.boxes import Detections, box_iou, paired_iou_xywh, select_boxes, xywh_to_xyxy
from fqexport.metrics.coco_map import coco_map
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.tasks.base import Comparison, Task
from fqexport.tasks.detection_loss import assign, train_loss

log = logging.getLogger(__name__)

Layout = Literal["v5", "v8"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
MIN_BOX_AGREEMENT = 0.99
_EPS = 1e-6

MSG_OUTPUT = (
    "{source}: field 'x' with sample shape {sample} gives a model output of shape {shape}, not a detector's "
    "{want} (layout {layout!r}); check the model and --task/--layout"
)
MSG_SESSION_OUTPUT = "model {model} returns output of shape {shape}, not a detector's {want} (layout {layout!r})"
MSG_WRONG_LAYOUT = (
    "layout {layout!r} reads the model's output {shape} as scores (objectness and class probabilities) that reach "
    "{worst:.4g}, outside [0, 1], while layout {other!r} reads probabilities there: pass --layout {other} "
    "(API: Detection(layout={other!r})) or leave --layout out"
)
# how far a probability may stray from [0, 1] (float rounding of a sigmoid product)
PROBABILITY_SLACK = 1e-3
MSG_FEW_ANCHORS = (
    "layout %r reads the model's output %s as %d classes over %d anchors; a detector has more anchors than "
    "classes: check --layout (layout %r would read %d anchors and %d classes)"
)
_warned_layouts: set[tuple[str, tuple[int, ...]]] = set()
MSG_THRESHOLD = "Detection.{name}={value!r} must be in [0, 1]"
MSG_MAX_DET = "Detection.max_det={value!r} must be an integer >= 1"
SUMMARY = (
    "agrees with the PyTorch fake-quant reference on only {agree:.2%} of {n} boxes kept after NMS at "
    "confidence {conf:g} ± {margin:g} (same class, IoU >= {iou:g}; need >= {need:.0%}, or a single "
    "unmatched box; mean IoU of matched boxes {mean_iou:.3f}, max |output diff| {diff:.4g})"
)
_WANT = {"v5": "[batch, anchors, 5 + classes] (cx, cy, w, h, objectness, classes)",
         "v8": "[batch, 4 + classes, anchors] (cx, cy, w, h, classes)"}


def _kl_bernoulli(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    t = t.clamp(_EPS, 1 - _EPS)
    s = s.clamp(_EPS, 1 - _EPS)
    return t * (t / s).log() + (1 - t) * ((1 - t) / (1 - s)).log()


@dataclass(frozen=True)
class Detection(Task):
    """A detector whose output keeps its own layout (module docstring).

    Attributes:
        layout: ``"v5"`` (``[N, K, 5 + C]``) or ``"v8"`` (``[N, 4 + C, K]``).
        conf: the lowest score NMS keeps for evaluation (COCO evaluates the ranking: 0.001).
        iou: NMS IoU threshold.
        max_det: boxes kept per image.
        multi_label: the mAP's detections keep every class of an anchor scoring >= ``conf`` (what
            YOLOv5's ``val.py`` and Ultralytics' validator evaluate, ``multi_label=True``); ``False``:
            each anchor's best class only (what a deployment's NMS keeps). The export check and the
            float model's stand-in boxes always take the best class.
        deploy_conf: the confidence a deployment keeps (the export check, pseudo ground truth).
        match_iou: IoU of a matched pair in the export check.
        margin: scores within this of ``deploy_conf`` are not decided in the export check.
    """

    layout: Layout = "v5"
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 300
    multi_label: bool = True
    deploy_conf: float = 0.25
    match_iou: float = 0.5
    margin: float = 0.05

    name = "detection"
    output_name = "output0"
    metric_names = ("map", "map50", "loss")
    primary = "map"
    search_metric = "map50"
    agreement_name = "box agreement"
    annotation_fields = "boxes (fields boxes, box_labels, box_image)"
    train_loss_words = "the YOLO box and class loss on the data's boxes"
    # measured (benchmarks/detection_bench.py --part finetune, W3A8, 4 epochs, worst-group drop in mAP
    # points): YOLOv5-style 6.5 at 0.3 vs 18.2 at 1 (7.4 at 0.1); YOLOv8-style 4.9 at 0.3 vs 4.7 at 1
    train_loss_scale = 0.3
    without_annotations = ("; the data has no boxes: mAP@.5 against the float model's detections at the deploy "
                           "confidence and the loss the distillation to its outputs")

    def __post_init__(self) -> None:
        check_choice(self.layout, LAYOUTS, "Detection.layout")
        if not isinstance(self.multi_label, (bool, np.bool_)):
            raise ConfigError(f"Detection.multi_label={self.multi_label!r} must be True or False")
        for name in ("conf", "iou", "deploy_conf", "match_iou", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(MSG_THRESHOLD.format(name=name, value=value))
        if isinstance(self.max_det, bool) or not isinstance(self.max_det, int) or self.max_det < 1:
            raise ConfigError(MSG_MAX_DET.format(value=self.max_det))

    # ---------------------------------------------------------------------------- layout
    def _rows(self, out: torch.Tensor | np.ndarray):
        """The output as ``[N, K, 4 + …]`` rows per anchor."""
        if self.layout == "v8":
            return out.transpose(1, 2) if isinstance(out, torch.Tensor) else np.swapaxes(out, 1, 2)
        return out

    def scores_beyond_unit(self, out: torch.Tensor | np.ndarray) -> float | None:
        """The score channels' value farthest outside [0, 1] in this layout's reading of ``out``
        (None when they are all probabilities, within :data:`PROBABILITY_SLACK`, or when the
        reading has no score channel)."""
        rows = self._rows(torch.as_tensor(np.asarray(out)) if isinstance(out, np.ndarray) else out.detach())
        scores = rows[..., 4:].float()
        if scores.numel() == 0:
            return None
        finite = scores[torch.isfinite(scores)]
        if finite.numel() < scores.numel():
            return float("nan")
        low, high = float(finite.min()), float(finite.max())
        if low >= -PROBABILITY_SLACK and high <= 1 + PROBABILITY_SLACK:
            return None
        return high if high - 1 >= -low else low

    def reads_probabilities(self, out: torch.Tensor | np.ndarray) -> bool:
        """Whether this layout reads ``out`` with score channels, all of them probabilities."""
        return self.num_classes_of(tuple(out.shape)) >= 1 and self.scores_beyond_unit(out) is None

    def _other(self) -> "Detection":
        return Detection(layout="v8" if self.layout == "v5" else "v5")

    def check_layout(self, out: torch.Tensor | np.ndarray) -> None:
        """ConfigError when this layout reads ``out``'s score channels as values outside [0, 1]
        while the other layout reads probabilities there (a wrong ``--layout``: every mAP, the
        export check and a drop-only gate would compare misread boxes alike)."""
        other = self._other()
        if not other.reads_probabilities(out):
            return
        worst = self.scores_beyond_unit(out)
        if worst is not None:
            raise ConfigError(MSG_WRONG_LAYOUT.format(layout=self.layout, shape=tuple(out.shape), worst=worst,
                                                      other=other.layout))

    def num_classes_of(self, shape: tuple[int, ...]) -> int:
        return int(shape[2] - 5) if self.layout == "v5" else int(shape[1] - 4)

    def decode(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes [N, K, 4] xyxy, class scores [N, K, C])`` of outputs in the layout."""
        rows = np.asarray(self._rows(np.asarray(outputs, dtype=np.float32)))
        return xywh_to_xyxy(rows[..., :4]), self._scores(rows)

    def detections(self, outputs: np.ndarray, conf: float | None = None, multi_label: bool = False) -> list[Detections]:
        """Each image's detections after class-aware NMS at ``conf`` (default ``self.conf``): each
        anchor's best class, or every class above ``conf`` (``multi_label``, :func:`select_boxes`)."""
        boxes, scores = self.decode(outputs)
        c = self.conf if conf is None else conf
        return [select_boxes(b, s, c, self.iou, self.max_det, multi_label=multi_label) for b, s in zip(boxes, scores)]

    # ---------------------------------------------------------------------------- compress
    def check_output(self, out: Any, data: Any) -> int:
        ok = isinstance(out, torch.Tensor) and out.dim() == 3 and self.num_classes_of(tuple(out.shape)) >= 1
        if not ok:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(MSG_OUTPUT.format(source=data.source, sample=data.sample_shape, shape=shape,
                                              want=_WANT[self.layout], layout=self.layout))
        self.check_layout(out)
        self._warn_if_few_anchors(out)  # a layout both readings fit: the anchor counts
        return self.num_classes_of(tuple(out.shape))

    def _warn_if_few_anchors(self, out: torch.Tensor | np.ndarray) -> None:
        """Warn when the layout reads fewer anchors than classes: a detector has more (a wrong
        --layout), unless the scores settle it (the other layout reads values outside [0, 1])."""
        shape = tuple(out.shape)
        classes, anchors = self.num_classes_of(shape), shape[1] if self.layout == "v5" else shape[2]
        if anchors >= classes or (self.layout, shape[1:]) in _warned_layouts:  # once, not per session measured
            return
        other = self._other()
        if other.num_classes_of(shape) >= 1 and not other.reads_probabilities(out):
            return
        _warned_layouts.add((self.layout, shape[1:]))
        log.warning(MSG_FEW_ANCHORS, self.layout, shape, classes, anchors, other.layout,
                    shape[1] if other.layout == "v5" else shape[2], other.num_classes_of(shape))

    def check_annotations(self, data: Any, num_classes: int) -> None:
        if isinstance(data.annotations, Boxes):
            check_box_labels(data.annotations, num_classes, data.source)

    def check_outputs(self, outputs: np.ndarray, model: str, data: Any) -> None:
        if np.ndim(outputs) != 3 or self.num_classes_of(tuple(np.shape(outputs))) < 1:
            raise ModelLoadError(MSG_SESSION_OUTPUT.format(model=model, shape=list(np.shape(outputs)),
                                                           want=_WANT[self.layout], layout=self.layout))
        self.check_layout(outputs)
        self._warn_if_few_anchors(outputs)  # validate --layout v5 on a v8 file: 0.3 % mAP, silently
        self.check_annotations(data, self.num_classes_of(tuple(np.shape(outputs))))

    def float_tail(self, gm: torch.fx.GraphModule, layers: set[str]) -> set[torch.fx.Node]:
        """The box decode after the head convs."""
        return float_tail(gm)

    # ---------------------------------------------------------------------------- losses
    def loss_targets(self, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return teacher

    def sample_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ℓ per image (module docstring), ``[N]``."""
        s, t = self._rows(out).float(), self._rows(target).float()
        scores = self._scores(t).amax(-1)
        kl = _kl_bernoulli(t[..., 4:], s[..., 4:]).sum(-1).mean(-1)
        w = scores.detach()
        box = (w * (1 - paired_iou_xywh(s[..., :4], t[..., :4]))).sum(-1) / (w.sum(-1) + _EPS)
        return kl + box

    def _scores(self, rows: Any) -> Any:
        """Class scores ``[…, K, C]`` of rows: objectness · p_c (v5), p_c (v8)."""
        return rows[..., 5:] * rows[..., 4:5] if self.layout == "v5" else rows[..., 4:]

    def train_targets(self, data: Any, teacher: torch.Tensor) -> torch.Tensor | None:
        """``[N, K, 6]`` positives of each image's boxes, assigned from the float model's detections
        (:func:`~fqexport.tasks.detection_loss.assign`); None without boxes."""
        if not isinstance(data.annotations, Boxes):
            return None
        rows = self._rows(teacher).float().cpu()
        scores = self._scores(rows)
        out = []
        for i in range(len(rows)):
            boxes, labels = data.annotations.of_image(i)
            out.append(assign(rows[i, :, :4], scores[i], torch.as_tensor(boxes, dtype=torch.float32),
                              torch.as_tensor(labels, dtype=torch.long), objectness=self.layout == "v5"))
        return torch.stack(out) if out else torch.zeros((0, rows.shape[1], 5))

    def train_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The YOLO-style loss per image on its boxes (:func:`~fqexport.tasks.detection_loss.train_loss`)."""
        return train_loss(self._rows(out).float(), targets, objectness=self.layout == "v5")

    def sample_losses(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None) -> np.ndarray:
        """With the data's boxes, the training loss per image (positives assigned from ``reference``'s
        detections, else from ``outputs``' own, as YOLOv8 assigns from the model it trains); without
        them the distillation loss to ``reference`` (NaN without one)."""
        if not isinstance(data.annotations, Boxes):
            return super().sample_losses(outputs, data, reference)
        out = torch.from_numpy(np.asarray(outputs, np.float32))
        assign_from = out if reference is None else torch.from_numpy(np.asarray(reference, np.float32))
        with torch.no_grad():
            return self.train_loss(out, self.train_targets(data, assign_from)).double().numpy()

    # ---------------------------------------------------------------------------- evaluation
    def needs_annotations(self, data: Any) -> bool:
        return not isinstance(data.annotations, Boxes)

    def truth(self, data: Any, reference: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(boxes, labels)``: the data's own, else the reference's detections at
        ``deploy_conf``."""
        if isinstance(data.annotations, Boxes):
            return [data.annotations.of_image(i) for i in range(len(data))]
        if reference is None:
            raise DataError(f"{data.source}: no boxes (fields boxes, box_labels, box_image) to measure mAP against")
        return [(d.boxes, d.labels) for d in self.detections(reference, self.deploy_conf)]

    def evaluate(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None = None) -> GroupMetrics:
        """COCO mAP@[.5:.95] and mAP@.5 per group and overall, and the loss vs ``reference``."""
        num_classes = self.num_classes_of(tuple(np.shape(outputs)))
        found, truth = self.detections(outputs, multi_label=self.multi_label), self.truth(data, reference)
        loss = self.sample_losses(outputs, data, reference)
        group = np.asarray(data.group)
        names = tuple(data.group_names)

        def row(images: np.ndarray) -> dict[str, float]:
            m, m50 = coco_map(truth, found, num_classes, images)
            return {"count": int(images.size), "map": m, "map50": m50,
                    "loss": float(loss[images].mean()) if images.size else float("nan")}

        by_group = {name: row(np.flatnonzero(group == g)) for g, name in enumerate(names)}
        return GroupMetrics(row(np.arange(len(group))), by_group, num_classes, group_names=names,
                            metric_names=self.metric_names, primary=self.primary)

    def _candidates(self, outputs: np.ndarray, conf: float) -> list[Detections]:
        """Every anchor's best class with score >= ``conf``, before NMS, per image."""
        boxes, scores = self.decode(outputs)
        out = []
        for b, s in zip(boxes, scores):
            labels = s.argmax(axis=1)
            best = s[np.arange(len(s)), labels]
            keep = np.flatnonzero(best >= conf)
            out.append(Detections(b[keep], best[keep], labels[keep].astype(np.int64)))
        return out

    def _decided_matches(self, got: np.ndarray, want: np.ndarray) -> tuple[int, int, np.ndarray]:
        """``(decided boxes, matched ones, IoU of each match)`` over all images, both ways: each box one
        side keeps after NMS at ``deploy_conf + margin`` must be proposed by the other side (an anchor of
        the same class with IoU >= ``match_iou`` and a score within ``margin``, before NMS, which may pick
        another of near-equal duplicates)."""
        hi, lo = self.deploy_conf + self.margin, max(self.deploy_conf - 2 * self.margin, 0.0)
        total, matched, ious = 0, 0, []
        for kept_of, proposed_of in ((want, got), (got, want)):
            kept_all = self.detections(kept_of, hi)
            proposed_all = self._candidates(proposed_of, lo)
            for kept, proposed in zip(kept_all, proposed_all):
                total += len(kept)
                if not len(kept) or not len(proposed):
                    continue
                overlap = box_iou(kept.boxes, proposed.boxes)
                ok = ((kept.labels[:, None] == proposed.labels[None, :])
                      & (np.abs(kept.scores[:, None] - proposed.scores[None, :]) <= self.margin))
                best = np.where(ok, overlap, 0.0).max(axis=1)
                hit = best >= self.match_iou
                matched += int(hit.sum())
                ious.append(best[hit])
        return total, matched, np.concatenate(ious) if ious else np.zeros(0)

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        """Share of the decided boxes (after NMS at the deploy confidence) of either that the other
        proposes (:meth:`_decided_matches`)."""
        total, matched, _ = self._decided_matches(a, b)
        return matched / total if total else 1.0

    def compare(self, got: np.ndarray, want: np.ndarray, shaken: np.ndarray | None = None) -> Comparison:
        """Matched boxes after NMS (module docstring): fails below :data:`MIN_BOX_AGREEMENT` with
        more than one unmatched box. When no box of either side reaches ``deploy_conf`` (an
        untrained or low-confidence detector) the boxes at half the reference's highest score are
        compared instead: "100 % of 0 boxes" compared nothing (a file whose boxes had all moved
        passed). ``shaken`` is not used: a box is matched within a score margin and an IoU, which
        a rounding tie does not cross."""
        judge = self
        total, matched, ious = self._decided_matches(got, want)
        if total == 0:
            top = max((float(c.scores.max()) for c in self._candidates(want, 0.0) if len(c)), default=0.0)
            if top > 0:
                judge = replace(self, deploy_conf=top / 2, margin=min(self.margin, top / 8))
                total, matched, ious = judge._decided_matches(got, want)
        agree = matched / total if total else 1.0
        missed = total - matched
        passed = not (missed > 1 and missed > (1.0 - MIN_BOX_AGREEMENT) * total)
        diff = float(np.abs(np.asarray(got) - np.asarray(want)).max(initial=0.0))
        return Comparison(total, agree, agree, diff, passed, SUMMARY.format(
            agree=agree, n=total, conf=judge.deploy_conf, margin=judge.margin, iou=self.match_iou,
            need=MIN_BOX_AGREEMENT, mean_iou=float(ious.mean()) if ious.size else float("nan"), diff=diff))
