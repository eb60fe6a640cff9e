"""The executor interface for the search's independent tasks.

A task is a module-level function ``fn(context, task)`` and a :class:`Task` (its key, a label
for messages and a small payload). The ``context`` — the model and the calibration data — is
the same for every task of one :meth:`Engine.map` and is shipped to each worker once; the
task's own arguments travel with it. Every engine runs a task the same way
(:func:`run_task`): torch and numpy seeded from the task's key (a stable hash, not Python's
salted ``hash``), one intra-op torch thread, so a task's result does not depend on the engine,
the worker count or the order in which tasks finish; :meth:`Engine.map` returns the results in
the order of the tasks given.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from fqexport.progress import tqdm

from fqexport.errors import ConfigError, EngineError, FqexportError

log = logging.getLogger(__name__)

MSG_TASK_FAILED = "{engine} engine: {task} failed: {kind}: {err}"
MSG_DUPLICATE_KEYS = "engine.map: task keys must be unique (repeated: {keys})"
# Test hook: in a worker process (never in the caller's), a task whose label contains the value
# of this variable (read in the caller at each map) kills its worker. "TEXT|MARKER" kills only
# while the file MARKER does not exist (and creates it): the worker dies on the first try only.
KILL_ENV = "FQEXPORT_TEST_KILL_TASK"

_in_worker = False  # set by the worker initializers of the local and Ray engines


def in_worker() -> bool:
    """Whether this process is a worker of the local or Ray engine (its warnings would repeat
    the caller's)."""
    return _in_worker


@dataclass(frozen=True)
class Task:
    """One independent work unit.

    Attributes:
        key: identifies the task (tuple of str/int); its seed is derived from it.
        label: what a message calls it: ``"sensitivity of layer 'fc1' at 4 bits"``.
        payload: small picklable arguments (the context carries the large ones).
    """

    key: tuple
    label: str
    payload: Any = None


TaskFn = Callable[[Any, Task], Any]


def task_seed(key: tuple) -> int:
    """A seed in [0, 2³¹) from the key's ``repr`` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "little") & 0x7FFFFFFF


def kill_spec() -> str | None:
    """The caller's :data:`KILL_ENV` (sent with each task: a worker's own environment is the one
    its pool started with)."""
    return os.environ.get(KILL_ENV)


def _test_kill(task: Task, spec: str | None) -> None:
    if not spec or not _in_worker:
        return
    text, _, marker = spec.partition("|")
    if text not in task.label:
        return
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    log.warning("test hook %s: killing the worker running %s", KILL_ENV, task.label)
    os._exit(1)


def run_task(fn: TaskFn, context: Any, task: Task, kill: str | None = None, threads: int | None = 1) -> Any:
    """Run ``fn(context, task)`` as every engine does: seeded from ``task.key`` (torch and
    numpy; the caller's random state is restored), on ``threads`` intra-op torch threads (one, as
    every engine runs a task; ``None``: the process's own count, as ``compress`` runs). ``kill``:
    the test hook's :func:`kill_spec`."""
    _test_kill(task, kill)
    own = torch.get_num_threads()
    np_state = np.random.get_state()
    seed = task_seed(task.key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        torch.set_num_threads(threads or own)
        try:
            return fn(context, task)
        finally:
            torch.set_num_threads(own)
            np.random.set_state(np_state)


def task_error(engine: str, task: Task, err: BaseException) -> Exception:
    """The error to raise for a task that raised ``err``: the same FqexportError class with the
    task named first (so the CLI maps it to the same exit code), else an EngineError."""
    if isinstance(err, FqexportError):
        try:
            out = type(err)(f"{task.label}: {err}")
            if hasattr(err, "failures"):
                out.failures = list(err.failures)
            return out
        except Exception:  # an unusual constructor: fall through to EngineError
            pass
    return EngineError(MSG_TASK_FAILED.format(engine=engine, task=task.label, kind=type(err).__name__,
                                              err=" ".join(str(err).split())[:500]))


class Engine(ABC):
    """Runs independent tasks; see the module docstring. Use as a context manager (workers and
    clusters it started are stopped on exit)."""

    name: str = "engine"

    def __init__(self, workers: int = 1, retries: int = 1) -> None:
        self.workers = int(workers)
        self.retries = int(retries)

    @property
    def label(self) -> str:
        """``"local ×4"``: the engine and its worker count (the progress bar shows it)."""
        return f"{self.name} ×{self.workers}"

    def map(self, fn: TaskFn, tasks: Sequence[Task], context: Any, desc: str, *, progress: bool = False,
            on_idle: Callable[[], None] | None = None, beside: Callable[[], None] | None = None) -> list:
        """``[fn(context, t) for t in tasks]``, run by this engine, with one progress bar.

        ``on_idle``: called once, in this process and on this thread, as soon as a worker has no
        task left to take while others still run (the map's last tasks), so the caller can use
        that capacity meanwhile (it may block: the map collects the results when it returns); not
        called when the last tasks end together, nor by an engine that cannot tell (serial: never
        idle; Ray).

        ``beside``: called once on this thread as soon as the tasks are handed to the workers,
        which run them meanwhile (the serial engine calls it first). On this thread, not a helper
        one: glibc serves a helper thread's large tensors from fresh mmaps (its arena heaps
        are 64 MB at most), which cost a solver fit a quarter more time in page faults. An
        exception from it stops the map (its workers are stopped as for a failed task)."""
        tasks = list(tasks)
        seen: set = set()
        dup = [t.key for t in tasks if t.key in seen or seen.add(t.key)]
        if dup:
            raise ConfigError(MSG_DUPLICATE_KEYS.format(keys=", ".join(map(repr, dup[:5]))))
        if not tasks:
            if beside is not None:
                beside()
            return []
        bar = tqdm(total=len(tasks), desc=f"{desc} [{self.label}]", unit="task", disable=not progress)
        try:
            results = self._run(fn, tasks, context, bar, on_idle, beside)
        finally:
            bar.close()
        return [results[i] for i in range(len(tasks))]

    @abstractmethod
    def _run(self, fn: TaskFn, tasks: list[Task], context: Any, bar, on_idle: Callable[[], None] | None = None,
             beside: Callable[[], None] | None = None) -> dict[int, Any]:
        """Results by task index; ``bar.update(1)`` per finished task; ``on_idle`` and ``beside``
        as :meth:`map` says."""

    def prepare(self) -> None:
        """Start what the first map would start and can start in the background now (the local
        engine's forkserver, which imports torch: seconds of CPU), so that it overlaps the
        caller's own work instead of delaying the first map's tasks. Idempotent; nothing here."""

    def close(self) -> None:
        """Stop what this engine started (worker processes, a local Ray cluster)."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialEngine(Engine):
    """Every task in this process, one after another (today's behaviour; for debugging)."""

    name = "serial"

    def __init__(self) -> None:
        super().__init__(workers=1, retries=0)

    def _run(self, fn, tasks, context, bar, on_idle=None, beside=None):
        if beside is not None:
            beside()
        results = {}
        for i, task in enumerate(tasks):
            try:
                results[i] = run_task(fn, context, task)
            except Exception as err:
                raise task_error(self.name, task, err) from err
            bar.update(1)
        return results
