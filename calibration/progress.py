"""The progress bar of a reader: shown (when stderr is a TTY) only for a long source."""

from __future__ import annotations

from typing import Iterable, TypeVar

from fqexport.progress import tqdm

T = TypeVar("T")

# Sources at least this long show a progress bar (when stderr is a TTY).
PROGRESS_MIN = 1000


def reading_bar(items: Iterable[T], n: int, desc: str) -> Iterable[T]:
    """``items`` (``n`` of them) under a tqdm bar named ``desc`` when ``n >= PROGRESS_MIN``."""
    return tqdm(items, desc=desc, disable=None if n >= PROGRESS_MIN else True)
