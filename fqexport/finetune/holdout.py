"""The hold-out's side of fine-tuning: each group's cross-entropy on the held-out samples at the
start and after every epoch, the history of those figures, and the checkpoint with the lowest
worst-group loss (the one fine-tuning keeps)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.finetune.fit_data import logits
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.model import CompressedModel
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification

log = logging.getLogger(__name__)


def per_group(metrics: GroupMetrics) -> dict[str, dict[str, float]]:
    """Each group's accuracy (the task's metrics), loss and count, rounded for the metadata record."""
    return {g: {**{k: round(r[k], 6) for k in metrics.metric_names}, "count": int(r["count"])}
            for g, r in metrics.by_group.items()}


def history_record(history: Sequence[dict], regridded: bool) -> list[dict]:
    """The metadata's per-epoch history: each epoch's hold-out worst-group loss. Per-group figures
    only for epoch 0 after BAQ or AdaRound (``regridded``: a start that is not the model given,
    whose figures are ``holdout_before``); the kept epoch's are ``holdout_after``. Every epoch's
    made most of a small model's file (~3 KB per epoch with 40 groups)."""
    return [h if h["epoch"] == 0 and regridded else {k: v for k, v in h.items() if k != "holdout"} for h in history]


def worst_loss(metrics: GroupMetrics) -> float:
    """The largest loss of a group with samples (inf when none has any)."""
    losses = [r["loss"] for r in metrics.by_group.values() if r["count"]]
    return max(losses) if losses else float("inf")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Holdout:
    """The hold-out data, the per-epoch history on it and the best checkpoint so far.

    ``start(student)`` records epoch 0; after every epoch ``measure`` then ``keep``."""

    def __init__(self, data: GroupData, names: Sequence[str], device: torch.device, task: Task | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.data, self.names, self.device = data, tuple(names), device
        self.task = task or Classification()
        # a task that distils measures its loss against the float model's outputs
        self.reference = (logits(teacher, data.x, device).cpu().numpy()
                          if self.task.distills_in_finetune and teacher is not None else None)
        self.history: list[dict] = []
        self.best_loss, self.best_state, self.best_epoch = float("inf"), {}, 0

    def __len__(self) -> int:
        return len(self.data)

    def measure(self, cm: CompressedModel) -> tuple[GroupMetrics, float]:
        """``(per-group metrics, worst-group loss)`` on the hold-out of ``cm``: the student written
        back, the model fine-tuning would return (its biases on ORT's int32 grid, which the
        student's are not), so the kept checkpoint is chosen on what is exported."""
        metrics = self.metrics_of(cm)
        return metrics, worst_loss(metrics)

    def start(self, student: nn.Module, cm: CompressedModel) -> None:
        """Epoch 0: the start's figures (``cm``: ``student`` written back), and the start as the best checkpoint."""
        metrics, worst = self.measure(cm)
        self.best_loss, self.best_state, self.best_epoch = worst, snapshot(student), 0
        self._append(0, metrics, worst)

    def keep(self, epoch: int, student: nn.Module, metrics: GroupMetrics, worst: float) -> None:
        """Record ``epoch``'s figures (from ``measure``); ``student`` becomes the best checkpoint
        when its worst-group loss is lower than the best so far."""
        self._append(epoch, metrics, worst)
        log.info("finetune epoch %d: hold-out per-group loss %s", epoch,
                 {g: r["loss"] for g, r in metrics.by_group.items()})
        if worst < self.best_loss:
            self.best_loss, self.best_state, self.best_epoch = worst, snapshot(student), epoch

    def restore_best(self, student: nn.Module) -> None:
        """Load the best checkpoint into ``student``: the entries training changed. The others
        are left as they are: a traced graph's constants (``_tensor_constant0``) may be expanded
        views (a YOLO grid's ``arange(G).view(1, G, 1).expand(1, G, G)``), which cannot be copied into."""
        current = student.state_dict()
        changed = {k: v for k, v in self.best_state.items() if not torch.equal(current[k], v)}
        student.load_state_dict(changed, strict=False)

    def metrics_of(self, cm: CompressedModel) -> GroupMetrics:
        """Per-group metrics of a CompressedModel's predictions on the hold-out."""
        return self.task.evaluate(cm.predict(self.data.x), self.data, self.reference)

    def _append(self, epoch: int, metrics: GroupMetrics, worst: float) -> None:
        self.history.append({"epoch": epoch, "holdout_worst_group_loss": round(worst, 6),
                             "holdout": per_group(metrics)})
