"""Group-labeled data read batch by batch: :class:`DataStream`.

A DataStream holds the groups (and the labels, when the data has them) as arrays and reads x only
for the samples a stage asks for (:meth:`DataStream.batches`, :meth:`DataStream.take`), so memory
is bounded by the batch (and by what a stage keeps: compress's calibration subset), not by the
data set. ``fqexport.load_data`` / ``open_stream`` (:mod:`.readers`) open one over:

- a :class:`GroupData` (:func:`in_memory_stream`): batches are slices of it;
- an ``.npz`` path (:func:`npz_stream`): y, group (and group_names) read whole; x memory-mapped
  (:func:`~.npz.map_npz_x`) and checked (NaN/Inf, negative ids) chunk by chunk when opened, one
  sequential read, so a bad value stops the run before any output;
- a map-style Dataset, a CSV manifest, a DataLoader over a map-style Dataset
  (:mod:`.dataset_stream`): x read through a DataLoader, index by index;
- any other re-iterable (:mod:`.iterable_stream`): x read in passes.

``transform`` (:mod:`.transform`) is applied to x as it is read; ``groups`` (:mod:`.groups`) give
the groups when the items do not. Every streamed batch is checked again (x's shape and dtype,
NaN/Inf, its labels and groups equal to the ones read first, a known group): a bad item raises one
:class:`DataError` that names the source and the sample's index (:class:`FirstRead`).
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fqexport.errors import DataError

from .checks import check_annotations, check_x_values, group_ids, validate_targets
from .dataset import dataset_groups
from .group_data import GroupData, GroupViews
from .npz import BOX_FIELDS, MASK_FIELDS, map_npz_x, npz_annotations, open_npz, read_npz_field

log = logging.getLogger(__name__)

MSG_ITEM_DTYPE = "{source}: sample {index}: field 'x' has dtype {dtype} but sample 0 has {first}; store one dtype"
MSG_ITEM_CHANGED = (
    "{source}: sample {index}: its {field} is {got} in this pass but was {want} when first read; a Dataset "
    "must give the same labels and groups every time (random transforms may change x only)"
)
MSG_X_NDIM = (
    "{source}: field 'x' must have at least 2 dims [N, features...], got shape {shape}; "
    "add a feature axis, e.g. x[:, None]"
)
MSG_NO_GROUPS = (
    "{source}: the samples carry no group: yield (x, y, group), or give groups= (an array, a function "
    "(index, sample) -> group, or fqexport.GroupsFromCSV(path, column))"
)

# Rows per chunk of the check of a memory-mapped x at open (about 64 MB of float32 at a time).
_CHECK_BYTES = 64 << 20


class _ArrayX:
    """x held by an array (in memory, or a read-only memmap checked per batch)."""

    def __init__(self, x: np.ndarray, source: str, check: bool) -> None:
        self.x, self.source, self.check = x, source, check

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        for idx in index_lists:
            xb = self.x[idx]  # a copy: the mapped rows' pages can go back (re-read from the file if needed)
            if self.check and len(idx):
                _drop_pages(self.x, int(np.min(idx)), int(np.max(idx)) + 1)
            yield check_x_values(xb, self.source, idx) if self.check else xb


def _same(source: str, idx: np.ndarray, field: str, got: np.ndarray, want: np.ndarray) -> None:
    diff = np.flatnonzero(got != want)
    if len(diff):
        k = int(diff[0])
        raise DataError(MSG_ITEM_CHANGED.format(source=source, index=int(idx[k]), field=field,
                                                got=got[k], want=want[k]))


class FirstRead:
    """What the first read established, for the checks of every later batch: x's dtype, the
    items' fields, the labels and groups (``check_groups``: the groups came from the items)."""

    def __init__(self, source: str, y: np.ndarray | None, group: np.ndarray, names: Sequence[str],
                 dtype: str, fields: int, check_groups: bool, ids_named: bool = False) -> None:
        self.source, self.y, self.group, self.names = source, y, group, tuple(names)
        self.dtype, self.fields, self.check_groups = dtype, fields, check_groups
        # the items' integer group ids were named by the first read (id k: the group 'group{k}')
        self.ids_named = ids_named

    @classmethod
    def establish(cls, source: str, n: int, shape: Sequence[int], dtype: str, fields: int, y_raw: Any,
                  given: Any, item_groups: Sequence[Any], group_fn: Any, names: Sequence[str] | None,
                  groups_from_items: bool) -> "FirstRead":
        """The first read of ``n`` items of ``shape`` (``fields`` per item): labels ``y_raw``,
        groups ``given`` up front, else from the group function or the items (``item_groups``);
        DataError without groups or with scalar samples; labels and groups checked."""
        g_raw = given if given is not None else (
            dataset_groups(item_groups, source) if group_fn is not None or fields == 3 else None)
        if g_raw is None:
            raise DataError(MSG_NO_GROUPS.format(source=source))
        if not shape:
            raise DataError(MSG_X_NDIM.format(source=source, shape=(n, *shape)))
        ids_named = names is None and np.asarray(g_raw).dtype.kind in "iufb"
        y, group, names = validate_targets(y_raw, g_raw, names, n, source)
        return cls(source, y, group, names, dtype, fields, check_groups=groups_from_items and fields == 3,
                   ids_named=ids_named)

    def check(self, idx: np.ndarray, dtype: str, ys: Sequence[Any] | None, gs: Sequence[Any] | None) -> None:
        if dtype != self.dtype:
            raise DataError(MSG_ITEM_DTYPE.format(source=self.source, index=int(idx[0]), dtype=dtype, first=self.dtype))
        if self.y is not None and ys is not None and self.fields >= 2:
            _same(self.source, idx, "label", np.asarray(ys), self.y[idx])
        if self.check_groups and gs is not None:
            raw = dataset_groups(list(gs), self.source)
            if self.ids_named and np.asarray(raw).dtype.kind in "iufb":  # ids 1, 2 are 'group1', 'group2'
                raw = np.array([f"group{int(k)}" for k in np.asarray(raw).tolist()])
            got = group_ids(raw, self.names, self.source, idx)
            _same(self.source, idx, "group", got, self.group[idx])


# --------------------------------------------------------------------------- the stream


class DataStream(GroupViews):
    """Group-labeled data whose x is read per batch (see the module docstring).

    Attributes:
        y: class labels, int64 ``[N]``; None when the data has no labels.
        group: group ids, int64 ``[N]``.
        group_names: a name per group id.
        source: where the data came from, used in messages.
        sample_shape: the shape of one x.
    """

    def __init__(self, reader: Any, y: np.ndarray | None, group: np.ndarray,
                 group_names: Sequence[str], source: str, sample_shape: tuple[int, ...],
                 index: np.ndarray | None = None, annotations: Any = None, shape_origin: str | None = None) -> None:
        self._reader = reader
        # where sample_shape was read (the first item: a manifest's line and image), for messages
        self.shape_origin = shape_origin
        self.annotations = annotations  # boxes or masks of these samples (.annotations), or None
        self.y, self.group = y, group
        self.group_names = tuple(group_names)
        self.source = source
        self.sample_shape = tuple(sample_shape)
        self._index = np.arange(len(group), dtype=np.int64) if index is None else index

    def __len__(self) -> int:
        return int(len(self.group))

    def __repr__(self) -> str:
        return self._summary("DataStream")

    @property
    def in_memory(self) -> bool:
        """True when x is an in-memory array (a GroupData), not a file or a Dataset."""
        return isinstance(self._reader, _ArrayX) and not self._reader.check

    def subset(self, index: np.ndarray) -> "DataStream":
        """The samples at ``index`` (nothing is read): a stream over the same source."""
        index = np.asarray(index, dtype=np.int64)
        y = None if self.y is None else self.y[index]
        return DataStream(self._reader, y, self.group[index], self.group_names, self.source,
                          self.sample_shape, self._index[index], self._notes(index), self.shape_origin)

    def batches(self, index_lists: Iterable[np.ndarray], num_workers: int = 0
                ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """``(x, y, group)`` numpy arrays of each index list (positions in this stream), in
        order; x is read (and checked, for streamed data) batch by batch; y None without labels.
        ``num_workers``: the DataLoader's worker processes for a Dataset or CSV manifest (0: in
        this process)."""
        lists = [np.asarray(idx, dtype=np.int64) for idx in index_lists]
        xs = self._reader.read((self._index[idx] for idx in lists), num_workers)
        for idx, x in zip(lists, xs):
            yield x, None if self.y is None else self.y[idx], self.group[idx]

    def take(self, index: np.ndarray | None = None, num_workers: int = 0, batch_size: int = 256) -> GroupData:
        """The samples at ``index`` (all when None) read into a GroupData (for small slices:
        the hold-out, a calibration subset)."""
        index = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        y = None if self.y is None else self.y[index]
        if self.in_memory:
            return GroupData(self._reader.x[self._index[index]], y, self.group[index], self.group_names, self.source,
                             self._notes(index))
        chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
        xs = [x for x, _, _ in self.batches(chunks, num_workers)]
        x = np.concatenate(xs) if xs else np.zeros((0, *self.sample_shape), dtype=np.float32)
        return GroupData(x, y, self.group[index], self.group_names, self.source, self._notes(index))

    def _notes(self, index: np.ndarray) -> Any:
        return None if self.annotations is None else self.annotations.subset(index)

    def x_array(self) -> np.ndarray | None:
        """This stream's x as one array when it is in memory (a copy of the slice), else None."""
        return self._reader.x[self._index] if self.in_memory else None


def ordered_x(data: GroupData | DataStream, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
    """x of ``data`` in order, ``batch_size`` samples at a time (a GroupData is sliced)."""
    if isinstance(data, GroupData):
        for x, _, _ in data.batches(batch_size):
            yield x
        return
    n = len(data)
    chunks = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    for x, _, _ in data.batches(chunks, num_workers):
        yield x


def map_x(fn: Callable[[np.ndarray], np.ndarray], data: GroupData | DataStream, batch_size: int = 256) -> np.ndarray:
    """``fn`` of all of ``data``'s x, in order: ``fn(data.x)`` for a GroupData (``fn`` batches
    itself), the concatenation of ``fn`` per chunk of ``batch_size`` for a stream."""
    if isinstance(data, GroupData):
        return fn(data.x)
    outs = [fn(x) for x in ordered_x(data, batch_size)]
    return np.concatenate(outs) if outs else fn(np.zeros((0, *data.sample_shape), np.float32))


def in_memory_stream(data: GroupData) -> DataStream:
    """A stream over an (already checked) GroupData: batches are slices of it."""
    return DataStream(_ArrayX(data.x, data.source, check=False), data.y, data.group, data.group_names,
                      data.source, tuple(data.x.shape[1:]), annotations=data.annotations)


# --------------------------------------------------------------------------- .npz


def _drop_pages(x: np.ndarray, start: int, stop: int) -> None:
    """Give back the pages of rows ``[start, stop)`` of a memory-mapped C-order ``x``
    (``MADV_DONTNEED``; they are read again from the file when needed): a pass over every row
    otherwise leaves the whole file resident in this process, which a stage that then reads only
    ``num_calib`` rows does not need."""
    mm = getattr(x, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or not x.flags.c_contiguous:
        return
    row = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize
    lead = int(getattr(x, "offset", 0)) % mmap.ALLOCATIONGRANULARITY  # where the array starts in the mapping
    lo, hi = lead + start * row, min(lead + stop * row, len(mm))
    lo -= lo % mmap.PAGESIZE
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # a platform without it: the pages stay, as before
            pass


def npz_stream(path: Path) -> DataStream:
    """An ``.npz`` whose x is memory-mapped and checked chunk by chunk now (module docstring)."""
    source = str(path)
    with open_npz(path) as archive:
        fields = {f: read_npz_field(archive, f, source)
                  for f in ("y", "group", "group_names", *BOX_FIELDS, *MASK_FIELDS) if f in archive.files}
        x = map_npz_x(path, archive.zip, source)
    if x.ndim < 2:
        raise DataError(MSG_X_NDIM.format(source=source, shape=x.shape))
    if x.shape[0] == 0:
        raise DataError(f"{source}: the dataset is empty (field 'x' has 0 samples)")
    y, group, names = validate_targets(fields.get("y"), fields["group"], fields.get("group_names"), x.shape[0], source)
    rows = max(1, _CHECK_BYTES // max(1, int(np.prod(x.shape[1:])) * 4))
    for start in range(0, x.shape[0], rows):  # one sequential pass: NaN/Inf, negative ids
        stop = min(start + rows, x.shape[0])
        check_x_values(x[start:stop], source, np.arange(start, stop))
        _drop_pages(x, start, stop)
    log.info("%s: x memory-mapped, %d samples of %s %s", source, x.shape[0], x.shape[1:], x.dtype)
    notes = check_annotations(npz_annotations(fields, source), tuple(x.shape[1:]), source, x.shape[0])
    return DataStream(_ArrayX(x, source, check=True), y, group, names, source, tuple(x.shape[1:]), annotations=notes)


def shape_origin_note(data: Any) -> str:
    """`` (x's shape as read from <where>)`` for a stream that took its sample shape from one item
    it can name (a manifest's first line and image), else ``""``: a shape error then points at
    the odd file instead of blaming the whole data set."""
    origin = getattr(data, "shape_origin", None)
    return f" (x's shape as read from {origin})" if origin else ""
