"""One lock for the work that touches torch's process-wide state, so that threads calling
fqexport (a web service's pool, a notebook's executor) take turns there.

torch.fx's tracer patches ``nn.Module.__call__`` for the whole process while it traces;
``torch.export`` and ``torch.onnx.export`` keep their tracing state in process globals (mode
stacks, the exporter's patcher, node metadata that even an eager custom op reads); and
``warnings.catch_warnings`` saves and restores the process's warning filters. Two threads inside
fqexport at once failed exports ("Trying to pop empty mode stack"), failed compress ("module is
not installed as a submodule": one thread's modules ran through the other's tracer), left
``torch.backends.mkldnn`` off, or left one call's temporary warning filters installed for good.

So the public calls that trace or run torch models (``compress``, ``export``,
``export_float``, ``finetune``, the search and sweep, ``load_model``, ``analyze``) hold
:data:`GLOBAL_STATE_LOCK` (re-entrant: a search's fits call ``compress`` inside it): threads take
turns, each call runs as it would alone (torch uses every core inside one call). ``validate`` runs
ONNX Runtime sessions and holds it only for the torch parts it has (none today), so validations
run side by side. For work in parallel, use processes (the search's ``--engine local``).

Two more guards keep the caller's own torch state as it was: :func:`with_gradients` (training
and gradient diagnostics under a caller's ``torch.no_grad()``) and :func:`keeps_random_state`
(work that builds layers, which draw from the caller's random generator). They import torch when
called: the CLI imports this module before any stage, and torch with it would slow every command.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

GLOBAL_STATE_LOCK = threading.RLock()

F = TypeVar("F", bound=Callable)


def one_at_a_time(fn: F) -> F:
    """``fn`` run holding :data:`GLOBAL_STATE_LOCK` (the module docstring)."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with GLOBAL_STATE_LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]


def with_gradients(fn: F) -> F:
    """``fn`` run with autograd on, whatever the caller's mode (``torch.no_grad()``,
    ``torch.inference_mode()``, ``set_grad_enabled(False)``: a serving process's or an inference
    notebook's state), which is restored after: training and gradient diagnostics need it."""

    @functools.wraps(fn)
    def graded(*args, **kwargs):
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return graded  # type: ignore[return-value]


def keeps_random_state(fn: F) -> F:
    """``fn`` run on a fork of torch's CPU random generator: the caller's stream is left as it
    was (building a layer, ``nn.Linear(...)``, draws its initial weights from it)."""

    @functools.wraps(fn)
    def forked(*args, **kwargs):
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return forked  # type: ignore[return-value]
