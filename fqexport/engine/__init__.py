"""Executors for the search's independent tasks: serial, a local process pool, Ray (optional).

``make_engine(EngineConfig(...))`` returns one; :meth:`Engine.map` runs ``fn(context, task)``
for every task and returns the results in task order, identical whatever the engine.
"""

from __future__ import annotations

from typing import Sequence

from fqexport.config import EngineConfig
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
           "make_engine", "run_task", "task_seed"]


def make_engine(config: EngineConfig | None = None, preload: Sequence[str] = ()) -> Engine:
    """The engine ``config`` asks for (``auto``: local with more than one worker, else serial);
    ``preload``: modules of the task functions, imported once by the local pool's forkserver."""
    config = config or EngineConfig()
    kind = config.kind
    if kind == "ray":
        return RayEngine(config.num_workers, config.retries, config.ray_address, config.task_cpus, config.task_gpus)
    if kind == "local" and config.num_workers > 1:
        return LocalEngine(config.num_workers, config.retries, config.start_method, preload)
    return SerialEngine()
