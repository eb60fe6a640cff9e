"""Classification: logits ``[N, C]``, top-1 accuracy and cross-entropy per group, top-1 agreement
in the export check. fqexport's default task, and its behaviour before tasks existed."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fqexport.calibration.checks import check_labels, require_labels
from fqexport.errors import DataError, ModelLoadError
from fqexport.graph.float_tail import normalised_output_tail
from fqexport.metrics.group_metrics import (
    GroupMetrics,
    agreement,
    cross_entropy,
    group_metrics,
)
from fqexport.tasks.base import Comparison, Task

log = logging.getLogger(__name__)

MSG_ONE_LOGIT = (
    "{source}: the model returns one logit per sample (a sigmoid / BCE binary classifier); fqexport "
    "measures a classifier by softmax cross-entropy over one logit per class, which one logit leaves "
    "constant. Return two instead, e.g. torch.cat([torch.zeros_like(z), z], dim=1): softmax([0, z]) is "
    "[1 - sigmoid(z), sigmoid(z)], the same probabilities, loss and decisions (labels 0/1); column 1 of "
    "the exported model's output is then your logit"
)
MSG_NOT_LOGITS = (
    "{source}: field 'x' with sample shape {sample} gives a model output of shape {shape} per sample, not class "
    "logits [batch, classes]: check that 'x' holds samples of the model's input shape (fqexport "
    "quantizes classifiers that return logits [batch, classes])"
)
MSG_ONE_OUTPUT = (
    "{source}: the model returns one value per sample ([batch, 1]) and the labels go up to {top}: a regressor "
    "(or a count model) is not supported: fqexport measures classifiers that return one logit per class "
    "([batch, classes]), detectors and segmenters"
)
MSG_ONE_VALUE = (
    "{source}: the model returns one value per sample (output [batch]), not class logits [batch, classes]. A "
    "binary classifier's logit z: return torch.stack([torch.zeros_like(z), z], dim=1) (softmax([0, z]) is "
    "[1 - sigmoid(z), sigmoid(z)]); a regressor is not supported (fqexport measures classifiers, detectors and "
    "segmenters)"
)
MSG_UNFLATTENED = (
    "{source}: the model returns [batch, {c}, 1, 1] (a conv head without a flatten), not class logits "
    "[batch, classes]: end its forward with .flatten(1)"
)

# the session outputs validate measures (checked before any number is trusted)
MSG_LABELS = (
    "data {source}: sample {sample}: label {label} is out of range for model {model}, which has {num_classes} "
    "outputs (labels must be in 0..{last}; {n} sample(s) outside)"
)
MSG_OUTPUT = "model {model} returns output of shape {shape}; fqexport validates classifiers with logits [N, C]"

MSG_PROBABILITIES = (
    "%s: the model returns probabilities (every output row lies in [0, 1] and sums to 1: a softmax inside the "
    "model); fqexport reads its output as logits: accuracy and agreement are right, but the losses (validate's "
    "per-group loss, the search's objective, analyze) are the cross-entropy of softmax(probabilities), not of "
    "the model. Return the logits (drop the final softmax; log_softmax is fine) for true losses"
)
_warned_probabilities: set[tuple[str, str]] = set()


def warn_if_probabilities(rows: np.ndarray, where: str) -> None:
    """Warn when ``rows`` ``[N, C]`` look like probabilities, not logits: once per ``where`` and
    outputs (compress reads the same outputs several times), so another model, or the same file
    rewritten, is warned again (keyed on ``where`` alone, a second model was never warned)."""
    rows = np.asarray(rows, dtype=np.float64)
    if not (rows.size and np.isfinite(rows).all() and rows.min() >= 0 and rows.max() <= 1
            and np.allclose(rows.sum(axis=1), 1.0, atol=1e-4)):
        return
    key = (where, hashlib.sha1(np.ascontiguousarray(rows[:64]).tobytes()).hexdigest())
    if key not in _warned_probabilities:
        _warned_probabilities.add(key)
        log.warning(MSG_PROBABILITIES, where)


MIN_AGREEMENT = 0.99
# Samples whose reference top-2 logits are closer than this fraction of the typical logit
# spread (median over samples of max - min logit) are near-ties: ORT's kernels round
# intermediate activations slightly differently from PyTorch (a one-step flip of a uint8 code
# now and then), which can flip them. A broken export (wrong weights, saturating u8×s8
# kernels) moves logits by far more: on the demo CNN, full-range 8-bit weights on an AVX2 CPU
# gave max |logit diff| 10.9 and 95% agreement on decided samples.
TIE_FRACTION = 0.02
SUMMARY = (
    "agrees with the PyTorch fake-quant reference on only {agree:.2%} of the {n} calibration samples whose "
    "top-2 logits are more than {tie:g}% of the logit spread apart and keep their top-1 when the reference's "
    "rounding ties move (need >= {need:.0%}, or a single flipped sample; max |logit diff| {diff:.4g})"
)


def check_logits(logits: np.ndarray, model: str, data: Any) -> None:
    """ModelLoadError unless ``logits`` are ``[N, C]``; DataError for a label outside ``0..C-1``."""
    if logits.ndim != 2:
        raise ModelLoadError(MSG_OUTPUT.format(model=model, shape=list(logits.shape)))
    c = logits.shape[1]
    if c == 1:
        raise ModelLoadError(MSG_ONE_LOGIT.format(source=model))
    warn_if_probabilities(logits, f"model {model}")
    check_label_range(data, c, model)


def check_label_range(data: Any, num_classes: int, model: str) -> None:
    """DataError (:data:`MSG_LABELS`, naming the first sample) for a label of ``data`` outside
    ``0..num_classes-1``; ``validate`` calls it before any pass when the output's width is fixed."""
    bad = (data.y < 0) | (data.y >= num_classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(MSG_LABELS.format(source=data.source, sample=first, label=int(data.y[first]), model=model,
                                          num_classes=num_classes, last=num_classes - 1, n=int(bad.sum())))


def decided(want: np.ndarray, tie: float, shaken: np.ndarray | None = None) -> np.ndarray:
    """Samples whose reference top-2 logits differ by more than ``tie`` (not near-ties) and, given
    ``shaken`` (the reference's outputs with its rounding ties jittered,
    :func:`~fqexport.graph.act_quant.rounding_jitter`), by more than twice what the jitter moved
    them, with the same top-1: a sample the reference itself flips at a rounding tie is a near-tie
    too, whatever its margin (a random-weight EfficientNet: 4 % of samples)."""
    if want.shape[1] < 2:
        return np.ones(want.shape[0], dtype=bool)
    top2 = np.sort(want, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    ok = margin > tie
    if shaken is not None and len(shaken) == len(want):
        moved = np.abs(np.asarray(shaken) - want).max(axis=1)
        ok &= (np.asarray(shaken).argmax(1) == want.argmax(1)) & (margin > 2 * moved)
    return ok


def top1_agreement(got: np.ndarray, want: np.ndarray, tie: float = 0.0,
                   shaken: np.ndarray | None = None) -> tuple[float, float]:
    """``(agreement, agreement on decided samples)`` of the argmax of ``got`` vs ``want``.

    A sample whose reference top-2 logits differ by <= ``tie`` is a near-tie at the export's
    resolution; kernel rounding may flip it either way.
    """
    same = got.argmax(1) == want.argmax(1)
    ok = decided(want, tie, shaken)
    return float(same.mean()), float(same[ok].mean()) if ok.any() else 1.0


def agreement_failed(got: np.ndarray, want: np.ndarray, tie: float, shaken: np.ndarray | None = None) -> bool:
    """The verdict: top-1 agreement on decided samples below MIN_AGREEMENT, with more than one
    flipped sample (on fewer than 100 samples one flip is already > 1%)."""
    ok = decided(want, tie, shaken)
    flips = int(((got.argmax(1) != want.argmax(1)) & ok).sum())
    return flips > 1 and flips > (1.0 - MIN_AGREEMENT) * int(ok.sum())


def tie_threshold(want: np.ndarray) -> float:
    """:data:`TIE_FRACTION` of the median logit spread of the reference."""
    spread = float(np.median(want.max(axis=1) - want.min(axis=1))) if want.size else 0.0
    return TIE_FRACTION * spread


@dataclass(frozen=True)
class Classification(Task):
    """A classifier returning logits ``[batch, classes]``."""

    name = "classification"
    output_name = "logits"
    metric_names = ("accuracy", "loss")
    primary = "accuracy"
    search_metric = "accuracy"
    agreement_name = "top-1 agreement"
    diff_name = "logit diff"
    distills_in_finetune = False
    train_loss_words = "cross-entropy on the labels"
    without_annotations = ("; the data has no labels: accuracy is top-1 agreement with the float model and the "
                           "loss cross-entropy against its top-1")

    def float_tail(self, gm: torch.fx.GraphModule, layers: set[str]) -> set[torch.fx.Node] | None:
        """A softmax / log_softmax / sigmoid after the logits and the logits before it stay float."""
        return normalised_output_tail(gm)

    def check_output(self, out: Any, data: Any) -> int:
        if isinstance(out, torch.Tensor) and out.dim() == 1:
            raise DataError(MSG_ONE_VALUE.format(source=data.source))
        if isinstance(out, torch.Tensor) and out.dim() == 4 and tuple(out.shape[2:]) == (1, 1):
            raise DataError(MSG_UNFLATTENED.format(source=data.source, c=out.shape[1]))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(MSG_NOT_LOGITS.format(source=data.source, sample=data.sample_shape, shape=shape))
        if out.shape[1] == 1:
            y = getattr(data, "y", None)
            top = int(np.max(y)) if y is not None and len(y) else None
            if top is not None and top > 1:  # not a binary classifier's labels
                raise DataError(MSG_ONE_OUTPUT.format(source=data.source, top=top))
            raise DataError(MSG_ONE_LOGIT.format(source=data.source))
        warn_if_probabilities(out.detach().float().numpy(), "the model")
        return int(out.shape[1])

    def check_annotations(self, data: Any, num_classes: int) -> None:
        check_labels(data, num_classes)

    def require_annotations(self, data: Any, stage: str) -> None:
        require_labels(data, stage)

    def check_outputs(self, outputs: np.ndarray, model: str, data: Any) -> None:
        check_logits(outputs, model, data)

    def loss_targets(self, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The labels, else the float model's top-1 (distillation)."""
        return labels if labels is not None else teacher.argmax(1)

    def sample_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per sample against ``target`` class ids."""
        return nn.functional.cross_entropy(out, target, reduction="none")

    def _labels(self, data: Any, reference: np.ndarray | None) -> np.ndarray:
        return data.y if data.y is not None else np.asarray(reference).argmax(1)

    def evaluate(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None = None) -> GroupMetrics:
        """Accuracy and cross-entropy per group; without labels against the reference's top-1."""
        return group_metrics(outputs, self._labels(data, reference), data.group, data.group_names)

    def sample_losses(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None) -> np.ndarray:
        return cross_entropy(outputs, self._labels(data, reference))

    def sample_correct(self, outputs: np.ndarray, data: Any) -> np.ndarray | None:
        return None if data.y is None else np.asarray(outputs).argmax(axis=1) == np.asarray(data.y)

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        return agreement(a, b)

    def compare(self, got: np.ndarray, want: np.ndarray, shaken: np.ndarray | None = None) -> Comparison:
        """Top-1 agreement on the samples whose reference top-2 logits are not near-ties
        (:data:`TIE_FRACTION`, and stable under ``shaken``: :func:`decided`); fails below
        :data:`MIN_AGREEMENT` with more than one flip."""
        tie = tie_threshold(want)
        agree, agree_decided = top1_agreement(got, want, tie, shaken)
        diff = float(np.abs(got - want).max(initial=0.0))
        n = int(decided(want, tie, shaken).sum())
        return Comparison(len(want), agree, agree_decided, diff, not agreement_failed(got, want, tie, shaken),
                          SUMMARY.format(agree=agree_decided, n=n, tie=100 * TIE_FRACTION, need=MIN_AGREEMENT,
                                         diff=diff), decided=n)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}
