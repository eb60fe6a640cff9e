"""The Ray engine: the same tasks as Ray tasks, on a local or a remote Ray cluster.

The context (model and data) is put in the object store once per map and fetched once per
Ray worker process (cached by its object id); a task carries only its key and payload. Each
task asks for ``task_cpus`` CPUs and ``task_gpus`` GPUs; a task whose worker dies is retried
``retries`` times by Ray (``max_retries``), then the map stops with an EngineError naming it.
Ray is an optional extra (``pip install 'fqexport[ray]'``); it is imported here only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import fqexport.engine.base as base
from fqexport.engine.base import Engine, Task, TaskFn, kill_spec, run_task, task_error
from fqexport.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

MSG_NO_RAY = ("engine='ray' needs Ray, which is not installed: pip install 'fqexport[ray]' "
              "(or use --engine local)")
MSG_CONNECT = ("ray engine: no Ray cluster answered at {address} ({kind}: {err}); start one with "
               "'ray start --head' and pass its address (--ray-address auto on the head node, "
               "ray://HEAD:10001 elsewhere), or omit --ray-address to start a local cluster")
MSG_NO_CLIENT = ("ray engine: --ray-address {address} connects through the Ray Client, which this Ray install "
                 "lacks (its grpcio package): pip install 'fqexport[ray]' (it pulls ray[client]) or "
                 "pip install 'ray[client]'; on the head node itself --ray-address auto needs no client")
MSG_START = ("ray engine: could not start a local Ray cluster of {workers} CPUs ({kind}: {err}); pass "
             "--ray-address auto to use the cluster running on this machine")
MSG_INFEASIBLE = ("ray engine: no node of the Ray cluster ({nodes}) has the resources one task asks for "
                  "(--task-cpus {cpus:g}, --task-gpus {gpus:g}), so no task could ever start; lower them{local}")
MSG_WORKER_DIED = ("ray engine: the worker running {task} died {tries} times ({kind}: {err}); the search stopped "
                   "and wrote nothing")

_cache: dict[str, Any] = {}  # context by object id, per Ray worker process


def _has_ray_client() -> bool:
    """Whether the Ray Client's own dependency (grpcio, what ``ray[client]`` adds) is importable."""
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def _import_ray():
    try:
        import ray  # optional extra
    except ImportError as err:
        raise ConfigError(MSG_NO_RAY) from err
    return ray


def _ray_call(fn: TaskFn, boxed_ref: list, task: Task, kill: str | None) -> Any:
    ray = _import_ray()
    base._in_worker = True
    ref = boxed_ref[0]  # boxed: Ray does not resolve a nested ref, so the worker fetches it once
    key = ref.hex()
    if key not in _cache:
        _cache.clear()
        _cache[key] = ray.get(ref)
    return run_task(fn, _cache[key], task, kill)


# how long a HOST:PORT address may take to accept a connection before it is said to answer none
CONNECT_SECONDS = 5.0


def _check_reachable(address: str | None) -> None:
    """EngineError (:data:`MSG_CONNECT`) when a ``HOST:PORT`` address accepts no connection: Ray's
    ``init`` retries such an address for minutes, printing its own warnings, before it fails
    (a CI job with a wrong address sat there). ``auto``, ``ray://`` and no address: Ray says."""
    text = str(address or "")
    host, sep, port = text.rpartition(":")
    if not sep or "://" in text or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise EngineError(MSG_CONNECT.format(address=address, kind=type(err).__name__, err=err)) from err


@contextmanager
def _own_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init``, which installs Ray's own: a CI
    job's cancel then ends the run as the CLI says (exit 143, its message, the engine closed),
    not in Ray's stack dump and an abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is not previous:
            signal.signal(signal.SIGTERM, previous)


class RayEngine(Engine):
    """Ray tasks (see the module docstring). ``address=None`` starts a local cluster with
    ``workers`` CPUs, stopped by :meth:`close`."""

    name = "ray"

    def __init__(self, workers: int, retries: int = 1, address: str | None = None,
                 task_cpus: float = 1.0, task_gpus: float = 0.0) -> None:
        super().__init__(workers, retries)
        self.ray = _import_ray()
        self.address = address
        self._started = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if address is None:
                # the workers import what this process imports (a user's model module, tests)
                kwargs.update(num_cpus=self.workers, runtime_env={
                    "env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
            if str(address or "").startswith("ray://") and not _has_ray_client():
                raise EngineError(MSG_NO_CLIENT.format(address=address))
            _check_reachable(address)
            try:
                with _own_sigterm():
                    # "local": a new cluster of its own, even where one runs (or RAY_ADDRESS names one);
                    # None would join that one, which refuses num_cpus
                    self.ray.init(address=address or "local", **kwargs)
            except Exception as err:
                msg = MSG_CONNECT if address else MSG_START
                raise EngineError(msg.format(address=address, workers=self.workers, kind=type(err).__name__,
                                             err=err)) from err
            self._started = True
        try:
            self._check_feasible(task_cpus, task_gpus)
            if address is not None:
                self.workers = max(1, int(self.ray.cluster_resources().get("CPU", 1) // task_cpus))
            self._remote = self.ray.remote(_ray_call).options(
                num_cpus=task_cpus, num_gpus=task_gpus, max_retries=self.retries, retry_exceptions=False)
        except BaseException:
            self.close()
            raise

    def _check_feasible(self, cpus: float, gpus: float) -> None:
        """EngineError (:data:`MSG_INFEASIBLE`) when no alive node has ``cpus`` CPUs and ``gpus``
        GPUs: Ray would keep such a task pending for ever, and say so only in its own logs."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive", True)]
        if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            return
        shown = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes) or "no node"
        # more CPUs help only where a node has the GPUs
        more = self.address is None and any(r.get("GPU", 0) >= gpus for r in nodes)
        local = f" or give the local cluster more CPUs (--workers, now {self.workers})" if more else ""
        raise EngineError(MSG_INFEASIBLE.format(nodes=shown, cpus=cpus, gpus=gpus, local=local))

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def _run(self, fn, tasks, context, bar, on_idle=None, beside=None):
        ray = self.ray
        ref = ray.put(context)
        kill = kill_spec()
        refs = {self._remote.remote(fn, [ref], t, kill): i for i, t in enumerate(tasks)}
        results: dict[int, Any] = {}
        waiting = list(refs)
        try:
            if beside is not None:
                beside()
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for r in done:
                    i = refs[r]
                    try:
                        results[i] = ray.get(r)
                    except ray.exceptions.RayTaskError as err:
                        cause = getattr(err, "cause", None) or err
                        raise task_error(self.name, tasks[i], cause) from err
                    except ray.exceptions.RayError as err:  # worker crashed, node lost, object lost
                        raise EngineError(MSG_WORKER_DIED.format(
                            task=tasks[i].label, tries=self.retries + 1, kind=type(err).__name__,
                            err=" ".join(str(err).split())[:300])) from err
                    bar.update(1)
        except BaseException:
            # Where this engine started or joined Ray itself, close() shuts the driver down, which
            # ends its job and the job's tasks: no ray.cancel, which aborted Ray's core worker for a
            # task whose result was on its way back (a C++ check, "Tried to complete task that was
            # not pending": exit 1 and a stack dump instead of an interrupt's exit). Ray started by
            # the caller stays up: its tasks are cancelled.
            if not self._started:
                for r in waiting:
                    try:
                        ray.cancel(r)
                    except Exception:  # already finished
                        pass
            raise
        return results
