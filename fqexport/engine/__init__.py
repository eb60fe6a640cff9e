"""Executors for the search's independent tasks: serial, a local process pool, Ray (optional).

``make_engine(EngineConfig(...))`` returns one; :meth:`Engine.map` runs ``fn(context, task)``
for every task and returns the results in task order, identical whatever the engine.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import threading
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
from fqexport.engine.local import LocalEngine, socket_folder_too_long
from fqexport.engine.ray_engine import RayEngine

__all__ = ["Engine", "EngineConfig", "KILL_ENV", "LocalEngine", "RayEngine", "SerialEngine", "Task",
           "interactive_class", "make_engine", "run_task", "task_seed", "unguarded_script"]


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


MSG_UNGUARDED = (
    "local engine: the script {path} has no `if __name__ == \"__main__\":` guard, and the pool's worker processes "
    "import it (as Python's multiprocessing does): each would run the script again; put its calls under the guard, "
    "or use EngineConfig(engine='serial') (CLI: --engine serial)"
)
MSG_UNGUARDED_SERIAL = (
    "engine 'auto': the script {path} has no `if __name__ == \"__main__\":` guard, and the local pool's worker "
    "processes would run it again: the search runs serially (put its calls under the guard to use the pool)"
)

MSG_SOCKET_SERIAL = (
    "engine 'auto': the temporary folder {tmp!r} ({n} bytes) is too long a path for the local pool's Unix "
    "socket: the search runs serially (set TMPDIR to a shorter folder, e.g. /tmp, to use the pool)"
)


def make_engine(config: EngineConfig | None = None, preload: Sequence[str] = (), sent: Sequence[Any] = ()) -> Engine:
    """The engine ``config`` asks for (``auto``: local with more than one worker, else serial);
    ``preload``: modules of the task functions, imported once by the local pool's forkserver;
    ``sent``: the objects the tasks will carry (a model, a dataset): one of a class defined in an
    interactive ``__main__`` (:func:`interactive_class`) makes ``auto`` serial, said once, and
    ``local`` / ``ray`` an EngineError, before any worker starts; so does a call made at a script's
    top level outside its ``if __name__ == "__main__":`` block (:func:`unguarded_script`) for a
    local pool, whose workers would make it again."""
    config = config or EngineConfig()
    kind = config.kind
    found = interactive_class(sent) if kind in ("local", "ray") else None
    if found is not None:
        if config.engine != "auto":
            raise EngineError(MSG_INTERACTIVE.format(engine=kind, what=found[0], name=found[1]))
        log.warning(MSG_INTERACTIVE_SERIAL.format(what=found[0], name=found[1]))
        return SerialEngine()
    script = unguarded_script() if kind == "local" and config.num_workers > 1 else None
    if script is not None:
        if config.engine != "auto":
            raise EngineError(MSG_UNGUARDED.format(path=script))
        log.warning(MSG_UNGUARDED_SERIAL.format(path=script))
        return SerialEngine()
    long_tmp = socket_folder_too_long() if kind == "local" and config.num_workers > 1 \
        and config.start_method == "forkserver" and config.engine == "auto" else None
    if long_tmp is not None:
        log.warning(MSG_SOCKET_SERIAL.format(tmp=long_tmp, n=len(os.fsencode(long_tmp))))
        return SerialEngine()
    if kind == "ray":
        return RayEngine(config.num_workers, config.retries, config.ray_address, config.task_cpus, config.task_gpus)
    if kind == "local" and config.num_workers > 1:
        return LocalEngine(config.num_workers, config.retries, config.start_method, preload)
    return SerialEngine()


def unguarded_script() -> str | None:
    """The path of the running ``__main__`` script when the call that asks for a local pool runs at
    its top level outside an ``if __name__ == "__main__":`` block: the pool's workers import the
    script (Python's multiprocessing does) and would make that call again (from a thread: where
    the main thread runs the script). None when it runs inside such a block (or in a function
    called from it), when no top-level frame of the script is on the stack, and for no file, a
    package's ``__main__`` run with ``-m`` (which multiprocessing does not import) or an
    unreadable source."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return None
    path = getattr(spec, "origin", None) if spec is not None else getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    frame = _script_frame(sys._getframe(1), path)
    if frame is None:  # a thread's call: where the main thread runs the script
        main_thread = sys._current_frames().get(threading.main_thread().ident)
        frame = _script_frame(main_thread, path) if main_thread is not None else None
    if frame is None:
        return None
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    blocks = [node.orelse if _negated(node.test) else node.body  # the lines that run as the script
              for node in ast.walk(tree) if isinstance(node, ast.If) and _tests_main(node.test)]
    inside = any(b and b[0].lineno <= line <= (b[-1].end_lineno or b[-1].lineno) for b in blocks)
    return None if inside else path


def _script_frame(frame: Any, path: str) -> Any:
    """The frame on ``frame``'s stack running the top level of the script at ``path`` (an ``exec``
    of another source on the way is passed over), else None."""
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"
                and os.path.abspath(code.co_filename) == os.path.abspath(path)):
            return frame
        frame = frame.f_back
    return None


def _tests_main(test: ast.expr) -> bool:
    """Whether an ``if`` test compares ``__name__`` with ``"__main__"`` (``==``, ``!=``, ``in (...)``,
    within an ``and``)."""
    for node in ast.walk(test):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            names = any(isinstance(x, ast.Name) and x.id == "__name__" for x in parts)
            if names and any(isinstance(c, ast.Constant) and c.value == "__main__" for x in parts for c in ast.walk(x)):
                return True
    return False


def _negated(test: ast.expr) -> bool:
    """``__name__ != "__main__"``: the script's own block is the ``else``."""
    return isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.NotEq, ast.NotIn))


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
