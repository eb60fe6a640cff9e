"""Readers of group-labeled data: one entry point, :func:`load_data`, over the format readers.

A :class:`GroupData` is re-checked (:mod:`.checks`), an ``.npz`` path read by :mod:`.npz`, a
``.csv`` path by :mod:`.manifest` (CSV image manifest) and a torch Dataset by :mod:`.dataset`.
Every reader returns a validated :class:`GroupData`; bad input raises one :class:`DataError`
whose message starts with the file (or source) and names the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fqexport.errors import DataError

from .checks import validate
from .dataset import from_dataset
from .group_data import GroupData
from .manifest import load_csv_manifest
from .npz import load_npz


def load_data(spec: Any) -> GroupData:
    """Load group-labeled data from a GroupData, an ``.npz``/``.csv`` path or a torch Dataset."""
    if isinstance(spec, GroupData):
        return validate(spec)
    if isinstance(spec, (str, os.PathLike)):
        suffix = Path(spec).suffix.lower()
        if suffix == ".npz":
            return load_npz(spec)
        if suffix == ".csv":
            return load_csv_manifest(spec)
        raise DataError(
            f"{spec}: unsupported data file type {suffix or '(no suffix)'!r}; give an .npz "
            "(arrays x, y, group) or a .csv manifest (path,label,group)"
        )
    if isinstance(spec, torch.utils.data.Dataset):
        return from_dataset(spec, source=f"<{type(spec).__name__}>")
    raise DataError(
        f"cannot load data from a {type(spec).__name__}; give a GroupData, an .npz or .csv "
        "path, or a torch Dataset yielding (x, y, group)"
    )
