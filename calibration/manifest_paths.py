"""Where a CSV manifest's images are: its ``path`` column resolved against the manifest's folder.
Reads the CSV only (no image, no torch), so the CLI can name them as inputs before any import."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def image_path(text: str, folder: Path) -> Path:
    """A manifest row's image: ``text`` itself when absolute, else under the manifest's ``folder``."""
    path = Path(text)
    return path if path.is_absolute() else folder / path


def manifest_image_paths(manifest: str | os.PathLike) -> list[Path]:
    """The images a CSV manifest names, each once, in row order; ``[]`` for a file that is not a
    readable manifest (its loader reports it)."""
    path = Path(manifest)
    found: dict[Path, None] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                text = (row.get("path") or "").strip()
                if text:
                    found[image_path(text, path.parent)] = None
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return list(found)
