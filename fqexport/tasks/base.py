"""What differs between a classifier, a detector and a segmenter, in one object per task.

A :class:`Task` supplies each stage what it cannot know by itself, so no stage keeps an
``if task == …`` ladder:

- compress: :meth:`Task.check_output` (the model's output fits the task: its class count),
  :meth:`Task.check_annotations` (labels, boxes or masks in range) and :meth:`Task.float_tail`
  (the ops after the last weight layers that stay float: a detector's box decode);
- the search and fine-tuning: :meth:`Task.loss_targets` and :meth:`Task.sample_loss`, the per-sample
  loss (label-free: distillation to the float model), so groups can be weighted; fine-tuning adds
  the task's own training loss where the data has its ground truth (:meth:`Task.train_targets`,
  :meth:`Task.train_loss`: a detector's on its boxes, a segmenter's on its masks);
- the export check: :meth:`Task.compare` (top-1 agreement, matched boxes after NMS, per-pixel
  agreement) between the ONNX session and the PyTorch reference;
- verification and validate: :meth:`Task.evaluate`, the task's own metric per group (accuracy,
  COCO mAP, mIoU) in one :class:`~fqexport.metrics.group_metrics.GroupMetrics`, whose
  ``metric_names`` are the report's columns.

Tasks are frozen dataclasses (their options checked once) and pickle to the search's workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx

from fqexport.errors import DataError
from fqexport.metrics.group_metrics import GroupMetrics

MSG_NEEDS_ANNOTATIONS = (
    "{stage} needs the {task} ground truth: {source} has no {fields}; add them (the fields of an .npz, "
    "docs/tasks.md) or pass data that has them"
)


@dataclass(frozen=True)
class Comparison:
    """The export check's comparison of one session's outputs with the reference's.

    ``agreement``: over every sample (or box, or pixel); ``decided_agreement``: over those that
    are not near-ties at the export's resolution; ``summary``: the failure's words after "the
    exported model run with <kernels>".
    """

    samples: int
    agreement: float
    decided_agreement: float
    max_abs_diff: float
    passed: bool
    summary: str
    decided: int | None = None  # the samples ``decided_agreement`` is over (None: the task does not count them)


class Task(ABC):
    """One task's side of every stage (see the module docstring)."""

    name: ClassVar[str]
    output_name: ClassVar[str] = "logits"  # the ONNX output's name
    metric_names: ClassVar[tuple[str, ...]]  # the per-group metrics (report columns), besides count
    primary: ClassVar[str]  # the metric of the worst group (validate, reports)
    search_metric: ClassVar[str]  # the metric the search's verification ranks candidates by
    agreement_name: ClassVar[str]  # what the export check's agreement counts
    diff_name: ClassVar[str] = "output diff"  # the export check's largest difference
    # how the search measures data without the task's labels / boxes / masks (appended to its words)
    without_annotations: ClassVar[str] = ""
    annotation_fields: ClassVar[str] = "labels (field y)"  # what validate needs, in words
    # fine-tuning's loss: a classifier's distillation + cross-entropy on its labels (fqexport.finetune.losses),
    # else the task's label-free distillation loss (sample_loss against the float model's outputs)
    distills_in_finetune: ClassVar[bool] = True
    # the task's own training loss (fine-tuning with the data's ground truth), in words, and its scale
    # against the distillation at FinetuneConfig.ce_weight=1
    train_loss_words: ClassVar[str] = ""
    train_loss_scale: ClassVar[float] = 1.0

    # ---------------------------------------------------------------------------- compress
    @abstractmethod
    def check_output(self, out: Any, data: Any) -> int:
        """The number of classes of a model output ``out`` on the first samples of ``data``;
        DataError naming the data source when it is not this task's output."""

    @abstractmethod
    def check_annotations(self, data: Any, num_classes: int) -> None:
        """DataError naming the source, field and first offending index for labels, boxes or
        masks outside the model's classes (nothing to check without them)."""

    def float_tail(self, gm: torch.fx.GraphModule, layers: set[str]) -> set[torch.fx.Node] | None:
        """The nodes after the last weight layers that stay float (no Q/DQ pair on them or on the
        weight layers' outputs that feed only them), or None: only the model's output stays float."""
        return None

    # ---------------------------------------------------------------------------- losses
    @abstractmethod
    def loss_targets(self, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`sample_loss` compares a student with: the labels, or what the float
        model (``teacher``, its outputs) says."""

    @abstractmethod
    def sample_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each sample, ``[N]`` (differentiable in ``out``)."""

    def train_targets(self, data: Any, teacher: torch.Tensor) -> torch.Tensor | None:
        """Per-sample targets of :meth:`train_loss` (indexed like labels: ``targets[i]`` is sample
        i's) from ``data``'s ground truth and the float model's outputs ``teacher`` on it; None when
        the data has none (fine-tuning then distils only). Tasks that distil only return None."""
        return None

    def train_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's own training loss of each sample, ``[N]``, against :meth:`train_targets`."""
        raise NotImplementedError(f"the {self.name} task has no training loss of its own")

    # ---------------------------------------------------------------------------- evaluation
    @abstractmethod
    def evaluate(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None = None) -> GroupMetrics:
        """Per-group metrics of ``outputs`` on ``data`` (a GroupData or DataStream); without the
        data's own labels or annotations the float ``reference`` outputs stand in for them."""

    def sample_losses(self, outputs: np.ndarray, data: Any, reference: np.ndarray | None) -> np.ndarray:
        """:meth:`evaluate`'s loss per sample, ``[N]`` float64: by default the distillation loss
        (:meth:`sample_loss`) against the float ``reference`` outputs, NaN without them."""
        if reference is None:
            return np.full(len(outputs), np.nan)
        with torch.no_grad():
            loss = self.sample_loss(torch.from_numpy(np.asarray(outputs, np.float32)),
                                    torch.from_numpy(np.asarray(reference, np.float32)))
        return loss.double().numpy()

    def sample_correct(self, outputs: np.ndarray, data: Any) -> np.ndarray | None:
        """Whether each sample's output is right against the data's own labels, ``[N]`` bool; None
        for a task whose metric is not a per-sample count (mAP, mIoU) or data without labels."""
        return None

    @abstractmethod
    def agreement(self, a: np.ndarray, b: np.ndarray) -> float:
        """How often two models' outputs decide the same (top-1, boxes, pixels), in [0, 1]."""

    @abstractmethod
    def compare(self, got: np.ndarray, want: np.ndarray, shaken: np.ndarray | None = None) -> Comparison:
        """The export check: a session's outputs ``got`` against the reference's ``want``;
        ``shaken``: the reference's outputs with its rounding ties jittered, whose moves mark the
        outputs a file may compute differently without any op being wrong (near-ties)."""

    def needs_annotations(self, data: Any) -> bool:
        """Whether ``data`` lacks what :meth:`evaluate` measures against (labels, boxes, masks)."""
        return data.y is None

    def require_annotations(self, data: Any, stage: str) -> None:
        """DataError naming ``stage`` and the data when it lacks them (:meth:`needs_annotations`)."""
        if self.needs_annotations(data):
            raise DataError(MSG_NEEDS_ANNOTATIONS.format(stage=stage, task=self.name, source=data.source,
                                                         fields=self.annotation_fields))

    @abstractmethod
    def check_outputs(self, outputs: np.ndarray, model: str, data: Any) -> None:
        """A session's outputs on ``data`` are this task's (shape, classes vs the data's labels);
        else ModelLoadError or DataError naming ``model`` and the data."""

    # ---------------------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        """The task and its options, for the ONNX metadata (:func:`~fqexport.tasks.resolve.task_from_dict`)."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

