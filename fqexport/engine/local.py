"""The local engine: a process pool over this machine's cores.

Each worker starts with one intra-op torch thread. The context of a map (model and data) is
pickled once, to a temporary file, and each worker loads it once, on its first task of that
map; a task then carries only its key and payload. The pool lives until :meth:`close`, so the
maps of one search (sensitivity, then verification) start workers once. Workers are
started by ``forkserver`` (default) or ``spawn``, never ``fork``: a forked copy of a process
whose torch thread pool is running can deadlock. The forkserver preloads torch and the task's
module, so a worker starts in a fraction of a second.

A worker that dies (killed, out of memory) breaks the pool: the pool is restarted, and the
tasks that were running are run again one at a time, so the one that kills its worker is
known; a task whose worker died more than ``retries`` times stops the map with an EngineError
naming it. A task that raises stops the map at once (retrying would raise again).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Sequence

import torch

import fqexport.engine.base as base
from fqexport.engine.base import Engine, Task, TaskFn, kill_spec, run_task, task_error
from fqexport.errors import EngineError

log = logging.getLogger(__name__)

MSG_PICKLE = ("local engine: the model or data cannot be sent to worker processes ({kind}: {err}); "
              "use --engine serial (EngineConfig(engine='serial')) for this model")
MSG_WORKER_DIED = ("local engine: the worker running {task} died {tries} times ({cause}); the search stopped "
                   "and wrote nothing. A worker killed for memory needs fewer --workers; a script that calls "
                   "fqexport needs an `if __name__ == \"__main__\":` guard (workers import it); --engine serial "
                   "runs the task in this process and shows its error")
MSG_POOL_START = ("local engine: no worker process can be started ({kind}: {err}), even by a new pool; the "
                  "machine may be out of memory or processes; use fewer --workers or --engine serial")
MSG_SOCKET_PATH = ("local engine: the worker processes cannot be started: the socket their server listens on "
                   "lives under the temporary folder {tmp!r} ({n} bytes), and its path is longer than the "
                   "{limit} bytes a Unix socket takes; set TMPDIR to a shorter folder (e.g. /tmp) or use "
                   "--engine serial (EngineConfig(engine='serial'))")
# sun_path of a Unix socket (Linux; macOS and the BSDs take 104): the forkserver's listener
# is <tempdir>/pymp-XXXXXXXX/listener-XXXXXXXX
SOCKET_PATH_LIMIT = 108

_context: tuple[str, Any] = ("", None)  # (file, context) this worker last loaded


def _init_worker(caller: int) -> None:
    torch.set_num_threads(1)
    base._in_worker = True
    # Ctrl-C reaches the whole process group: the caller stops the pool (its map terminates the
    # workers), so a worker need not raise KeyboardInterrupt and print its own traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(caller,), name="fqexport-caller-watch", daemon=True).start()


def _exit_with(caller: int) -> None:
    """End this worker once the process that started the pool is gone: a caller killed outright
    (SIGKILL, the OOM killer, a CI job's timeout) cannot stop its pool, whose workers (each holding
    torch and the model) would otherwise idle forever. Polled: a forkserver's worker is not the
    caller's child, so the kernel's parent-death signal does not reach it."""
    while _alive(caller):
        time.sleep(_WATCH_SECONDS)
    os._exit(1)


_WATCH_SECONDS = 1.0
_DIR_PREFIX = "fqexport-engine-"  # then the caller's pid: fqexport-engine-4242-k3j2x


def _remove_dead_callers_dirs() -> None:
    """Remove the context folders (a pickle of a model and its data) that a caller killed
    outright could not remove: those in the temporary folder named for a process that is gone."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if name.startswith(_DIR_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill is the test


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (once per process) told to keep quiet about
    leaked semaphores: a pool whose workers are terminated (a broken pool restarted, an
    interrupt) leaves its queue's semaphore to the tracker, which unlinks it at exit, but first
    printed "There appear to be 1 leaked semaphore objects" after the run's last line. The
    tracker reads ``PYTHONWARNINGS`` when it starts; this process's own is restored at once."""
    from multiprocessing import resource_tracker

    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (before, "ignore:resource_tracker:UserWarning") if w)
    try:
        resource_tracker.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = before


def socket_folder_too_long() -> str | None:
    """The temporary folder when the forkserver's socket path under it
    (``<tmp>/pymp-XXXXXXXX/listener-XXXXXXXX``: 32 bytes more) would not fit a Unix socket's
    :data:`SOCKET_PATH_LIMIT` bytes (with its NUL), else None."""
    tmp = tempfile.gettempdir()
    return tmp if len(os.fsencode(tmp)) + 32 >= SOCKET_PATH_LIMIT else None


def _start_forkserver() -> None:
    """Start multiprocessing's forkserver (once per process) with SIGINT ignored, which it keeps
    across its exec: a Ctrl-C to the process group while it imports the preload modules would
    otherwise print its traceback beside the caller's message. The caller ignores SIGINT only
    while the server process is spawned (milliseconds; only the main thread may set it)."""
    from multiprocessing import forkserver

    try:
        if threading.current_thread() is not threading.main_thread():
            forkserver.ensure_running()
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    except OSError as err:
        if "too long" not in str(err):
            raise
        tmp = tempfile.gettempdir()
        raise EngineError(MSG_SOCKET_PATH.format(tmp=tmp, n=len(os.fsencode(tmp)), limit=SOCKET_PATH_LIMIT)) from err


def _stop_forkserver() -> None:
    """Kill the forkserver after an interrupt. It ignores SIGINT (:func:`_start_forkserver`), so
    one still importing the preload modules would then start the workers the pool had asked
    for, after the caller is gone, each printing a traceback (their queues no longer exist); the
    next pool's ``ensure_running`` finds it dead and starts a new one."""
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass


def _call(fn: TaskFn, context_file: str, task: Task, kill: str | None) -> Any:
    global _context
    if _context[0] != context_file:  # once per worker and map, not once per task
        with open(context_file, "rb") as f:
            _context = (context_file, pickle.load(f))
    return run_task(fn, _context[1], task, kill)


class LocalEngine(Engine):
    """A ``ProcessPoolExecutor`` of ``workers`` processes (see the module docstring), kept for
    every map until :meth:`close`. ``preload``: modules the forkserver imports once (the task
    functions' modules), so a worker starts without importing them."""

    name = "local"

    def __init__(self, workers: int, retries: int = 1, start_method: str = "forkserver",
                 preload: Sequence[str] = ()) -> None:
        super().__init__(workers, retries)
        self.start_method = start_method
        # torch imports torch._dynamo on the first call of a custom op (fqexport's fake-quant
        # ops): 4 s per worker on this machine unless the forkserver has it already
        self.preload = ["torch", "torch._dynamo", *preload]
        self._pool: ProcessPoolExecutor | None = None
        self._dir: str | None = None  # the context files
        self._maps = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = self._server_context()
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))

    def _server_context(self) -> Any:
        """The multiprocessing context, its forkserver started (once per process; the call
        returns at once, the server imports the preload modules meanwhile)."""
        ctx = multiprocessing.get_context(self.start_method)
        _start_resource_tracker()
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(self.preload)  # read when the server starts (once per process)
            _start_forkserver()
        return ctx

    def prepare(self) -> None:
        if self._pool is None:
            self._server_context()

    def _stop_pool(self, kill: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:  # do not wait for running tasks
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._stop_pool()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _write_context(self, context: Any) -> str:
        """The context pickled once into a file each worker reads once."""
        if self._dir is None:
            _remove_dead_callers_dirs()
            self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self._maps += 1
        path = os.path.join(self._dir, f"context-{self._maps}.pkl")
        try:
            with open(path, "wb") as f:
                pickle.dump(context, f, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise EngineError(MSG_PICKLE.format(kind=type(err).__name__, err=err)) from err
        return path

    def _run(self, fn, tasks, context, bar, on_idle=None, beside=None):
        path = self._write_context(context)
        kill = kill_spec()
        if self._pool is None:
            self._pool = self._new_pool()
        pending = deque(range(len(tasks)))
        suspects: set[int] = set()  # in flight when a worker died: rerun one at a time
        deaths = [0] * len(tasks)
        results: dict[int, Any] = {}
        inflight: dict[Future, int] = {}
        try:
            restarts = 0
            while pending or inflight:
                limit = 1 if suspects else self.workers
                while pending and len(inflight) < limit:
                    i = pending.popleft()
                    try:
                        inflight[self._pool.submit(_call, fn, path, tasks[i], kill)] = i
                    except (BrokenProcessPool, EOFError, ConnectionError) as err:
                        # the pool broke while idle, or its forkserver is gone (killed: a container's
                        # OOM killer), so no worker can start: a new pool and server, once
                        pending.appendleft(i)
                        if inflight:  # their futures fail with the pool: the loop below restarts it
                            break
                        restarts += 1
                        if restarts > 1:
                            raise EngineError(MSG_POOL_START.format(kind=type(err).__name__, err=err)) from err
                        log.warning("local engine: the worker pool cannot start a worker (%s: %s); starting a new "
                                    "one", type(err).__name__, err)
                        self._stop_pool(kill=True)
                        self._pool = self._new_pool()
                if beside is not None:
                    beside()  # the workers run their tasks meanwhile
                    beside = None
                if on_idle is not None and not pending and len(inflight) < self.workers:
                    on_idle()  # a worker has nothing left to take
                    on_idle = None
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                broken = []
                for f in done:
                    i = inflight.pop(f)
                    try:
                        results[i] = f.result()
                    except BrokenProcessPool as err:
                        broken.append((i, err))
                        continue
                    except Exception as err:
                        raise task_error(self.name, tasks[i], err) from err
                    suspects.discard(i)
                    bar.update(1)
                if not broken:
                    continue
                # every task in flight fails with the broken pool; only a lone one is surely the cause
                lone = len(broken) + len(inflight) == 1
                wait(inflight)
                victims = sorted([i for i, _ in broken] + list(inflight.values()))
                inflight.clear()
                for i in victims:
                    deaths[i] += 1
                    if lone and deaths[i] > self.retries:
                        raise EngineError(MSG_WORKER_DIED.format(task=tasks[i].label, tries=deaths[i],
                                                                 cause=broken[0][1]))
                log.warning("local engine: a worker died running %s; restarting the pool and retrying",
                            " or ".join(tasks[i].label for i in victims))
                suspects.update(victims)
                pending.extendleft(reversed(victims))
                self._stop_pool(kill=True)
                self._pool = self._new_pool()
        except BaseException as err:
            self._stop_pool(kill=True)
            if not isinstance(err, Exception) and self.start_method == "forkserver":
                _stop_forkserver()  # interrupted: no worker start it still has queued may run
            raise
        finally:
            os.unlink(path)
        return results
