"""The progress bars fqexport draws: tqdm's, off where there is no stderr to draw on."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled when ``sys.stderr`` is None and no ``file``
    is given (pythonw, a PyInstaller ``--noconsole`` app, a service started without standard
    streams): tqdm would raise ``AttributeError`` writing to it."""
    if sys.stderr is None and kwargs.get("file") is None:
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
