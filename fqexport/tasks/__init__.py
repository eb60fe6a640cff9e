"""Tasks beyond classification: the one object per task that every stage asks what differs
(see :mod:`fqexport.tasks.base`)."""

from fqexport.tasks.base import Comparison, Task
from fqexport.tasks.classification import Classification
from fqexport.tasks.detection import Detection
from fqexport.tasks.resolve import TASK_NAMES, infer_task, make_task, resolve_task, task_from_dict
from fqexport.tasks.segmentation import Segmentation

__all__ = ["Classification", "Comparison", "Detection", "Segmentation", "TASK_NAMES", "Task", "infer_task",
           "make_task", "resolve_task", "task_from_dict"]
