"""The training stream of fine-tuning: labels and groups in memory, inputs read batch by batch.

``open_train(train)`` accepts what ``load_data`` accepts and returns a :class:`TrainStream`
whose ``y`` and ``group`` are arrays (checked like the readers check them) and whose
``batches(index_lists)`` reads ``x`` only for the batch at hand:

- a :class:`GroupData`: already in memory; batches are slices of it (checked once, as before);
- an ``.npz`` path: y, group (and group_names) are read whole; x is memory-mapped. An uncompressed
  member (``numpy.savez``) is mapped in place: a zip member stored without compression is the
  plain ``.npy`` bytes at an offset of the archive file. A compressed member
  (``numpy.savez_compressed``) cannot be mapped, so it is inflated once, in 1 MiB chunks, into an
  anonymous temporary file (already deleted; the mapping keeps it) and mapped from there: disk,
  not memory, holds x. x is checked (NaN/Inf, negative ids) chunk by chunk when opened, one
  sequential read, so a bad value stops the run before any weight changes;
- a ``.csv`` manifest: labels and groups come from the CSV; images are read per batch;
- a torch ``Dataset`` yielding ``(x, y, group)`` (group as id or name; a ``group_names``
  attribute fixes the names, as for ``from_dataset``): y and group come from the dataset's
  ``labels_and_groups()`` method when it has one (returning two arrays of length N), else from one
  light pass through a ``DataLoader(num_workers=...)`` that checks every item and keeps only its
  label and group. Batches are read through ``DataLoader(dataset,
  batch_sampler=<the sampler's index lists>, num_workers=...)``.

Every streamed batch is checked again (x's shape and dtype, NaN/Inf, its labels and groups equal
to the ones read first, a known group); a bad item raises one :class:`DataError` that names the
source and the sample's index.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fqexport.calibration.checks import check_x_values, group_ids, validate_targets
from fqexport.calibration.dataset import MSG_ITEM_SHAPE, dataset_groups, dataset_item
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.manifest import manifest_item, manifest_targets, read_manifest_rows
from fqexport.calibration.npz import open_npz, read_npz_field
from fqexport.calibration.readers import load_data
from fqexport.errors import DataError

log = logging.getLogger(__name__)

MSG_ITEM_DTYPE = "{source}: sample {index}: field 'x' has dtype {dtype} but sample 0 has {first}; store one dtype"
MSG_ITEM_READ = "{source}: sample {index} cannot be read: {kind}: {err}"
MSG_ITEM_CHANGED = (
    "{source}: sample {index}: its {field} is {got} in this pass but was {want} when first read; a Dataset "
    "must give the same labels and groups every time (random transforms may change x only)"
)
MSG_X_NDIM = (
    "{source}: field 'x' must have at least 2 dims [N, features...], got shape {shape}; "
    "add a feature axis, e.g. x[:, None]"
)
MSG_X_MAP = "{source}: field 'x' cannot be memory-mapped ({err}); write the file again with numpy.savez"
MSG_INFLATE = (
    "{source}: field 'x' is compressed and could not be inflated into a temporary file in {tmp} ({err}); "
    "free disk space there (or set TMPDIR), or write the file with numpy.savez (uncompressed)"
)
MSG_EMPTY = "{source}: the dataset is empty"
MSG_NO_LEN = "{source}: the dataset has no len(); give an indexable Dataset"
MSG_UNSUPPORTED = (
    "cannot stream training data from a {kind}; give a GroupData, an .npz or .csv path, or a torch "
    "Dataset yielding (x, y, group)"
)

# Rows per chunk of the check of a memory-mapped x at open (about 64 MB of float32 at a time).
_CHECK_BYTES = 64 << 20
# Items per batch of the light pass over a Dataset (labels and groups only).
_LIGHT_BATCH = 256


# --------------------------------------------------------------------------- readers of x


class _ArrayX:
    """x held by an array (in memory, or a read-only memmap checked per batch)."""

    def __init__(self, x: np.ndarray, source: str, check: bool) -> None:
        self.x, self.source, self.check = x, source, check

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        for idx in index_lists:
            xb = self.x[idx]
            yield check_x_values(xb, self.source, idx) if self.check else xb


class _Indexed(Dataset):
    """``dataset[i]`` as ``(i, item, error text or None)``: a failing item reaches the main
    process as text, so its message is ours (DataLoader would wrap a worker's exception)."""

    def __init__(self, dataset: Any, source: str) -> None:
        self.dataset, self.source = dataset, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            return i, self.dataset[i], None
        except DataError as err:
            return i, None, str(err)
        except Exception as err:  # the dataset's own failure, named by its index
            return i, None, MSG_ITEM_READ.format(source=self.source, index=i, kind=type(err).__name__, err=err)


class _Collate:
    """Items -> ``(indices, x or None, y list, group list, x shape, x dtype)``, x checked (finite,
    one shape); or the error text of the first bad item. Runs in the DataLoader's workers."""

    def __init__(self, source: str, shape: tuple[int, ...] | None, keep_x: bool) -> None:
        self.source, self.shape, self.keep_x = source, shape, keep_x

    def __call__(self, items: list[tuple[int, Any, str | None]]):
        try:
            for _, _, err in items:
                if err is not None:
                    return err
            idx = np.array([i for i, _, _ in items], dtype=np.int64)
            parsed = [dataset_item(item, i, self.source) for i, item, _ in items]
            shape = self.shape if self.shape is not None else parsed[0][0].shape
            for i, (x, _, _) in zip(idx, parsed):
                if x.shape != shape:
                    raise DataError(f"{self.source}: " + MSG_ITEM_SHAPE.format(index=int(i), shape=x.shape, first=shape))
            x = check_x_values(np.stack([p[0] for p in parsed]), self.source, idx)
            return (idx, torch.from_numpy(x) if self.keep_x else None, [p[1] for p in parsed],
                    [p[2] for p in parsed], tuple(shape), str(x.dtype))
        except DataError as err:
            return str(err)


class _DatasetX:
    """x of a map-style Dataset, read through a DataLoader per pass."""

    def __init__(self, dataset: Any, source: str, y: np.ndarray, group: np.ndarray, names: Sequence[str],
                 shape: tuple[int, ...], dtype: str) -> None:
        self.dataset, self.source, self.y, self.group, self.names = dataset, source, y, group, tuple(names)
        self.shape, self.dtype = shape, dtype

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        lists = [[int(i) for i in idx] for idx in index_lists]
        loader = _loader(self.dataset, self.source, lists, num_workers, self.shape, keep_x=True)
        for batch in loader:
            idx, x, ys, gs, _, dtype = _unpack(batch)
            if dtype != self.dtype:
                raise DataError(MSG_ITEM_DTYPE.format(source=self.source, index=int(idx[0]), dtype=dtype,
                                                      first=self.dtype))
            _same(self.source, idx, "label", np.asarray(ys), self.y[idx])
            _same(self.source, idx, "group", group_ids(dataset_groups(gs, self.source), self.names,
                                                       self.source, idx), self.group[idx])
            yield x.numpy()


def _loader(dataset: Any, source: str, lists: list[list[int]], num_workers: int,
            shape: tuple[int, ...] | None, keep_x: bool) -> DataLoader:
    return DataLoader(_Indexed(dataset, source), batch_sampler=lists, num_workers=num_workers,
                      collate_fn=_Collate(source, shape, keep_x))


def _unpack(batch):
    if isinstance(batch, str):
        raise DataError(batch)
    return batch


def _same(source: str, idx: np.ndarray, field: str, got: np.ndarray, want: np.ndarray) -> None:
    diff = np.flatnonzero(got != want)
    if len(diff):
        k = int(diff[0])
        raise DataError(MSG_ITEM_CHANGED.format(source=source, index=int(idx[k]), field=field,
                                                got=got[k], want=want[k]))


# --------------------------------------------------------------------------- the stream


class TrainStream:
    """Group-labeled training data whose x is read per batch (see the module docstring).

    Attributes:
        y: class labels, int64 ``[N]``.
        group: group ids, int64 ``[N]``.
        group_names: a name per group id.
        source: where the data came from, used in messages.
        sample_shape: the shape of one x.
    """

    def __init__(self, reader: _ArrayX | _DatasetX, y: np.ndarray, group: np.ndarray,
                 group_names: Sequence[str], source: str, sample_shape: tuple[int, ...],
                 index: np.ndarray | None = None) -> None:
        self._reader = reader
        self.y, self.group = y, group
        self.group_names = tuple(group_names)
        self.source = source
        self.sample_shape = tuple(sample_shape)
        self._index = np.arange(len(y), dtype=np.int64) if index is None else index

    def __len__(self) -> int:
        return int(len(self.y))

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def in_memory(self) -> bool:
        """True when x is an in-memory array (a GroupData), not a file or a Dataset."""
        return isinstance(self._reader, _ArrayX) and not self._reader.check

    def group_counts(self) -> np.ndarray:
        """Samples per group id, ``[num_groups]``."""
        return np.bincount(self.group, minlength=self.num_groups)

    def subset(self, index: np.ndarray) -> "TrainStream":
        """The samples at ``index`` (nothing is read): a stream over the same source."""
        index = np.asarray(index, dtype=np.int64)
        return TrainStream(self._reader, self.y[index], self.group[index], self.group_names, self.source,
                           self.sample_shape, self._index[index])

    def batches(self, index_lists: Iterable[np.ndarray], num_workers: int = 0
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x, y, group)`` numpy arrays of each index list (positions in this stream), in
        order; x is read (and checked, for streamed data) batch by batch. ``num_workers``: the
        DataLoader's worker processes for a Dataset or CSV manifest (0: in this process)."""
        lists = [np.asarray(idx, dtype=np.int64) for idx in index_lists]
        xs = self._reader.read((self._index[idx] for idx in lists), num_workers)
        for idx, x in zip(lists, xs):
            yield x, self.y[idx], self.group[idx]

    def take(self, index: np.ndarray | None = None, num_workers: int = 0, batch_size: int = 256) -> GroupData:
        """The samples at ``index`` (all when None) read into a GroupData (for small slices:
        the hold-out, a calibration subset)."""
        index = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        if self.in_memory:
            return GroupData(self._reader.x[self._index[index]], self.y[index], self.group[index],
                             self.group_names, self.source)
        chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
        xs = [x for x, _, _ in self.batches(chunks, num_workers)]
        x = np.concatenate(xs) if xs else np.zeros((0, *self.sample_shape), dtype=np.float32)
        return GroupData(x, self.y[index], self.group[index], self.group_names, self.source)

    def x_array(self) -> np.ndarray | None:
        """This stream's x as one array when it is in memory (a copy of the slice), else None."""
        return self._reader.x[self._index] if self.in_memory else None


def open_train(train: Any, num_workers: int = 0) -> TrainStream:
    """A :class:`TrainStream` over a GroupData, an ``.npz`` / ``.csv`` path or a torch Dataset
    (a TrainStream is returned as it is). ``num_workers``: DataLoader workers of a Dataset's light
    pass. Raises DataError (naming the source and the field or sample) for bad data."""
    if isinstance(train, TrainStream):
        return train
    if isinstance(train, GroupData):
        data = load_data(train)
        return TrainStream(_ArrayX(data.x, data.source, check=False), data.y, data.group, data.group_names,
                           data.source, tuple(data.x.shape[1:]))
    if isinstance(train, (str, os.PathLike)):
        suffix = Path(train).suffix.lower()
        if suffix == ".npz":
            return _open_npz(Path(train))
        if suffix == ".csv":
            rows, folder, source = read_manifest_rows(train)
            return _open_dataset(_Manifest(rows, folder, source), source, num_workers)
        load_data(train)  # raises the readers' DataError for the suffix
    if isinstance(train, Dataset):
        return _open_dataset(train, f"<{type(train).__name__}>", num_workers)
    raise DataError(MSG_UNSUPPORTED.format(kind=type(train).__name__))


# --------------------------------------------------------------------------- .npz


def _map_npz_x(path: Path, zf: zipfile.ZipFile, source: str) -> np.ndarray:
    """x of the archive as a read-only memmap (see the module docstring)."""
    info = zf.getinfo("x.npy")
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            fh = open(path, "rb")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError("bad local header of member x.npy")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            stored = info.file_size
            fh.seek(start)
        else:
            fh = tempfile.TemporaryFile()
            try:
                with zf.open(info) as member:
                    shutil.copyfileobj(member, fh, 1 << 20)
                fh.flush()
            except OSError as err:
                fh.close()
                raise DataError(MSG_INFLATE.format(source=source, tmp=tempfile.gettempdir(), err=err)) from err
            start, stored = 0, fh.tell()
            fh.seek(0)
    except (OSError, zipfile.BadZipFile) as err:
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
            if nbytes > stored - (offset - start):
                raise ValueError(f"it declares {nbytes:,} bytes but the archive holds {stored - (offset - start):,}")
            if nbytes == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        except (ValueError, OSError, EOFError, SyntaxError) as err:
            raise DataError(MSG_X_MAP.format(source=source, err=err)) from err


def _open_npz(path: Path) -> TrainStream:
    source = str(path)
    with open_npz(path) as archive:
        fields = {f: read_npz_field(archive, f, source) for f in ("y", "group", "group_names") if f in archive.files}
        x = _map_npz_x(path, archive.zip, source)
    if x.ndim < 2:
        raise DataError(MSG_X_NDIM.format(source=source, shape=x.shape))
    if x.shape[0] == 0:
        raise DataError(f"{source}: the dataset is empty (field 'x' has 0 samples)")
    y, group, names = validate_targets(fields["y"], fields["group"], fields.get("group_names"), x.shape[0], source)
    rows = max(1, _CHECK_BYTES // max(1, int(np.prod(x.shape[1:])) * 4))
    for start in range(0, x.shape[0], rows):  # one sequential pass: NaN/Inf, negative ids
        check_x_values(x[start:start + rows], source, np.arange(start, min(start + rows, x.shape[0])))
    log.info("%s: x memory-mapped, %d samples of %s %s", source, x.shape[0], x.shape[1:], x.dtype)
    return TrainStream(_ArrayX(x, source, check=True), y, group, names, source, tuple(x.shape[1:]))


# --------------------------------------------------------------------------- Dataset, CSV manifest


class _Manifest(Dataset):
    """A CSV manifest's rows as a Dataset: image (read now), label, group text."""

    def __init__(self, rows: list[tuple[int, dict[str, str]]], folder: Path, source: str) -> None:
        self.rows, self.folder, self.source = rows, folder, source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        line, row = self.rows[i]
        return manifest_item(row, f"{self.source} line {line}", self.folder)

    def labels_and_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and groups from the CSV alone (no image read)."""
        return manifest_targets(self.rows, self.source)


def _open_dataset(dataset: Any, source: str, num_workers: int) -> TrainStream:
    try:
        n = len(dataset)
    except TypeError as err:
        raise DataError(MSG_NO_LEN.format(source=source)) from err
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=source))
    names = getattr(dataset, "group_names", None)
    declared = getattr(dataset, "labels_and_groups", None)
    if callable(declared):
        y_raw, g_raw = declared()
        # the first item gives x's shape and dtype (and is checked like every other)
        _, _, _, _, shape, dtype = _unpack(next(iter(_loader(dataset, source, [[0]], 0, None, keep_x=False))))
    else:
        ys, gs, shape, dtype = [], [], None, None
        lists = [list(range(i, min(i + _LIGHT_BATCH, n))) for i in range(0, n, _LIGHT_BATCH)]
        for batch in _loader(dataset, source, lists, num_workers, None, keep_x=False):
            idx, _, by, bg, bshape, bdtype = _unpack(batch)
            if shape is None:
                shape, dtype = bshape, bdtype
            elif bshape != shape:
                raise DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=int(idx[0]), shape=bshape, first=shape))
            elif bdtype != dtype:
                raise DataError(MSG_ITEM_DTYPE.format(source=source, index=int(idx[0]), dtype=bdtype, first=dtype))
            ys.extend(by)
            gs.extend(bg)
        y_raw, g_raw = np.asarray(ys), dataset_groups(gs, source)
        log.info("%s: read the labels and groups of %d items (one pass, x not kept)", source, n)
    y, group, names = validate_targets(y_raw, g_raw, names, n, source)
    reader = _DatasetX(dataset, source, y, group, names, tuple(shape), dtype)
    return TrainStream(reader, y, group, names, source, tuple(shape))
