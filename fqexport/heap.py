"""Large freed blocks kept in the heap while the solver's matrices come and go (glibc only).

A layer's Hessian work allocates and frees tensors of tens to hundreds of MB (the Hessian in
solve order, its Cholesky factor, the retarget's products). glibc serves a block above its mmap
threshold (at most 32 MB, adapted at run time) with a fresh ``mmap`` and unmaps it on ``free``,
so every such tensor page-faults all its pages again: ~20,000 faults for a 4608² float32
matrix. :func:`reuse_freed_memory` raises glibc's mmap and trim thresholds while it runs, so
those blocks come from the heap and stay there for the next layer; on leaving, the free heap
goes back to the OS (``malloc_trim``) and the thresholds to 32 MB / 64 MB, where glibc's own
adaptation settles. Measured on ``compress`` at W4 (2-core AVX2 machine, 64 images): ResNet-18
size 11.0–11.6 s → 9.6–10.1 s, peak RSS +4–15 % (``benchmarks/compress_bench.py``).

It does nothing where the C library is not glibc, nothing when the environment sets
``FQEXPORT_MALLOC_TUNING=0``, and nothing when the process was started with its own thresholds
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES``). Nested and concurrent uses (a search's fits in threads) count:
the first one in sets the thresholds, the last one out restores them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
RAISED = 1 << 30  # blocks up to 1 GiB from the heap, and kept there once freed
# glibc's dynamic mmap threshold tops out at 32 MB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and
# sets the trim threshold to twice it: where a long-running process ends up on its own
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20
ENV = "FQEXPORT_MALLOC_TUNING"

_lock = threading.Lock()
_depth = 0
_libc: Any = None


def _glibc() -> Any:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    global _libc
    if _libc is None:
        _libc = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc = lib
            except (OSError, AttributeError) as err:
                log.debug("glibc malloc tuning unavailable: %s", err)
    return _libc or None


def _set(lib: Any, mmap: int, trim: int) -> None:
    if not (lib.mallopt(M_MMAP_THRESHOLD, mmap) and lib.mallopt(M_TRIM_THRESHOLD, trim)):
        log.debug("mallopt refused mmap=%d trim=%d", mmap, trim)


# The user's own glibc malloc thresholds (environment or tunables): left as they are, since
# glibc cannot report them and the exit would otherwise set the settled values over them.
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def user_tuned() -> bool:
    """Whether the process was started with its own glibc mmap/trim thresholds."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(os.environ.get(k) for k in _USER_MALLOC_ENV) or any(t in tunables for t in _USER_TUNABLES)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """While the block runs, glibc keeps freed blocks of up to 1 GiB in the heap for reuse
    (module docstring); afterwards the free heap is returned to the OS."""
    global _depth
    lib = _glibc() if os.environ.get(ENV, "1") != "0" and not user_tuned() else None
    if lib is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(lib, RAISED, RAISED)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.malloc_trim(0)
                _set(lib, SETTLED_MMAP, SETTLED_TRIM)
