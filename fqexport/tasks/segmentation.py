"""Semantic segmentation: logits ``[N, C, H, W]`` at the input's size, masks ``[N, H, W]``.

Per group: mIoU, Dice and pixel accuracy from the confusion matrix of that group's images
(:mod:`fqexport.metrics.segmentation_metrics`); without masks the float model's argmax stands in
(distillation). The label-free loss per image is the mean over pixels of
``KL(softmax(t) ‖ softmax(s))`` between the float (t) and quantized (s) logits; with masks, the
report's loss and fine-tuning's own term are the per-pixel cross-entropy on them. The export check
counts per-pixel argmax agreement on the pixels whose reference top-2 logits are more than
``TIE_FRACTION`` of the logit spread apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from fqexport.calibration.annotations import Masks, check_mask_labels
from fqexport.errors import DataError, ModelLoadError
from fqexport.graph.float_tail import float_tail
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.metrics.segmentation_metrics import confusion, segmentation_scores
from fqexport.tasks.base import Comparison, Task
from fqexport.tasks.classification import (
    MIN_AGREEMENT,
    TIE_FRACTION,
    agreement_failed,
    decided,
    tie_threshold,
    top1_agreement,
)

MSG_OUTPUT = (
    "{source}: field 'x' with sample shape {sample} gives a model output of shape {shape}, not per-pixel "
    "logits [batch, classes, {h}, {w}] at the input's size"
)
MSG_SESSION_OUTPUT = "model {model} returns output of shape {shape}, not per-pixel logits [N, C, {h}, {w}]"
MSG_ONE_CHANNEL = (
    "{model} returns {channels} channel(s) per pixel ({shape}): a segmenter needs a logit per class, 2 or more (a "
    "single sigmoid logit z is the softmax of [0, z]: return torch.cat([torch.zeros_like(z), z], 1)); with one "
    "channel every argmax is class 0 and the export check, the search's loss and mIoU measure nothing"
)
SUMMARY = (
    "agrees with the PyTorch fake-quant reference on only {agree:.2%} of {n} pixels whose top-2 logits "
    "are more than {tie:g}% of the logit spread apart (need >= {need:.0%}; max |logit diff| {diff:.4g})"
)
_NO_IGNORE = -1
IGNORED = -100  # a mask's ignored pixels in the training targets (cross-entropy's ignore_index)


def _pixels_last(logits: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` → ``[N·H·W, C]``."""
    c = logits.shape[1]
    return np.moveaxis(np.asarray(logits), 1, -1).reshape(-1, c)


@dataclass(frozen=True)
class Segmentation(Task):
    """A segmenter returning logits ``[N, C, H, W]`` (module docstring)."""

    name = "segmentation"
    output_name = "logits"
    metric_names = ("miou", "dice", "pixel_accuracy", "loss")
    primary = "miou"
    search_metric = "miou"
    agreement_name = "pixel agreement"
    annotation_fields = "masks (field masks)"
    train_loss_words = "per-pixel cross-entropy on the masks"
    without_annotations = ("; the data has no masks: mIoU against the float model's argmax and the loss the "
                           "distillation to its logits")
    diff_name = "logit diff"

    def check_output(self, out: Any, data: Any) -> int:
        h, w = data.sample_shape[-2:]
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[2:]) != (h, w):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(MSG_OUTPUT.format(source=data.source, sample=data.sample_shape, shape=shape, h=h, w=w))
        if out.shape[1] < 2:
            raise ModelLoadError(MSG_ONE_CHANNEL.format(model="the model", channels=int(out.shape[1]),
                                                        shape=tuple(out.shape)))
        return int(out.shape[1])

    def check_annotations(self, data: Any, num_classes: int) -> None:
        if isinstance(data.annotations, Masks):
            check_mask_labels(data.annotations, num_classes, data.source)

    def check_outputs(self, outputs: np.ndarray, model: str, data: Any) -> None:
        h, w = data.sample_shape[-2:]
        if np.ndim(outputs) != 4 or tuple(np.shape(outputs)[2:]) != (h, w):
            raise ModelLoadError(MSG_SESSION_OUTPUT.format(model=model, shape=list(np.shape(outputs)), h=h, w=w))
        if np.shape(outputs)[1] < 2:
            raise ModelLoadError(MSG_ONE_CHANNEL.format(model=f"model {model}", channels=int(np.shape(outputs)[1]),
                                                        shape=list(np.shape(outputs))))
        self.check_annotations(data, int(np.shape(outputs)[1]))

    def float_tail(self, gm: torch.fx.GraphModule, layers: set[str]) -> set[torch.fx.Node]:
        """The ops after the last conv (an upsampling of the logits): float, like the logits."""
        return float_tail(gm)

    def loss_targets(self, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return teacher

    def sample_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over pixels of KL(softmax(target) ‖ softmax(out)), ``[N]``."""
        log_p = torch.log_softmax(out.float(), dim=1)
        log_q = torch.log_softmax(target.float(), dim=1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=1).flatten(1).mean(dim=1)

    def train_targets(self, data: Any, teacher: torch.Tensor) -> torch.Tensor | None:
        """The masks ``[N, H, W]`` (ignored pixels as ``IGNORED``); None without masks."""
        if not isinstance(data.annotations, Masks):
            return None
        masks = torch.as_tensor(np.asarray(data.annotations.masks, dtype=np.int64))
        return torch.where(masks == data.annotations.ignore_index, torch.full_like(masks, IGNORED), masks)

    def train_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-pixel cross-entropy on the masks, averaged over each image's counted pixels, ``[N]``."""
        ce = F.cross_entropy(out.float(), targets, ignore_index=IGNORED, reduction="none").flatten(1)
        counted = (targets != IGNORED).flatten(1).sum(1).clamp_min(1)
        return ce.sum(1) / counted

    def sample_losses(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None) -> np.ndarray:
        """With the data's masks, the per-pixel cross-entropy on them per image (NaN for an image
        without a counted pixel: it has no loss, as it has no mIoU); else the distillation loss
        to ``reference`` (NaN without one)."""
        if not isinstance(data.annotations, Masks):
            return super().sample_losses(outputs, data, reference)
        targets = self.train_targets(data, None)
        with torch.no_grad():
            loss = self.train_loss(torch.from_numpy(np.asarray(outputs, np.float32)), targets).double().numpy()
        loss[~(targets != IGNORED).flatten(1).any(1).numpy()] = np.nan
        return loss

    def needs_annotations(self, data: Any) -> bool:
        return not isinstance(data.annotations, Masks)

    def _truth(self, data: Any, reference: np.ndarray | None) -> tuple[np.ndarray, int]:
        if isinstance(data.annotations, Masks):
            return data.annotations.masks, data.annotations.ignore_index
        if reference is None:
            raise DataError(f"{data.source}: no masks (field 'masks') to measure mIoU against")
        return np.asarray(reference).argmax(1), _NO_IGNORE

    def evaluate(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None = None) -> GroupMetrics:
        """mIoU, Dice and pixel accuracy per group and overall, and the loss vs ``reference``."""
        outputs = np.asarray(outputs)
        c = outputs.shape[1]
        pred = outputs.argmax(1)
        truth, ignore = self._truth(data, reference)
        loss = self.sample_losses(outputs, data, reference)
        group = np.asarray(data.group)
        names = tuple(data.group_names)

        def row(images: np.ndarray) -> dict[str, float]:
            scores = segmentation_scores(confusion(pred[images], truth[images], c, ignore), ignore)
            counted = loss[images][~np.isnan(loss[images])]  # images without a counted pixel have none
            return {"count": int(images.size), **scores, "loss": float(counted.mean()) if counted.size else float("nan")}

        by_group = {name: row(np.flatnonzero(group == g)) for g, name in enumerate(names)}
        return GroupMetrics(row(np.arange(len(group))), by_group, c, group_names=names,
                            metric_names=self.metric_names, primary=self.primary)

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        """Share of pixels whose argmax class agrees."""
        return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean()) if len(a) else float("nan")

    def compare(self, got: np.ndarray, want: np.ndarray, shaken: np.ndarray | None = None) -> Comparison:
        """Per-pixel agreement on decided pixels (``shaken``: as a classifier's, per pixel); fails
        below MIN_AGREEMENT with more than one flip."""
        g, w = _pixels_last(got), _pixels_last(want)  # every pixel a sample of the classifier's check
        sh = _pixels_last(shaken) if shaken is not None else None
        tie = tie_threshold(w)
        agree, agree_decided = top1_agreement(g, w, tie, sh) if len(g) else (1.0, 1.0)
        diff = float(np.abs(np.asarray(got) - np.asarray(want)).max(initial=0.0))
        return Comparison(len(g), agree, agree_decided, diff, not agreement_failed(g, w, tie, sh), SUMMARY.format(
            agree=agree_decided, n=int(decided(w, tie, sh).sum()), tie=100 * TIE_FRACTION, need=MIN_AGREEMENT,
            diff=diff))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}
