"""Readers of group-labeled data: ``.npz`` files, torch Datasets and CSV image manifests.

Every reader returns a validated :class:`GroupData` (x float32 ``[N, ...]`` with at least two
dimensions — or int64 token ids when ``x`` holds signed integers, see :data:`MSG_NEGATIVE_IDS`
and :func:`check_vocabulary`; y and group int64 ``[N]``, every group id naming a group that has samples). Bad
input raises one :class:`DataError` whose message starts with the file (or source) and names
the field, e.g. ``"test.npz: field 'x' contains NaN or Inf (3 values)"``.

Groups may be given as integer ids or as names (strings). Names become ids in sorted order of
the unique names (``["f", "m", "f"]`` → names ``("f", "m")``, ids ``[0, 1, 0]``) unless
``group_names`` is given, which then fixes the order. Integer ids without names get the names
``group0``, ``group1``, ….
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fqexport.errors import DataError

from .group_data import GroupData

logger = logging.getLogger(__name__)

NPZ_FIELDS = ("x", "y", "group")
CSV_COLUMNS = ("path", "label", "group")
PILLOW_MISSING = (
    "reading a CSV image manifest needs Pillow, which is not installed; "
    'install it with: pip install "fqexport[images]"'
)
# Datasets at least this long show a progress bar (when stderr is a TTY).
_PROGRESS_MIN = 1000
# Largest image (width x height) a CSV manifest may name; Pillow's own bomb limit is 89.5M.
MAX_IMAGE_PIXELS = 50_000_000
MSG_IMAGE_TOO_LARGE = (
    "{where}: image {path} is {w}x{h} = {pixels:,} pixels, more than the limit of {limit:,} "
    "(a decompression bomb or a wrong file); resize it"
)
MSG_ARRAY_TOO_LARGE = (
    "field '{field}' declares shape {shape} {dtype} = {size:.3g} GB, more than the {avail:.3g} GB of "
    "memory available; use fewer samples or a smaller dtype"
)
MSG_ARRAY_TRUNCATED = (
    "field '{field}' declares shape {shape} {dtype} = {nbytes:,} bytes but the archive holds "
    "{stored:,}; the file is truncated or forged, write it again with numpy.savez"
)


def available_memory_bytes() -> int:
    """Bytes of memory this process may still allocate (MemAvailable; total RAM as fallback)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_npz_member(zf: zipfile.ZipFile, field: str, source: str) -> None:
    """Read ``field``'s .npy header and refuse sizes the archive cannot hold or memory cannot fit."""
    try:
        info = zf.getinfo(f"{field}.npy")
    except KeyError:
        return
    try:
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
            header_len = fh.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as err:
        raise _err(source, f"field '{field}' cannot be read ({err}); store plain arrays") from err
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with its own error
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    shape_text = "x".join(map(str, shape)) or "()"
    avail = available_memory_bytes()
    if nbytes > avail:
        raise _err(source, MSG_ARRAY_TOO_LARGE.format(field=field, shape=shape_text, dtype=dtype,
                                                      size=nbytes / 1e9, avail=avail / 1e9))
    if nbytes > info.file_size - header_len:
        raise _err(source, MSG_ARRAY_TRUNCATED.format(field=field, shape=shape_text, dtype=dtype, nbytes=nbytes,
                                                      stored=max(info.file_size - header_len, 0)))


MSG_NEGATIVE_IDS = (
    "field 'x' holds signed integers, read as token ids (kept int64 for an Embedding), but has the "
    "negative id {value}; ids must be >= 0 — store float features as float32, or fix the ids"
)
MSG_VOCABULARY = (
    "field 'x' holds the token id {value} outside the vocabulary [0, {vocab}) of the model's "
    "Embedding '{layer}' (num_embeddings={vocab}); check the tokenizer or the model"
)


def _err(source: str, message: str) -> DataError:
    return DataError(f"{source}: {message}")


# --------------------------------------------------------------------------- validation


def _as_int_array(a: np.ndarray, field: str, source: str) -> np.ndarray:
    """int64 view of an integer (or bool, or whole-number float) array, else DataError."""
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if finite.all() and np.all(a == np.round(a)):
            return a.astype(np.int64)
        bad = a[~finite] if not finite.all() else a[a != np.round(a)]
        raise _err(
            source,
            f"field '{field}' must hold integers, found the non-integer value {bad.flat[0].item()!r} "
            f"(dtype {a.dtype}); store {field} as integer ids",
        )
    raise _err(
        source,
        f"field '{field}' must hold integers, got dtype {a.dtype}; store {field} as integer ids"
        + (" or group names" if field == "group" else ""),
    )


def _names_from_array(group_names: Any, source: str) -> tuple[str, ...]:
    arr = np.asarray(group_names)
    if arr.ndim != 1:
        raise _err(source, f"field 'group_names' must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.str_) or np.issubdtype(arr.dtype, np.bytes_)):
        raise _err(source, f"field 'group_names' must hold strings, got dtype {arr.dtype}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in arr.tolist())
    if not names:
        raise _err(source, "field 'group_names' is empty; give one name per group id")
    seen: set[str] = set()
    for n in names:
        if n == "":
            raise _err(source, "field 'group_names' contains an empty name")
        if n in seen:
            raise _err(source, f"field 'group_names' names the group {n!r} twice")
        seen.add(n)
    return names


def _group_ids(
    group: np.ndarray, group_names: Any, source: str, index: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(int64 ids, names) from ids or names, with optional explicit ``group_names``; ``index``
    (a streamed batch's sample positions) makes the messages name the sample."""
    at = (lambda i: int(index[i])) if index is not None else (lambda i: i)
    names = None if group_names is None else _names_from_array(group_names, source)
    if group.ndim != 1:
        raise _err(source, f"field 'group' must be 1-D [N], got shape {group.shape}")
    if group.dtype.kind in "US" or group.dtype == object:
        labels = np.array([g.decode() if isinstance(g, bytes) else str(g) for g in group.tolist()])
        if names is None:
            names = tuple(str(n) for n in np.unique(labels)) if labels.size else ("group0",)
        lookup = {n: i for i, n in enumerate(names)}
        ids = np.empty(labels.shape[0], dtype=np.int64)
        for i, lab in enumerate(labels.tolist()):
            if lab not in lookup:
                raise _err(
                    source,
                    f"field 'group' holds the name {lab!r} (sample {at(i)}) that is not in "
                    f"group_names {list(names)}",
                )
            ids[i] = lookup[lab]
        return ids, names
    ids = _as_int_array(group, "group", source)
    if ids.size and ids.min() < 0:
        raise _err(
            source, f"field 'group' holds the negative id {int(ids.min())}; ids start at 0"
        )
    if names is None:
        n = int(ids.max()) + 1 if ids.size else 1
        names = tuple(f"group{i}" for i in range(n))
    elif ids.size and ids.max() >= len(names):
        where = "" if index is None else f"sample {at(int(np.argmax(ids)))}: "
        raise _err(
            source,
            f"{where}field 'group' holds the id {int(ids.max())} but group_names has only "
            f"{len(names)} names (ids 0..{len(names) - 1})",
        )
    return ids, names


def _check_x_dtype(x: np.ndarray, source: str, where: str = "") -> None:
    if x.dtype == object or not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.number)) or (
        np.issubdtype(x.dtype, np.complexfloating)
    ):
        raise _err(source, f"{where}field 'x' must be numeric, got dtype {x.dtype}")


def group_ids(group: Any, group_names: Sequence[str], source: str, index: np.ndarray) -> np.ndarray:
    """int64 ids of one streamed batch's groups (ids or names) over the known ``group_names``;
    DataError naming the sample (its position in ``index``) for an unknown name or id."""
    return _group_ids(np.asarray(group), list(group_names), source, np.asarray(index))[0]


def check_x_values(x: Any, source: str, index: np.ndarray | None = None) -> np.ndarray:
    """``x`` as float32 (int64 for signed-integer token ids), checked: numeric, ids >= 0, no NaN/Inf.

    ``index`` (the samples' positions in ``source``, for one batch of streamed data) makes the
    message name the first bad sample, e.g. ``"train.npz: sample 1234: field 'x' contains NaN or
    Inf (3 values)"``; without it the message names the field only (a whole array).
    """
    x = np.asarray(x)
    first = (lambda bad: f"sample {int(index[np.flatnonzero(bad.reshape(len(bad), -1).any(1))[0]])}: "
             if index is not None else "")
    _check_x_dtype(x, source, first(np.ones(len(x), bool)) if index is not None and len(x) else "")
    if np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.int64, copy=False)
        if x.size and int(x.min()) < 0:
            raise _err(source, first(x < 0) + MSG_NEGATIVE_IDS.format(value=int(x.min())))
    else:
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        bad = int(x.size - np.count_nonzero(finite))
        if bad:
            raise _err(source, first(~finite) + f"field 'x' contains NaN or Inf ({bad} values)")
    return x


def validate_targets(
    y: Any, group: Any, group_names: Sequence[str] | np.ndarray | None, n: int, source: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The labels and groups of ``n`` samples checked and converted: ``(y int64, group ids int64,
    names)`` (the rules of :func:`validate_group_data` for fields y and group)."""
    y = np.asarray(y)
    group = np.asarray(group)
    if y.ndim != 1:
        raise _err(source, f"field 'y' must be 1-D [N], got shape {y.shape}")
    for field, arr in (("y", y), ("group", group)):
        if arr.ndim >= 1 and arr.shape[0] != n:
            raise _err(
                source,
                f"length mismatch: field 'x' has {n} samples but field '{field}' has "
                f"{arr.shape[0]}",
            )
    y = _as_int_array(y, "y", source)
    if y.min() < 0:
        raise _err(
            source,
            f"field 'y' holds the negative label {int(y.min())}; labels must be class ids >= 0",
        )
    ids, names = _group_ids(group, group_names, source)
    counts = np.bincount(ids, minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise _err(
            source,
            f"group {empty[0]!r} has no samples (field 'group'); drop it from group_names "
            "or add samples of it",
        )
    return y, ids, tuple(names)


def validate_group_data(
    x: Any,
    y: Any,
    group: Any,
    group_names: Sequence[str] | np.ndarray | None = None,
    source: str = "<memory>",
) -> GroupData:
    """Check and convert raw arrays into a :class:`GroupData` (x float32, y/group int64).

    ``x`` of a signed integer dtype (int8…int64) holds token ids: it is kept as int64 (never cast
    to float, so an Embedding front end sees its ids) and must be >= 0. Unsigned integers and
    bools (e.g. uint8 pixels) are cast to float32 as before.

    Raises:
        DataError: naming ``source`` and the field, for an empty dataset, x not numeric or
            with fewer than 2 dims, NaN/Inf in x, y/group not integer, negative labels, a
            length mismatch, a group id outside ``group_names`` or a group with no samples.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    group = np.asarray(group)
    _check_x_dtype(x, source)
    if x.ndim < 2:
        raise _err(
            source,
            f"field 'x' must have at least 2 dims [N, features...], got shape {x.shape}; "
            "add a feature axis, e.g. x[:, None]",
        )
    n = x.shape[0]
    if n == 0:
        raise _err(source, "the dataset is empty (field 'x' has 0 samples)")
    y, ids, names = validate_targets(y, group, group_names, n, source)
    x = check_x_values(x, source)
    return GroupData(x=x, y=y, group=ids, group_names=tuple(names), source=str(source))


def validate(data: GroupData) -> GroupData:
    """Re-check a :class:`GroupData` built elsewhere (same rules as the readers)."""
    return validate_group_data(data.x, data.y, data.group, list(data.group_names), data.source)


def check_vocabulary(data: GroupData, vocab: int, layer: str) -> None:
    """Raise :class:`DataError` unless every token id of an integer ``x`` is in ``[0, vocab)``
    (``vocab``: the ``num_embeddings`` of the Embedding ``layer`` that reads ``x``)."""
    if data.x.size == 0 or not np.issubdtype(data.x.dtype, np.integer):
        return
    lo, hi = int(data.x.min()), int(data.x.max())
    if lo < 0 or hi >= vocab:
        raise _err(data.source, MSG_VOCABULARY.format(value=lo if lo < 0 else hi, vocab=vocab, layer=layer))


def check_labels(data: GroupData, num_classes: int) -> None:
    """Raise :class:`DataError` unless every label is in ``[0, num_classes)``."""
    if data.y.size == 0:
        return
    lo, hi = int(data.y.min()), int(data.y.max())
    if lo < 0 or hi >= num_classes:
        value = lo if lo < 0 else hi
        raise _err(
            data.source,
            f"field 'y' holds the label {value} outside [0, {num_classes}) "
            f"(the model has num_classes={num_classes}); check the labels or the model",
        )


# --------------------------------------------------------------------------- .npz


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """Open an ``.npz`` (no array read yet) that holds arrays ``x``, ``y`` and ``group``."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise _err(source, "file not found")
    if path.is_dir():
        raise _err(source, "is a directory, expected an .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # numpy's advice (load with allow_pickle=True) is never repeated for an untrusted file
        detail = "not an .npz archive, or pickled object data" if "allow_pickle" in str(err) else err
        raise _err(source, f"cannot read as .npz ({detail}); write it with numpy.savez") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _err(
            source, "is a single .npy array, not an .npz archive; write it with numpy.savez"
        )
    missing = [f for f in NPZ_FIELDS if f not in archive.files]
    if missing:
        archive.close()
        raise _err(
            source,
            f"missing array '{missing[0]}' (found {sorted(archive.files)}); "
            "the file needs arrays x, y, group",
        )
    return archive


def read_npz_field(archive: np.lib.npyio.NpzFile, field: str, source: str) -> np.ndarray:
    """One array of an open ``.npz``, its declared size checked against the archive and memory."""
    _check_npz_member(archive.zip, field, source)
    try:
        return archive[field]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise _err(source, f"field '{field}' cannot be read ({err}); store plain arrays") from err


def load_npz(path: str | os.PathLike) -> GroupData:
    """Read an ``.npz`` with arrays ``x``, ``y``, ``group`` and optional ``group_names``."""
    source = str(Path(path))
    with open_npz(path) as archive:
        arrays = {field: read_npz_field(archive, field, source)
                  for field in (*NPZ_FIELDS, "group_names") if field in archive.files}
    data = validate_group_data(
        arrays["x"], arrays["y"], arrays["group"], arrays.get("group_names"), source
    )
    logger.info("read %d samples in %d groups from %s", len(data), data.num_groups, source)
    return data


# --------------------------------------------------------------------------- torch Dataset


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _scalar(value: Any, field: str, index: int, source: str) -> Any:
    if isinstance(value, (str, bytes)):
        if field != "group":
            raise _err(source, f"sample {index}: field '{field}' is the string {value!r}")
        return value.decode() if isinstance(value, bytes) else value
    arr = _to_numpy(value)
    if arr.size != 1:
        raise _err(
            source, f"sample {index}: field '{field}' must be a single number, got shape {arr.shape}"
        )
    return arr.reshape(()).item()


MSG_ITEM_SHAPE = "sample {index}: field 'x' has shape {shape} but sample 0 has {first}; all samples must share a shape"


def dataset_item(item: Any, index: int, source: str) -> tuple[np.ndarray, Any, Any]:
    """One Dataset item ``(x, y, group)`` as ``(x array, y number, group id or name)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise _err(
            source,
            f"sample {index} must be a tuple (x, y, group), got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""),
        )
    return _to_numpy(item[0]), _scalar(item[1], "y", index, source), _scalar(item[2], "group", index, source)


def from_dataset(dataset: Any, source: str = "<Dataset>") -> GroupData:
    """Stack a Dataset (any indexable with ``__len__``) yielding ``(x, y, group)`` items.

    Items may be tensors, numpy arrays or Python numbers; group may be an id or a name. A
    ``group_names`` attribute on the dataset, when present, fixes the names of the ids.
    """
    try:
        n = len(dataset)
    except TypeError as err:
        raise _err(source, "the dataset has no len(); give an indexable Dataset") from err
    if n == 0:
        raise _err(source, "the dataset is empty")
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    gs: list[Any] = []
    shape: tuple[int, ...] | None = None
    for i in tqdm(range(n), desc="reading dataset", disable=None if n >= _PROGRESS_MIN else True):
        try:
            item = dataset[i]
        except Exception as err:  # the dataset's own failure, wrapped with its index
            raise _err(source, f"sample {i} cannot be read: {type(err).__name__}: {err}") from err
        x, y, g = dataset_item(item, i, source)
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise _err(source, MSG_ITEM_SHAPE.format(index=i, shape=x.shape, first=shape))
        xs.append(x)
        ys.append(y)
        gs.append(g)
    names = getattr(dataset, "group_names", None)
    return validate_group_data(np.stack(xs), np.asarray(ys), dataset_groups(gs, source), names, source)


def dataset_groups(gs: Sequence[Any], source: str) -> np.ndarray:
    """The groups of a Dataset's items (all names or all ids) as one array."""
    is_name = [isinstance(g, str) for g in gs]
    if any(is_name) and not all(is_name):
        raise _err(source, "field 'group' mixes names (strings) and ids (numbers)")
    return np.array(gs) if all(is_name) else np.asarray(gs)


# --------------------------------------------------------------------------- CSV manifest


def _read_image(image_path: Path, where: str) -> np.ndarray:
    """One image as float32 CHW in [0, 1]: grayscale → 1 channel, colour → 3 (alpha dropped)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:
        raise DataError(PILLOW_MISSING) from err
    if not image_path.is_file():
        raise DataError(f"{where}: image file not found: {image_path}")
    try:
        with Image.open(image_path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(MSG_IMAGE_TOO_LARGE.format(where=where, path=image_path, w=w, h=h,
                                                           pixels=w * h, limit=MAX_IMAGE_PIXELS))
            img.load()
            bands = img.getbands()
            mode = img.mode
            if mode == "F":
                raise DataError(
                    f"{where}: image {image_path} has 32-bit float mode 'F' with no known "
                    "range; save it as 8- or 16-bit"
                )
            if len(bands) == 1 and mode.startswith("I"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0  # 16-bit grayscale
            elif len(bands) == 1 or mode == "LA":
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: image {image_path} is a decompression bomb ({err}); resize it") from err
    except (OSError, UnidentifiedImageError, ValueError, MemoryError) as err:
        raise DataError(f"{where}: cannot read image {image_path}: {err}") from err
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _parse_label(value: str, where: str) -> int:
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f) or f != int(f):
        raise DataError(f"{where}: column 'label' must be an integer class id, got {value!r}")
    return int(f)


def load_csv_manifest(path: str | os.PathLike) -> GroupData:
    """Read a CSV with header ``path,label,group`` (image paths relative to the CSV's folder).

    Images become float32 CHW in [0, 1] (grayscale → 1 channel, RGB → 3) and must all share
    one shape. Column ``group`` holds names, or integer ids when every entry is an integer.
    Needs Pillow (``pip install "fqexport[images]"``).
    """
    rows, folder, source = read_manifest_rows(path)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    gs: list[str] = []
    first: tuple[str, tuple[int, ...]] | None = None
    for line, row in tqdm(rows, desc="reading images", disable=None if len(rows) >= _PROGRESS_MIN else True):
        where = f"{source} line {line}"
        arr, label, group_name = manifest_item(row, where, folder)
        if first is None:
            first = (row["path"], arr.shape)
        elif arr.shape != first[1]:
            raise DataError(
                f"{where}: image {row['path']} is {'x'.join(map(str, arr.shape))} (CHW) but "
                f"{first[0]} is {'x'.join(map(str, first[1]))}; all images must share one "
                "size and channel count"
            )
        xs.append(arr)
        ys.append(label)
        gs.append(group_name)
    return validate_group_data(np.stack(xs), np.asarray(ys, dtype=np.int64), manifest_groups(gs), None, source)


def manifest_groups(gs: Sequence[str]) -> np.ndarray:
    """Column ``group`` as int64 ids when every entry is an integer, else as names."""
    if all(g.lstrip("-").isdigit() for g in gs):
        return np.array([int(g) for g in gs], dtype=np.int64)
    return np.array(gs)


def manifest_targets(rows: Sequence[tuple[int, dict[str, str]]], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and groups of a manifest's rows (no image read): int64 labels, groups as
    :func:`manifest_groups` gives them."""
    ys, gs = [], []
    for line, row in rows:
        where = f"{source} line {line}"
        if not row.get("group"):
            raise DataError(f"{where}: column 'group' is empty")
        ys.append(_parse_label(row.get("label", ""), where))
        gs.append(row["group"])
    return np.asarray(ys, dtype=np.int64), manifest_groups(gs)


def manifest_item(row: dict[str, str], where: str, folder: Path) -> tuple[np.ndarray, int, str]:
    """One manifest row as ``(image float32 CHW, label, group text)``; ``where`` is "file line N"."""
    if not row.get("path"):
        raise DataError(f"{where}: column 'path' is empty")
    if not row.get("group"):
        raise DataError(f"{where}: column 'group' is empty")
    image_path = Path(row["path"])
    if not image_path.is_absolute():
        image_path = folder / image_path
    arr = _read_image(image_path, where)
    return arr, _parse_label(row["label"], where), row["group"]


def read_manifest_rows(path: str | os.PathLike) -> tuple[list[tuple[int, dict[str, str]]], Path, str]:
    """The rows of a CSV manifest as ``[(line number, {column: text})]``, its folder and its
    source name; the header must hold path,label,group (no image is read)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise _err(source, "file not found" if not path.exists() else "is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise _err(
                    source,
                    f"missing column '{missing[0]}' in the header {header}; "
                    "the header must be path,label,group",
                )
            reader.fieldnames = header
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise _err(source, f"cannot read as CSV: {err}") from err
    if not rows:
        raise _err(source, "the dataset is empty (no rows under the header)")
    return rows, path.parent, source


# --------------------------------------------------------------------------- dispatch


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
