"""The task of a run from ``--task`` / ``--layout`` (checked by ``fqexport.cli.flags.shared.task_spec``),
and the console line that states which task runs and why."""

from __future__ import annotations

import argparse

from fqexport.cli.flags.shared import task_spec
from fqexport.tasks.base import Task
from fqexport.tasks.resolve import make_task


def task_of(args: argparse.Namespace) -> Task | str | None:
    """The Task of the flags: a layout makes a Detection; a name alone is resolved by the stage
    (which reads a detector's layout from its output); None: inferred by the stage."""
    name, options = task_spec(args)
    if name is None or not options:
        return name
    return make_task(name, **options)


def task_line(record: dict | None) -> str:
    """``"task: detection (layout v5; inferred: the data holds boxes)"`` from a metadata task record."""
    if not record:
        return "task: classification"
    extra = f"layout {record['layout']}; " if "layout" in record else ""
    return f"task: {record['name']} ({extra}{record.get('chosen', 'given')})"
