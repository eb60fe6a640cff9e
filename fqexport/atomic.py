"""Atomic file writes: write a temporary file beside the target, then rename it into place,
so no reader (and no failed run) ever leaves a half-written output.

The temporary file is named ``.<name>.fqexport-<writer>-<pid>.tmp`` after the output and the
writing process, so a run killed with SIGKILL (no handler runs) leaves a file the next write of the
same output recognises and removes once that process is gone. ``<writer>`` is a hash of the host
name and the PID namespace: a pid names one process only there, and two CI containers writing to
one shared volume may both be pid 1 (their temp files collided: one job's rename put the other's
half-written file in place). A temp file of another host or namespace is never judged stale. The final file gets the usual
permissions (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from fqexport.errors import OutputPathError

log = logging.getLogger(__name__)

MSG_WRITE = "cannot write {path}: {err}"
_TMP = ".{name}.fqexport-{writer}-{pid}.tmp"
_written: list[Path] = []  # every output this process moved into place, in order


_scratch: list[bool] = []  # inside scratch_writes(): writes not counted as the run's outputs


@contextlib.contextmanager
def scratch_writes() -> Iterator[None]:
    """Writes inside the block are working files (a float reference timed in a temporary folder),
    not outputs of the run: :func:`outputs_written` leaves them out."""
    _scratch.append(True)
    try:
        yield
    finally:
        _scratch.pop()


def outputs_written() -> tuple[Path, ...]:
    """Every output :func:`atomic_write` finished in this process, in order (the CLI names them
    when a run is interrupted after some were written)."""
    return tuple(_written)


@functools.cache
def writer_key() -> str:
    """8 hex digits naming this host and PID namespace (where a pid names one process)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # 'pid:[4026531836]'
    except OSError:  # no /proc (macOS): the host alone
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def temp_path(path: str | Path, pid: int | None = None) -> Path:
    """The temporary file ``atomic_write`` uses for ``path`` in process ``pid`` of this host and
    PID namespace (default: this process)."""
    path = Path(path)
    return path.parent / _TMP.format(name=path.name, writer=writer_key(), pid=os.getpid() if pid is None else pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or a pid we cannot judge: leave its file alone
    return True


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temporary files of ``path`` left by writers of this host and PID namespace that no longer
    run (killed mid-write); another namespace's writer cannot be judged from here."""
    path = Path(path)
    # (the older name ``.<name>.fqexport-<pid>.tmp``, judged as before: by the pid alone)
    pattern = re.compile(re.escape(f".{path.name}.fqexport-") + f"(?:{writer_key()}-)?" + r"([0-9]+)\.tmp\Z")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    stale = []
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            stale.append(path.parent / name)
    return sorted(stale)


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete :func:`stale_temp_files` of ``path``; return what was removed."""
    removed = []
    for tmp in stale_temp_files(path):
        try:
            tmp.unlink()
        except OSError as err:  # pragma: no cover - a race with another cleaner
            log.debug("cannot remove stale %s: %s", tmp, err)
            continue
        log.info("removed %s, left by an interrupted run", tmp)
        removed.append(tmp)
    return removed


def file_head(path: str | Path, size: int = 4096) -> bytes | None:
    """The first ``size`` bytes of the regular file ``path`` (not through a symlink), to tell an
    earlier run's output by its content before removing it; None when there is no such file."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    Stale temp files of ``path`` from killed runs are removed first. The temp file is removed
    on any exception (including KeyboardInterrupt and the CLI's SIGTERM exit). An ``OSError``
    (read-only folder, disk full) becomes :class:`~fqexport.errors.OutputPathError`.
    """
    atomic_write_together([(Path(path), write)])
    return Path(path)


def atomic_write_together(writes: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """:func:`atomic_write` of several files that belong together (an ONNX graph and its external
    data): every ``write(tmp)`` runs first, in order (a later one may read an earlier one's
    :func:`temp_path`), then the files are renamed into place in order with SIGINT and SIGTERM
    held back until the last one is (an interrupt between two renames left a graph naming the
    other run's data); on any error no temp file stays and no file is replaced."""
    tmps: list[Path] = []
    try:
        for path, _ in writes:
            tmp = temp_path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temp_files(path)
                tmp.unlink(missing_ok=True)
                # os.open with 0o666 applies the umask, as open() does (mkstemp would give 0o600).
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except OSError as err:
                raise OutputPathError(MSG_WRITE.format(path=path, err=err.strerror or err)) from err
            tmps.append(tmp)
        for (path, write), tmp in zip(writes, tmps):
            try:
                write(tmp)
            except OSError as err:
                raise OutputPathError(MSG_WRITE.format(path=path, err=err.strerror or err)) from err
        with _signals_held(len(writes) > 1):
            for (path, _), tmp in zip(writes, tmps):
                try:
                    os.replace(tmp, path)
                except OSError as err:
                    raise OutputPathError(MSG_WRITE.format(path=path, err=err.strerror or err)) from err
                if not _scratch:
                    _written.append(path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _signals_held(hold: bool) -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are recorded, and their handlers run after it
    (when ``hold``, on the main thread, where Python runs handlers; else nothing is held). Python's
    handlers are swapped, not the thread's signal mask: another thread (torch's, ONNX Runtime's)
    would take a signal this one blocks."""
    if not hold or threading.current_thread() is not threading.main_thread() or None in (
            signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)):  # a handler set outside Python
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in arrived[:1]:  # as it would have been handled
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
