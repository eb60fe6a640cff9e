"""``.npz`` files holding arrays ``x``, ``group``, optional ``y`` (labels), ``group_names`` and the
annotations of detection (``boxes``, ``box_labels``, ``box_image``) or segmentation (``masks``):
:func:`load_npz` reads one, :func:`save_npz` writes one, :func:`map_npz_x` memory-maps its x.

Each member's ``.npy`` header is read before its data: a declared size larger than the memory
available, or than the bytes the archive holds, is refused before any allocation. Object arrays
are refused (``allow_pickle=False``). An archive without ``y`` holds data without labels.

:func:`map_npz_x` maps x without reading it: a member stored uncompressed (``numpy.savez``,
``save_npz``'s default) is the plain ``.npy`` bytes at an offset of the archive file and is mapped
in place; a compressed one (``numpy.savez_compressed``) is inflated once, in 1 MiB chunks, into an
anonymous temporary file (already deleted; the mapping keeps it) and mapped from there: disk, not
memory, holds x.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fqexport.atomic import atomic_write
from fqexport.errors import ConfigError, DataError

from .annotations import Boxes, Masks
from .checks import data_error, validate_group_data
from .group_data import GroupData

logger = logging.getLogger(__name__)

NPZ_FIELDS = ("x", "y", "group")
# Annotations beyond labels (:mod:`.annotations`): detection boxes as COCO-like flat arrays, or
# segmentation masks (with an optional scalar ``ignore_index``).
BOX_FIELDS = ("boxes", "box_labels", "box_image")
MASK_FIELDS = ("masks", "ignore_index")
MSG_BOX_FIELDS = (
    "field 'boxes' needs fields {missing} beside it (boxes [M, 4] xyxy pixels, box_labels [M] class "
    "ids, box_image [M] index into x)"
)
MSG_IGNORE_INDEX = (
    "field 'ignore_index' must be one integer, the mask value of pixels left out (e.g. 255), got {value!r} "
    "({dtype})"
)
MSG_BOXES_AND_MASKS = (
    "fields 'boxes' and 'masks' are both present: a file holds one task's ground truth (boxes for a detector, "
    "masks for a segmenter); drop the other fields"
)
# Arrays an archive must hold (y is optional: data without labels).
NPZ_REQUIRED = ("x", "group")
MSG_X_MAP = "{source}: field 'x' cannot be memory-mapped ({err}); write the file again with numpy.savez"
MSG_INFLATE = (
    "{source}: field 'x' is compressed and could not be inflated into a temporary file in {tmp} ({err}); "
    "free disk space there (or set TMPDIR), or write the file with numpy.savez (uncompressed)"
)
MSG_ARRAY_TOO_LARGE = (
    "field '{field}' declares shape {shape} {dtype} = {size:.3g} GB, more than the {avail:.3g} GB of "
    "memory available; use fewer samples or a smaller dtype"
)
MSG_ARRAY_PADDED = (
    "field '{field}' declares shape {shape} {dtype} = {nbytes:,} bytes but its member holds {stored:,}: "
    "numpy writes no bytes past an array, and inflating them would fill the temporary folder; write the "
    "file again with numpy.savez"
)
# bytes past an array's data a member may hold (numpy writes none)
_PAD_SLACK = 4096
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
        raise data_error(source, f"field '{field}' cannot be read ({err}); store plain arrays") from err
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with its own error
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    shape_text = "x".join(map(str, shape)) or "()"
    avail = available_memory_bytes()
    if nbytes > avail:
        raise data_error(source, MSG_ARRAY_TOO_LARGE.format(field=field, shape=shape_text, dtype=dtype,
                                                            size=nbytes / 1e9, avail=avail / 1e9))
    if nbytes > info.file_size - header_len:
        stored = max(info.file_size - header_len, 0)
        raise data_error(source, MSG_ARRAY_TRUNCATED.format(field=field, shape=shape_text, dtype=dtype,
                                                            nbytes=nbytes, stored=stored))
    if info.file_size - header_len > nbytes + _PAD_SLACK:  # a deflated run of padding: a few KB on disk
        raise data_error(source, MSG_ARRAY_PADDED.format(field=field, shape=shape_text, dtype=dtype, nbytes=nbytes,
                                                         stored=info.file_size - header_len))


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """Open an ``.npz`` (no array read yet) that holds arrays ``x`` and ``group`` (``y`` optional)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise data_error(source, "file not found")
    if path.is_dir():
        raise data_error(source, "is a directory, expected an .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # numpy's advice (load with allow_pickle=True) is never repeated for an untrusted file
        detail = "not an .npz archive, or pickled object data" if "allow_pickle" in str(err) else err
        raise data_error(source, f"cannot read as .npz ({detail}); write it with numpy.savez") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise data_error(
            source, "is a single .npy array, not an .npz archive; write it with numpy.savez"
        )
    missing = [f for f in NPZ_REQUIRED if f not in archive.files]
    if missing:
        archive.close()
        raise data_error(
            source,
            f"missing array '{missing[0]}' (found {sorted(archive.files)}); "
            "the file needs arrays x, y, group (y may be left out for data without labels)",
        )
    return archive


def read_npz_field(archive: np.lib.npyio.NpzFile, field: str, source: str) -> np.ndarray:
    """One array of an open ``.npz``, its declared size checked against the archive and memory."""
    _check_npz_member(archive.zip, field, source)
    try:
        return archive[field]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise data_error(source, f"field '{field}' cannot be read ({err}); store plain arrays") from err


def load_npz(path: str | os.PathLike) -> GroupData:
    """Read an ``.npz`` with arrays ``x``, ``group``, optional ``y`` and ``group_names``."""
    source = str(Path(path))
    with open_npz(path) as archive:
        arrays = {field: read_npz_field(archive, field, source)
                  for field in (*NPZ_FIELDS, "group_names", *BOX_FIELDS, *MASK_FIELDS) if field in archive.files}
    data = validate_group_data(
        arrays["x"], arrays.get("y"), arrays["group"], arrays.get("group_names"), source,
        npz_annotations(arrays, source),
    )
    logger.info("read %d samples in %d groups from %s", len(data), data.num_groups, source)
    return data


def npz_annotations(arrays: dict[str, np.ndarray], source: str) -> Boxes | Masks | None:
    """The boxes or masks among an archive's ``arrays`` (unchecked; the readers check them)."""
    if "boxes" in arrays and "masks" in arrays:
        raise data_error(source, MSG_BOXES_AND_MASKS)
    if "boxes" in arrays:
        missing = [f for f in BOX_FIELDS[1:] if f not in arrays]
        if missing:
            raise data_error(source, MSG_BOX_FIELDS.format(missing=", ".join(repr(m) for m in missing)))
        return Boxes(arrays["boxes"], arrays["box_labels"], arrays["box_image"])
    if "masks" in arrays:
        ignore = arrays.get("ignore_index")
        return Masks(arrays["masks"], 255 if ignore is None else _ignore_index(ignore, source))
    return None


def _ignore_index(value: np.ndarray, source: str) -> int:
    """The field ``ignore_index``: one integer (a 0-d or one-element array of an integer dtype, or
    a float holding a whole number), else a DataError naming the field."""
    a = np.asarray(value)
    whole = a.dtype.kind in "iu" or (a.dtype.kind == "f" and a.size == 1 and np.isfinite(a).all()
                                      and float(a.reshape(-1)[0]).is_integer())
    if a.size != 1 or not whole:
        raise data_error(source, MSG_IGNORE_INDEX.format(value=a.tolist(), dtype=a.dtype))
    return int(a.reshape(-1)[0])


def save_npz(data: GroupData, path: str | os.PathLike, *, compressed: bool = False) -> Path:
    """Write ``data`` as an ``.npz`` that :func:`load_npz` (and ``fqexport.load_data``) reads back:
    arrays x, y (left out for data without labels), group and group_names.

    ``compressed=False`` (``numpy.savez``) lets a stream memory-map x in place; ``True``
    (``numpy.savez_compressed``) is smaller on disk. The file is written to a temporary name
    and renamed (no half-written file). Returns the path.
    """
    if not isinstance(data, GroupData):  # an array: say what to build, not an AttributeError on .x
        raise ConfigError(f"save_npz needs a GroupData (fqexport.load_data(...) or validate_group_data(x, y, group, "
                          f"names, source)), not a {type(data).__name__}")
    arrays = {"x": data.x, "group": data.group, "group_names": np.array(data.group_names)}
    if data.y is not None:
        arrays["y"] = data.y
    if isinstance(data.annotations, Boxes):
        a = data.annotations
        arrays.update(boxes=a.boxes, box_labels=a.labels, box_image=a.image)
    elif isinstance(data.annotations, Masks):
        arrays.update(masks=data.annotations.masks, ignore_index=np.array(data.annotations.ignore_index))
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz" to the temporary name
            save(fh, **arrays)

    return atomic_write(path, write)


def _member_file(path: Path, zf: zipfile.ZipFile, source: str):
    """``(open file, offset of x.npy in it, its stored size)``: the archive itself for a member
    stored uncompressed, else an anonymous temporary file holding the inflated member."""
    info = zf.getinfo("x.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        fh = open(path, "rb")
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            fh.close()
            raise ValueError("bad local header of member x.npy")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        return fh, start, info.file_size
    fh = tempfile.TemporaryFile()
    try:
        with zf.open(info) as member:
            shutil.copyfileobj(member, fh, 1 << 20)
        fh.flush()
    except OSError as err:
        fh.close()
        raise DataError(MSG_INFLATE.format(source=source, tmp=tempfile.gettempdir(), err=err)) from err
    stored = fh.tell()
    fh.seek(0)
    return fh, 0, stored


def map_npz_x(path: Path, zf: zipfile.ZipFile, source: str) -> np.ndarray:
    """x of the archive as a read-only memmap (see the module docstring)."""
    _check_npz_member(zf, "x", source)  # its declared size against what it holds, before inflating it
    try:
        fh, start, stored = _member_file(path, zf, source)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(MSG_X_MAP.format(source=source, err=err)) from err
    with fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
            if dtype.hasobject:
                raise ValueError("object arrays cannot be mapped; store plain arrays")
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            held = max(stored - (offset - start), 0)
            if nbytes > held:  # a truncated or forged file, said as the whole read says it
                raise DataError(f"{source}: " + MSG_ARRAY_TRUNCATED.format(
                    field="x", shape="x".join(map(str, shape)) or "()", dtype=dtype, nbytes=nbytes, stored=held))
            if nbytes == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        except DataError:
            raise
        except (ValueError, OSError, EOFError, SyntaxError) as err:
            raise DataError(MSG_X_MAP.format(source=source, err=err)) from err
