"""Groups given beside the samples: ``load_data(source, groups=...)``.

``groups`` may be

- an array (or list) of ``N`` group ids or names, one per sample in the source's order;
- a function ``groups(index, sample) -> id or name``, called once per sample with its index and
  the item as the source yields it (``x``, ``(x, y)`` or ``(x, y, group)``);
- :class:`GroupsFromCSV`: a column of a CSV file, matched to the samples by their file path (an
  ImageFolder's ``samples[i][0]``) or by their index.

An array or a CSV column is read without reading any sample; a function needs one pass over the
samples. A sample the CSV does not name, a CSV without the column, or an array of the wrong
length raises one :class:`~fqexport.errors.DataError` naming the source and the first sample.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fqexport.errors import ConfigError, DataError

from .checks import data_error

logger = logging.getLogger(__name__)

MSG_SPACED_GROUPS = (
    "{source}: the group names {variants} differ only by spaces around them and are read as one group "
    "{name!r} (a CSV's cells are read without surrounding spaces, as in 'a, b'); rename them if they are "
    "different groups"
)


def warn_spaced_group_names(source: str, raw: Sequence[str]) -> None:
    """Warn, once per name, about group texts of a CSV that stripping merges into one group."""
    variants: dict[str, set[str]] = {}
    for text in raw:
        variants.setdefault(text.strip(), set()).add(text)
    for name, seen in variants.items():
        if len(seen) > 1:
            logger.warning(MSG_SPACED_GROUPS.format(source=source, variants=", ".join(repr(v) for v in sorted(seen)),
                                                    name=name))

GROUP_KEYS = ("path", "index")
MSG_KEY = "GroupsFromCSV.key={key!r} must be one of {keys}"
MSG_COLUMN = "GroupsFromCSV.column must name a column of the CSV, got {column!r}"
MSG_CSV_COLUMN = "missing column '{column}' in the header {header}; GroupsFromCSV(column={column!r}) names it"
MSG_CSV_KEY_COLUMN = (
    "missing column '{column}' in the header {header}; GroupsFromCSV(key={column!r}) matches the samples by it"
)
MSG_CSV_DUPLICATE = "line {line}: {key} {value!r} appears twice (first on line {first}); give each sample one group"
MSG_CSV_EMPTY = "line {line}: column '{column}' is empty"
MSG_CSV_INDEX = "line {line}: column 'index' must hold a sample index >= 0, got {value!r}"
MSG_NOT_IN_CSV = "sample {index} ({what}) is not in {csv} (column '{key}'); give every sample a group"
MSG_NO_PATHS = (
    "GroupsFromCSV(key='path') needs the samples' file paths: give a Dataset with a samples list of "
    "(path, label) like torchvision's ImageFolder, or a CSV manifest; or use key='index'"
)
MSG_LENGTH = "groups has {got} entries but the source has {n} samples; give one group per sample"
MSG_GROUPS_KIND = (
    "groups must be an array of ids or names, a function (index, sample) -> group, or GroupsFromCSV, "
    "not a {kind}"
)


@dataclass(frozen=True)
class GroupsFromCSV:
    """The groups of a column of a CSV file (header row first).

    Attributes:
        path: the CSV file.
        column: the column holding each sample's group (a name or an integer id).
        key: how a row names its sample: ``"path"`` (column ``path``: the sample's file path,
            relative to ``root`` or absolute; matched to an ImageFolder-like dataset's
            ``samples[i][0]`` or a CSV manifest's rows) or ``"index"`` (column ``index``: the
            sample's position in the source).
        root: the folder relative paths start from (default: the CSV's folder).
    """

    path: str | os.PathLike
    column: str = "group"
    key: str = "path"
    root: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.key not in GROUP_KEYS:
            raise ConfigError(MSG_KEY.format(key=self.key, keys=", ".join(repr(k) for k in GROUP_KEYS)))
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(MSG_COLUMN.format(column=self.column))


def _resolved(path: str | os.PathLike, root: Path | None = None) -> str:
    """``path`` (relative to ``root``) as a normalised absolute path, the key two paths match on."""
    p = Path(path)
    return os.path.normpath(os.path.abspath(p if p.is_absolute() or root is None else root / p))


def read_groups_csv(spec: GroupsFromCSV) -> dict[Any, str]:
    """``{resolved path or index: group text}`` of the CSV's rows (DataError naming the file and line)."""
    path = Path(spec.path)
    source = str(path)
    if not path.is_file():
        raise data_error(source, "file not found" if not path.exists() else "is not a file")
    root = Path(spec.root) if spec.root is not None else path.parent
    found: dict[Any, tuple[str, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if spec.key not in header:
                raise data_error(source, MSG_CSV_KEY_COLUMN.format(column=spec.key, header=header))
            if spec.column not in header:
                raise data_error(source, MSG_CSV_COLUMN.format(column=spec.column, header=header))
            reader.fieldnames = header
            raw: list[str] = []
            for row in reader:
                line = reader.line_num
                value = (row.get(spec.key) or "").strip()
                raw.append(row.get(spec.column) or "")
                group = raw[-1].strip()
                if not group:
                    raise data_error(source, MSG_CSV_EMPTY.format(line=line, column=spec.column))
                if spec.key == "index":
                    if not (value.isascii() and value.isdigit()):
                        raise data_error(source, MSG_CSV_INDEX.format(line=line, value=value))
                    key: Any = int(value)
                else:
                    if not value:
                        raise data_error(source, MSG_CSV_EMPTY.format(line=line, column="path"))
                    key = _resolved(value, root)
                if key in found:
                    raise data_error(source, MSG_CSV_DUPLICATE.format(line=line, key=spec.key, value=value,
                                                                      first=found[key][1]))
                found[key] = (group, line)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise data_error(source, f"cannot read as CSV: {err}") from err
    warn_spaced_group_names(source, raw)
    return {k: g for k, (g, _) in found.items()}


def csv_groups(spec: GroupsFromCSV, n: int, source: str, paths: Sequence[str] | None) -> np.ndarray:
    """Each of the ``n`` samples' group from the CSV (``paths``: the samples' file paths, for
    ``key="path"``); DataError naming the first sample the CSV does not name."""
    table = read_groups_csv(spec)
    if spec.key == "path":
        if paths is None:
            raise data_error(source, MSG_NO_PATHS)
        keys: Sequence[Any] = [_resolved(p) for p in paths]
    else:
        keys = range(n)
    out = []
    for i, k in enumerate(keys):
        if k not in table:
            what = k if spec.key == "path" else f"index {k}"
            raise data_error(source, MSG_NOT_IN_CSV.format(index=i, what=what, csv=spec.path, key=spec.key))
        out.append(table[k])
    return text_groups(out)


def text_groups(texts: Sequence[str]) -> np.ndarray:
    """A CSV column's groups. Non-negative integers written plainly are group ids, named
    ``group<N>`` as an ``.npz``'s integer ids without names are, whichever of them are present:
    int64 ids when they are 0 .. K−1, else the names ``group<N>`` (a test CSV without group 1 is
    ``group0``, ``group2``, not "0" and "2", which no calibration's ``group<N>`` would match, so a
    gate could not see group 1 was missing). Other entries are names as written ("01", "-1", "²",
    "A": "1" and "01" are two groups)."""
    # ids only when each text is how its integer is written ("01" and "1", "²" are names)
    if all(_ASCII_INT.fullmatch(t) and t == str(int(t)) and int(t) >= 0 for t in texts):
        ids = np.array([int(t) for t in texts], dtype=np.int64)
        if np.array_equal(np.unique(ids), np.arange(len(np.unique(ids)))):
            return ids
        return np.array([f"group{i}" for i in ids])
    return np.array(texts)


_ASCII_INT = re.compile(r"-?[0-9]+")


def groups_up_front(groups: Any, n: int, source: str, paths: Callable[[], Sequence[str] | None]
                    ) -> np.ndarray | None:
    """The ``n`` samples' groups that ``groups`` gives without reading a sample (an array or a
    CSV column), or None for a function (called per sample) or no ``groups``. ``paths()``
    returns the samples' file paths when the source knows them (None otherwise)."""
    if groups is None or is_group_function(groups):
        return None
    if isinstance(groups, GroupsFromCSV):
        return csv_groups(groups, n, source, paths() if groups.key == "path" else None)
    if isinstance(groups, (str, bytes, dict, os.PathLike)):
        raise ConfigError(MSG_GROUPS_KIND.format(kind=type(groups).__name__))
    arr = np.asarray(groups.detach().cpu().numpy() if hasattr(groups, "detach") else groups)
    if arr.ndim != 1:
        raise data_error(source, f"groups must be 1-D [N], got shape {arr.shape}")
    if arr.shape[0] != n:
        raise data_error(source, MSG_LENGTH.format(got=arr.shape[0], n=n))
    return arr


def is_group_function(groups: Any) -> bool:
    """True for ``groups`` given as a function ``(index, sample) -> group``."""
    return callable(groups) and not isinstance(groups, GroupsFromCSV) and not hasattr(groups, "__len__")


def call_group_function(groups: Callable[[int, Any], Any], index: int, sample: Any, source: str) -> Any:
    """``groups(index, sample)`` as a plain id or name; its failure becomes a DataError naming the sample."""
    try:
        g = groups(index, sample)
    except DataError:
        raise
    except Exception as err:  # the user's function, named by the sample it failed on
        raise data_error(source, f"sample {index}: groups({index}, sample) failed: {type(err).__name__}: {err}") from err
    if hasattr(g, "detach"):
        g = g.detach().cpu().numpy()
    if isinstance(g, np.ndarray):
        if g.size != 1:
            raise data_error(source, f"sample {index}: groups({index}, sample) returned shape {g.shape}, not one group")
        g = g.reshape(()).item()
    if isinstance(g, bytes):
        g = g.decode()
    if isinstance(g, (bool, np.bool_)):
        g = int(g)
    if not isinstance(g, (str, int, np.integer)):
        raise data_error(source, f"sample {index}: groups({index}, sample) returned {g!r}; return a group id or name")
    return g
