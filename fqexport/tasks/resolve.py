"""Which task a run is: given (a name or a :class:`~fqexport.tasks.base.Task`), read back from an
export's metadata, or inferred from the data's fields and the model's output.

Inference (``task=None``, CLI ``--task`` left out): boxes in the data → detection; masks →
segmentation; else the model's output on the first samples: ``[N, C]`` → classification,
``[N, C, H, W]`` at the input's (H, W) → segmentation, a 3-D output → detection (layout v8
``[N, 4 + C, K]`` or v5 ``[N, K, 5 + C]``: the one whose score channels alone are probabilities in
[0, 1], else v8 when the second dim is the smaller); anything else
is classification, whose check names the shape. :func:`inferred_words` says what was chosen and why.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

import torch

from fqexport.calibration.annotations import Boxes, Masks
from fqexport.config import check_choice
from fqexport.errors import ConfigError
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification
from fqexport.tasks.detection import LAYOUTS, Detection
from fqexport.tasks.segmentation import Segmentation

TASKS: dict[str, type] = {"classification": Classification, "detection": Detection, "segmentation": Segmentation}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
MSG_TASK = "task={task!r} must be one of {names} or a Task object (fqexport.tasks)"


def check_name(name: Any) -> str:
    """``name`` if it is a task's name, else ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(MSG_TASK.format(task=name, names=", ".join(TASK_NAMES)))
    check_choice(name, TASK_NAMES, "task")
    return name


def make_task(task: str | Task, **options: Any) -> Task:
    """``task`` as a Task object: a name (with its options, e.g. ``layout="v8"``) or the object itself."""
    if isinstance(task, Task):
        return task
    return TASKS[check_name(task)](**options)


def task_from_dict(d: Mapping[str, Any] | None) -> Task | None:
    """The task an export's metadata records (``Task.to_dict``); None for files without one."""
    if not d:
        return None
    kind = TASKS[check_name(d.get("name"))]
    known = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in d.items() if k in known})


def infer_task(data: Any, output: Any) -> tuple[Task, str]:
    """The task of ``data`` and a model output on its first samples, and why (module docstring)."""
    notes = getattr(data, "annotations", None)
    if isinstance(notes, Boxes):
        return Detection(layout=_layout(output)), "the data holds boxes"
    if isinstance(notes, Masks):
        return Segmentation(), "the data holds masks"
    if isinstance(output, torch.Tensor) and output.dim() == 4 and tuple(output.shape[2:]) == tuple(
            data.sample_shape[-2:]):
        return Segmentation(), f"the model's output {tuple(output.shape)} is per-pixel logits"
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        layout = _layout(output)
        return Detection(layout=layout), f"the model's output {tuple(output.shape)} is a detector's (layout {layout})"
    return Classification(), "the data holds no boxes or masks"


def _layout(output: Any) -> str:
    """The layout whose score channels alone hold probabilities; where both or neither do, v8 when
    the second dim is the smaller (a one-level YOLOv8 head with more classes than anchors,
    ``[N, 24, 16]``, is v8 by its scores though its shape says v5)."""
    if not (isinstance(output, torch.Tensor) and output.dim() == 3):
        return "v5"
    fits = [layout for layout in LAYOUTS if Detection(layout=layout).reads_probabilities(output)]
    if len(fits) == 1:
        return fits[0]
    return "v8" if output.shape[1] < output.shape[2] else "v5"


def resolve_task(task: str | Task | None, data: Any, output: Any) -> tuple[Task, str]:
    """The run's task and how it was chosen: ``task`` when given (a name takes the layout the
    output shows), else :func:`infer_task`."""
    if task is None:
        found, why = infer_task(data, output)
        return found, f"inferred: {why}"
    if task == "detection":
        return Detection(layout=_layout(output)), "given"
    return make_task(task), "given"
