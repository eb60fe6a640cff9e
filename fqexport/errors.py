"""Exception hierarchy. Library code raises these; only the CLI maps them to exit codes.

Exit codes used by the CLI: 0 ok, 1 a validation limit broken (:class:`ValidationFailed`),
2 bad input (every other :class:`FqexportError`), 3 an internal error (any other exception),
128+n killed by signal n (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import errno

# errno values of a full disk, a full quota or the file-size limit (`ulimit -f`)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


class FqexportError(Exception):
    """Base class of every error fqexport raises on purpose."""


class ConfigError(FqexportError, ValueError):
    """An option has a value fqexport cannot use (the message names the option and the fix)."""


class DataError(FqexportError, ValueError):
    """Group-labeled data is missing, malformed or inconsistent (names the file and field)."""


class ModelLoadError(FqexportError):
    """A model or checkpoint cannot be loaded or does not match its factory."""


class UnsupportedLayerError(FqexportError):
    """The model holds a layer fqexport cannot quantize (names the layer and its type)."""


class ExportError(FqexportError):
    """Writing or checking the ONNX file failed."""


class OutputPathError(FqexportError):
    """An output path cannot be written, or collides with an input or another output (names the flag)."""


class ValidationFailed(FqexportError):
    """An exported model broke one or more validation limits (exit code 1)."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class EngineError(FqexportError):
    """A search task could not be run: its worker died (after the retries), the Ray cluster did
    not answer, or the task raised (names the task: layer and width, or candidate and fold)."""
