"""Reader of ``.npz`` files holding arrays ``x``, ``y``, ``group`` (and optional ``group_names``).

Each member's ``.npy`` header is read before its data: a declared size larger than the memory
available, or than the bytes the archive holds, is refused before any allocation. Object arrays
are refused (``allow_pickle=False``).
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from .checks import data_error, validate_group_data
from .group_data import GroupData

logger = logging.getLogger(__name__)

NPZ_FIELDS = ("x", "y", "group")
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


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """Open an ``.npz`` (no array read yet) that holds arrays ``x``, ``y`` and ``group``."""
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
    missing = [f for f in NPZ_FIELDS if f not in archive.files]
    if missing:
        archive.close()
        raise data_error(
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
        raise data_error(source, f"field '{field}' cannot be read ({err}); store plain arrays") from err


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
