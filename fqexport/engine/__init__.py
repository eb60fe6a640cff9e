"""Executors for the search's independent tasks: serial, a local process pool, Ray (optional).

``make_engine(EngineConfig(...))`` returns one; :meth:`Engine.map` runs ``fn(context, task)``
for every task and returns the results in task order, identical whatever the engine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

from fqexport.config import EngineConfig
from fqexport.errors import EngineError
from fqexport.engine.base import (
    KILL_ENV,
    Engine,
    SerialEngine,
    Task,
    run_task,
    task_seed,
)
from fqexport.engine.local import LocalEngine
from fqexport.engine.ray_engine import RayEngine

__all__ = ["Engine", "EngineConfig", "KILL_ENV", "LocalEngine", "RayEngine", "SerialEngine", "Task",
           "interactive_class", "make_engine", "run_task", "task_seed"]


log = logging.getLogger(__name__)

MSG_INTERACTIVE = (
    "{engine} engine: {what} class {name!r} is defined in an interactive session (a notebook, python -c, a script "
    "read from stdin), which worker processes cannot import; define it in a module file, or use "
    "EngineConfig(engine='serial') (CLI: --engine serial)"
)
MSG_INTERACTIVE_SERIAL = (
    "engine 'auto': {what} class {name!r} is defined in an interactive session, which worker processes cannot "
    "import: the search runs serially (define it in a module file to use the local pool)"
)


def make_engine(config: EngineConfig | None = None, preload: Sequence[str] = (), sent: Sequence[Any] = ()) -> Engine:
    """The engine ``config`` asks for (``auto``: local with more than one worker, else serial);
    ``preload``: modules of the task functions, imported once by the local pool's forkserver;
    ``sent``: the objects the tasks will carry (a model, a dataset): one of a class defined in an
    interactive ``__main__`` (:func:`interactive_class`) makes ``auto`` serial, said once, and
    ``local`` / ``ray`` an EngineError, before any worker starts."""
    config = config or EngineConfig()
    kind = config.kind
    found = interactive_class(sent) if kind in ("local", "ray") else None
    if found is not None:
        if config.engine != "auto":
            raise EngineError(MSG_INTERACTIVE.format(engine=kind, what=found[0], name=found[1]))
        log.warning(MSG_INTERACTIVE_SERIAL.format(what=found[0], name=found[1]))
        return SerialEngine()
    if kind == "ray":
        return RayEngine(config.num_workers, config.retries, config.ray_address, config.task_cpus, config.task_gpus)
    if kind == "local" and config.num_workers > 1:
        return LocalEngine(config.num_workers, config.retries, config.start_method, preload)
    return SerialEngine()


def interactive_class(objects: Sequence[Any]) -> tuple[str, str] | None:
    """``("the model's", "Net")`` for the first object (a module's submodules too) whose class is
    defined in a ``__main__`` that has no file a worker could import it from; else None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None and os.path.isfile(path):
        return None
    for obj in objects:
        parts = list(obj.modules()) if hasattr(obj, "modules") and callable(obj.modules) else [
            obj, getattr(obj, "dataset", None)]  # a DataLoader's Dataset
        for part in parts:
            if type(part).__module__ == "__main__":
                what = "the model's" if hasattr(obj, "modules") else "the data's"
                return what, type(part).__qualname__
    return None
