"""Reader of CSV image manifests: a header ``path,label,group``, one image per row.

Image paths are relative to the CSV's folder; images are read by :func:`read_image` (Pillow).
Without a ``transform`` an image becomes float32 CHW in [0, 1] — no resize, no normalisation:
a model trained on normalised inputs (mean/std) or another size needs ``transform=`` (see
:mod:`.transform`), else every number it gives is silently wrong.
:func:`read_manifest_rows` and :func:`manifest_targets` read the rows and labels without any image,
:func:`manifest_item` one row's image, and :class:`ManifestDataset` is the rows as a Dataset, so
a stream can read images batch by batch.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fqexport.errors import DataError

from .checks import data_error, validate_group_data
from .group_data import GroupData
from .groups import text_groups, warn_spaced_group_names
from .images import read_image
from .manifest_paths import image_path
from .npz import available_memory_bytes
from .progress import reading_bar
from .transform import apply_transform

CSV_COLUMNS = ("path", "label", "group")


def _parse_label(value: str, where: str) -> int:
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f) or f != int(f):
        raise DataError(f"{where}: column 'label' must be an integer class id, got {value!r}")
    return int(f)


MSG_MANIFEST_MEMORY = (
    "{source}: {n} images of {shape} (CHW float32, as the first one) need {need:.1f} GB in memory, more than the "
    "{avail:.1f} GB available; resize them with transform=, use fewer, or give the data as an .npz (read batch by batch)"
)


def load_csv_manifest(path: str | os.PathLike, transform: Callable[[Any], Any] | None = None) -> GroupData:
    """Read a CSV with header ``path,label,group`` (image paths relative to the CSV's folder).

    Images become float32 CHW in [0, 1] (grayscale → 1 channel, RGB → 3) — no resize, no
    normalisation — then ``transform`` (each image as a batch of one, :mod:`.transform`) when
    given; they must all share one shape after it. Column ``group`` holds names, or integer ids
    when every entry is an integer. Needs Pillow (``pip install "fqexport[images]"``).
    """
    rows, folder, source = read_manifest_rows(path)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    gs: list[str] = []
    first: tuple[str, tuple[int, ...]] | None = None
    for i, (line, row) in enumerate(reading_bar(rows, len(rows), "reading images")):
        where = f"{source} line {line}"
        arr, label, group_name = manifest_item(row, where, folder)
        if transform is not None:
            arr = apply_transform(transform, arr[None], i, where)[0]
        if first is None:
            first = (row["path"], arr.shape)
            # every image as this one, held once as read and once stacked: refused before the reads
            need, avail = 2 * len(rows) * arr.nbytes, available_memory_bytes()
            if need > avail:
                raise DataError(MSG_MANIFEST_MEMORY.format(source=source, n=len(rows), shape="x".join(map(str, arr.shape)),
                                                           need=need / 1e9, avail=avail / 1e9))
        elif arr.shape != first[1]:
            raise DataError(
                f"{where}: image {row['path']} is {'x'.join(map(str, arr.shape))} (CHW) but "
                f"{first[0]} is {'x'.join(map(str, first[1]))}; all images must share one "
                "size and channel count (resize them with transform=, e.g. to the model's input size)"
            )
        xs.append(arr)
        ys.append(label)
        gs.append(group_name)
    return validate_group_data(np.stack(xs), np.asarray(ys, dtype=np.int64), text_groups(gs), None, source)




def manifest_targets(rows: Sequence[tuple[int, dict[str, str]]], source: str,
                     need_groups: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels and groups of a manifest's rows (no image read): int64 labels, groups as
    :func:`~.groups.text_groups` gives them (None without ``need_groups``: given elsewhere)."""
    ys, gs = [], []
    for line, row in rows:
        where = f"{source} line {line}"
        if need_groups and not row.get("group"):
            raise DataError(f"{where}: column 'group' is empty")
        ys.append(_parse_label(row.get("label", ""), where))
        gs.append(row.get("group", ""))
    return np.asarray(ys, dtype=np.int64), text_groups(gs) if need_groups else None


def manifest_item(row: dict[str, str], where: str, folder: Path,
                  need_group: bool = True) -> tuple[np.ndarray, int, str]:
    """One manifest row as ``(image float32 CHW, label, group text)``; ``where`` is "file line N";
    without ``need_group`` (the groups given elsewhere) the group cell may be empty."""
    if not row.get("path"):
        raise DataError(f"{where}: column 'path' is empty")
    if need_group and not row.get("group"):
        raise DataError(f"{where}: column 'group' is empty")
    arr = read_image(image_path(row["path"], folder), where)
    return arr, _parse_label(row["label"], where), row.get("group", "")


class ManifestDataset:
    """A CSV manifest's rows as a map-style Dataset of ``(image float32 CHW in [0, 1], label,
    group text, or int id when the column holds the ids 0..K-1)`` items, the image read when the item is. ``samples`` lists ``(image path,
    label text)`` like torchvision's ImageFolder (``GroupsFromCSV(key="path")`` matches it)."""

    def __init__(self, rows: list[tuple[int, dict[str, str]]], folder: Path, source: str,
                 groups_given: bool = False) -> None:
        self.rows, self.folder, self.source = rows, folder, source
        self.samples = [(str(image_path(row.get("path", ""), folder)), row.get("label", "")) for _, row in rows]
        # each item's group as the whole column reads (text_groups, as labels_and_groups gives them):
        # ids 0..K-1, or names, "group<N>" for integer ids that are not 0..K-1; None when
        # load_data's groups= gives them (the column may then be empty): items are (image, label)
        self._groups = None if groups_given else text_groups([row.get("group", "") for _, row in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        line, row = self.rows[i]
        image, label, _ = manifest_item(row, f"{self.source} line {line}", self.folder, self._groups is not None)
        if self._groups is None:
            return image, label
        group = self._groups[i]
        return image, label, int(group) if self._groups.dtype == np.int64 else str(group)

    def describe_item(self, i: int) -> str:
        """Where sample ``i`` comes from, for a message: its CSV line and image file."""
        return f"line {self.rows[i][0]}, image {self.samples[i][0]}"

    def labels_and_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and groups from the CSV alone (no image read)."""
        return manifest_targets(self.rows, self.source, need_groups=self._groups is not None)


def read_manifest_rows(path: str | os.PathLike) -> tuple[list[tuple[int, dict[str, str]]], Path, str]:
    """The rows of a CSV manifest as ``[(line number, {column: text})]``, its folder and its
    source name; the header must hold path,label,group (no image is read)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise data_error(source, "file not found" if not path.exists() else "is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise data_error(
                    source,
                    f"missing column '{missing[0]}' in the header {header}; "
                    "the header must be path,label,group",
                )
            reader.fieldnames = header
            rows, raw = [], []
            for row in reader:
                raw.append(row.get("group") or "")
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise data_error(source, f"cannot read as CSV: {err}") from err
    warn_spaced_group_names(source, raw)
    if not rows:
        raise data_error(source, "the dataset is empty (no rows under the header)")
    return rows, path.parent, source
