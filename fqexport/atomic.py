"""Atomic file writes: write a temporary file beside the target, then rename it into place,
so no reader (and no failed run) ever leaves a half-written output.

The temporary file is named ``.<name>.fqexport-<pid>.tmp`` after the output and the writing
process, so a run killed with SIGKILL (no handler runs) leaves a file the next write of the same
output recognises and removes once that process is gone. The final file gets the usual
permissions (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from fqexport.errors import OutputPathError

log = logging.getLogger(__name__)

MSG_WRITE = "cannot write {path}: {err}"
_TMP = ".{name}.fqexport-{pid}.tmp"
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


def temp_path(path: str | Path, pid: int | None = None) -> Path:
    """The temporary file ``atomic_write`` uses for ``path`` in process ``pid`` (default: this one)."""
    path = Path(path)
    return path.parent / _TMP.format(name=path.name, pid=os.getpid() if pid is None else pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or a pid we cannot judge: leave its file alone
    return True


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temporary files of ``path`` left by writers that no longer run (killed mid-write)."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.fqexport-") + r"([0-9]+)\.tmp\Z")
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
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        tmp.unlink(missing_ok=True)
        # os.open with 0o666 applies the umask, as open() does (mkstemp would give 0o600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise OutputPathError(MSG_WRITE.format(path=path, err=err.strerror or err)) from err
    try:
        write(tmp)
        os.replace(tmp, path)
        if not _scratch:
            _written.append(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputPathError(MSG_WRITE.format(path=path, err=err.strerror or err)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
