"""Group-labeled data read batch by batch: :class:`DataStream`.

A DataStream holds the groups (and the labels, when the data has them) as arrays and reads x only
for the samples a stage asks for (:meth:`DataStream.batches`, :meth:`DataStream.take`), so memory
is bounded by the batch (and by what a stage keeps: compress's calibration subset), not by the
data set. ``fqexport.load_data`` / ``open_stream`` (:mod:`.readers`) open one over:

- a :class:`GroupData` (:func:`in_memory_stream`): batches are slices of it;
- an ``.npz`` path (:func:`npz_stream`): y, group (and group_names) read whole; x memory-mapped
  (:func:`~.npz.map_npz_x`) and checked (NaN/Inf, negative ids) chunk by chunk when opened, one
  sequential read, so a bad value stops the run before any output;
- a map-style Dataset (or a list) of items ``x``, ``(x, y)`` or ``(x, y, group)``
  (:func:`dataset_stream`; a CSV manifest is one, :class:`~.manifest.ManifestDataset`): labels
  and groups come from its ``labels_and_groups()`` method (two arrays of length N) or, with the
  groups known up front (``groups=`` an array or a CSV column), its ``targets`` (the labels, as
  torchvision's ImageFolder has them) — else from one light pass through a
  ``DataLoader(num_workers=...)`` that checks every item and keeps only its label and group.
  Batches are read through ``DataLoader(dataset, batch_sampler=<the index lists>, num_workers=...)``;
- a DataLoader over a map-style Dataset with the default collate: its dataset, as above, with its
  ``num_workers`` (its sampler and batch size do not matter: samples are the dataset's indices);
- any other re-iterable — an IterableDataset, a DataLoader with its own ``collate_fn`` (whose
  batches are split into samples) — (:func:`iterable_stream`): one light pass, then each read is
  one pass that keeps only the samples asked for. It must yield the same samples in the same order
  on every pass; a one-shot iterator is refused.

``transform`` (:mod:`.transform`) is applied to x as it is read; ``groups`` (:mod:`.groups`) give
the groups when the items do not. Every streamed batch is checked again (x's shape and dtype,
NaN/Inf, its labels and groups equal to the ones read first, a known group); a bad item raises one
:class:`DataError` that names the source and the sample's index.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fqexport.errors import DataError

from .checks import check_x_values, group_ids, validate_targets
from .dataset import FIELDS, MSG_ITEM_FIELDS, MSG_ITEM_SHAPE, batch_items, check_fields, dataset_groups, dataset_item
from .group_data import GroupData
from .groups import call_group_function, groups_up_front, is_group_function
from .npz import map_npz_x, open_npz, read_npz_field
from .transform import apply_transform

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
MSG_EMPTY = "{source}: the dataset is empty"
MSG_NO_LEN = "{source}: the dataset has no len(); give an indexable Dataset"
MSG_NO_GROUPS = (
    "{source}: the samples carry no group: yield (x, y, group), or give groups= (an array, a function "
    "(index, sample) -> group, or fqexport.GroupsFromCSV(path, column))"
)
MSG_PASS_SHORT = (
    "{source}: this pass yielded {got} samples but the first pass yielded {n}; an iterable must yield "
    "the same samples in the same order every time"
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
    """Items -> ``(indices, x or None, y list, group list, x shape, x dtype, fields)``, x transformed
    and checked (finite, one shape, the fields of sample 0), the groups from ``group_fn`` when
    given; or the error text of the first bad item. Runs in the DataLoader's workers."""

    def __init__(self, source: str, shape: tuple[int, ...] | None, keep_x: bool,
                 transform: Callable | None = None, group_fn: Callable | None = None,
                 fields: int | None = None) -> None:
        self.source, self.shape, self.keep_x = source, shape, keep_x
        self.transform, self.group_fn, self.fields = transform, group_fn, fields

    def __call__(self, items: list[tuple[int, Any, str | None]]):
        try:
            for _, _, err in items:
                if err is not None:
                    return err
            idx = np.array([i for i, _, _ in items], dtype=np.int64)
            parsed = [dataset_item(item, i, self.source) for i, item, _ in items]
            fields = self.fields or parsed[0].fields
            xs = []
            for i, p in zip(idx, parsed):
                check_fields(p, fields, int(i), self.source)
                xs.append(p.x if self.transform is None
                          else apply_transform(self.transform, p.x[None], int(i), self.source)[0])
            shape = self.shape if self.shape is not None else xs[0].shape
            for i, x in zip(idx, xs):
                if x.shape != shape:
                    raise DataError(f"{self.source}: " + MSG_ITEM_SHAPE.format(index=int(i), shape=x.shape, first=shape))
            x = check_x_values(np.stack(xs), self.source, idx)
            gs = ([call_group_function(self.group_fn, int(i), item, self.source) for i, item, _ in items]
                  if self.group_fn is not None else [p.group for p in parsed])
            return (idx, torch.from_numpy(x) if self.keep_x else None, [p.y for p in parsed], gs,
                    tuple(shape), str(x.dtype), fields)
        except DataError as err:
            return str(err)


def _loader(dataset: Any, source: str, lists: list[list[int]], num_workers: int, collate: _Collate) -> DataLoader:
    return DataLoader(_Indexed(dataset, source), batch_sampler=lists, num_workers=num_workers, collate_fn=collate)


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


class _Known:
    """What the first read established, for the checks of every later batch: x's dtype, the
    items' fields, the labels and groups (``check_groups``: the groups came from the items)."""

    def __init__(self, source: str, y: np.ndarray | None, group: np.ndarray, names: Sequence[str],
                 dtype: str, fields: int, check_groups: bool) -> None:
        self.source, self.y, self.group, self.names = source, y, group, tuple(names)
        self.dtype, self.fields, self.check_groups = dtype, fields, check_groups

    def check(self, idx: np.ndarray, dtype: str, ys: Sequence[Any] | None, gs: Sequence[Any] | None) -> None:
        if dtype != self.dtype:
            raise DataError(MSG_ITEM_DTYPE.format(source=self.source, index=int(idx[0]), dtype=dtype, first=self.dtype))
        if self.y is not None and ys is not None and self.fields >= 2:
            _same(self.source, idx, "label", np.asarray(ys), self.y[idx])
        if self.check_groups and gs is not None:
            got = group_ids(dataset_groups(list(gs), self.source), self.names, self.source, idx)
            _same(self.source, idx, "group", got, self.group[idx])


class _DatasetX:
    """x of a map-style Dataset, read through a DataLoader per pass."""

    def __init__(self, dataset: Any, known: _Known, shape: tuple[int, ...], transform: Callable | None) -> None:
        self.dataset, self.known, self.shape, self.transform = dataset, known, shape, transform

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        lists = [[int(i) for i in idx] for idx in index_lists]
        collate = _Collate(self.known.source, self.shape, True, self.transform, fields=self.known.fields)
        for batch in _loader(self.dataset, self.known.source, lists, num_workers, collate):
            idx, x, ys, gs, _, dtype, _ = _unpack(batch)
            self.known.check(idx, dtype, ys, gs)
            yield x.numpy()


class _Walk:
    """One pass over a re-iterable source: its samples in order as ``(position, x or None, y,
    group, item)``, x transformed and checked; ``want`` (positions) limits the x kept."""

    def __init__(self, iterable: Any, source: str, batched: bool, transform: Callable | None) -> None:
        self.iterable, self.source, self.batched, self.transform = iterable, source, batched, transform

    def samples(self, want: set[int] | None) -> Iterator[tuple[int, np.ndarray | None, Any, Any, int, Any]]:
        pos = 0
        for element in self.iterable:
            if self.batched:
                x, ys, gs, fields = batch_items(element, pos, self.source)
                n = x.shape[0]
                rows = range(pos, pos + n)
                keep = want is None or any(p in want for p in rows)
                if keep:
                    if self.transform is not None:
                        x = apply_transform(self.transform, x, pos, self.source)
                    x = check_x_values(x, self.source, np.arange(pos, pos + n))
                for k, p in enumerate(rows):
                    row = (x[k],) + ((ys[k],) if ys is not None else ()) + ((gs[k],) if gs is not None else ())
                    yield p, x[k] if keep else None, None if ys is None else ys[k], None if gs is None else gs[k], \
                        fields, row
                pos += n
            else:
                item = dataset_item(element, pos, self.source)
                x = None
                if want is None or pos in want:
                    x = item.x if self.transform is None else apply_transform(self.transform, item.x[None], pos,
                                                                                self.source)[0]
                    x = check_x_values(x[None], self.source, np.array([pos]))[0]
                yield pos, x, item.y, item.group, item.fields, element
                pos += 1


class _IterableX:
    """x of a re-iterable source, read in passes: each :meth:`read` iterates it once, keeping only
    the samples of the index lists not yet yielded (a list is yielded as soon as it is complete)."""

    def __init__(self, walk: _Walk, known: _Known, shape: tuple[int, ...], n: int) -> None:
        self.walk, self.known, self.shape, self.n = walk, known, shape, n

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        lists = [np.asarray(idx, dtype=np.int64) for idx in index_lists]
        needed = Counter(int(i) for idx in lists for i in idx)
        held: dict[int, np.ndarray] = {}
        k = 0
        seen = 0
        source = self.known.source
        for pos, x, y, g, fields, _ in self.walk.samples(set(needed)):
            seen = pos + 1
            if pos not in needed:
                continue
            if x.shape != self.shape:
                raise DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=pos, shape=x.shape, first=self.shape))
            self.known.check(np.array([pos]), str(x.dtype), None if y is None else [y], None if g is None else [g])
            held[pos] = x
            while k < len(lists) and all(int(i) in held for i in lists[k]):
                yield np.stack([held[int(i)] for i in lists[k]]) if len(lists[k]) else \
                    np.zeros((0, *self.shape), dtype=self.known.dtype)
                for i in lists[k]:
                    needed[int(i)] -= 1
                    if needed[int(i)] == 0:
                        held.pop(int(i), None)
                k += 1
            if k == len(lists):
                return
        while k < len(lists) and len(lists[k]) == 0:
            yield np.zeros((0, *self.shape), dtype=self.known.dtype)
            k += 1
        if k < len(lists):
            raise DataError(MSG_PASS_SHORT.format(source=source, got=seen, n=self.n))


# --------------------------------------------------------------------------- the stream


class DataStream:
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
                 index: np.ndarray | None = None) -> None:
        self._reader = reader
        self.y, self.group = y, group
        self.group_names = tuple(group_names)
        self.source = source
        self.sample_shape = tuple(sample_shape)
        self._index = np.arange(len(group), dtype=np.int64) if index is None else index

    def __len__(self) -> int:
        return int(len(self.group))

    def __repr__(self) -> str:
        labels = "labels" if self.y is not None else "no labels"
        return (f"DataStream({self.source}: {len(self)} samples of {self.sample_shape}, {labels}, "
                f"groups {dict(zip(self.group_names, self.group_counts().tolist()))})")

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def in_memory(self) -> bool:
        """True when x is an in-memory array (a GroupData), not a file or a Dataset."""
        return isinstance(self._reader, _ArrayX) and not self._reader.check

    def group_counts(self) -> np.ndarray:
        """Samples per group id, ``[num_groups]``."""
        return np.bincount(self.group, minlength=self.num_groups)

    def subset(self, index: np.ndarray) -> "DataStream":
        """The samples at ``index`` (nothing is read): a stream over the same source."""
        index = np.asarray(index, dtype=np.int64)
        y = None if self.y is None else self.y[index]
        return DataStream(self._reader, y, self.group[index], self.group_names, self.source,
                          self.sample_shape, self._index[index])

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
            return GroupData(self._reader.x[self._index[index]], y, self.group[index], self.group_names, self.source)
        chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
        xs = [x for x, _, _ in self.batches(chunks, num_workers)]
        x = np.concatenate(xs) if xs else np.zeros((0, *self.sample_shape), dtype=np.float32)
        return GroupData(x, y, self.group[index], self.group_names, self.source)

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
                      data.source, tuple(data.x.shape[1:]))


# --------------------------------------------------------------------------- .npz


def npz_stream(path: Path) -> DataStream:
    """An ``.npz`` whose x is memory-mapped and checked chunk by chunk now (module docstring)."""
    source = str(path)
    with open_npz(path) as archive:
        fields = {f: read_npz_field(archive, f, source) for f in ("y", "group", "group_names") if f in archive.files}
        x = map_npz_x(path, archive.zip, source)
    if x.ndim < 2:
        raise DataError(MSG_X_NDIM.format(source=source, shape=x.shape))
    if x.shape[0] == 0:
        raise DataError(f"{source}: the dataset is empty (field 'x' has 0 samples)")
    y, group, names = validate_targets(fields.get("y"), fields["group"], fields.get("group_names"), x.shape[0], source)
    rows = max(1, _CHECK_BYTES // max(1, int(np.prod(x.shape[1:])) * 4))
    for start in range(0, x.shape[0], rows):  # one sequential pass: NaN/Inf, negative ids
        check_x_values(x[start:start + rows], source, np.arange(start, min(start + rows, x.shape[0])))
    log.info("%s: x memory-mapped, %d samples of %s %s", source, x.shape[0], x.shape[1:], x.dtype)
    return DataStream(_ArrayX(x, source, check=True), y, group, names, source, tuple(x.shape[1:]))


# --------------------------------------------------------------------------- Dataset, CSV manifest


def sample_paths(dataset: Any) -> list[str] | None:
    """The samples' file paths of an ImageFolder-like dataset (``samples`` or ``imgs``: a list of
    ``(path, label)``), else None."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        samples = getattr(dataset, "imgs", None)
    if samples is None:
        return None
    return [str(s[0]) if isinstance(s, (tuple, list)) else str(s) for s in samples]


def _declared(dataset: Any, groups_known: bool) -> tuple[Any, Any] | None:
    """``(labels, groups or None)`` a dataset states without reading an item: its
    ``labels_and_groups()``, or — when the groups are known anyway — its ``targets``."""
    declared = getattr(dataset, "labels_and_groups", None)
    if callable(declared):
        return declared()
    targets = getattr(dataset, "targets", None)
    if groups_known and targets is not None:
        return np.asarray(targets.detach().cpu().numpy() if hasattr(targets, "detach") else targets), None
    return None


def _light_pass(dataset: Any, source: str, n: int, num_workers: int, transform: Callable | None,
                group_fn: Callable | None) -> tuple[list, list, tuple[int, ...], str, int]:
    """Every item read once and checked (x kept nowhere): ``(labels, groups, x shape, dtype, fields)``."""
    ys, gs, shape, dtype, fields = [], [], None, None, None
    lists = [list(range(i, min(i + _LIGHT_BATCH, n))) for i in range(0, n, _LIGHT_BATCH)]
    for batch in _loader(dataset, source, lists, num_workers, _Collate(source, None, False, transform, group_fn)):
        idx, _, by, bg, bshape, bdtype, bfields = _unpack(batch)
        if shape is None:
            shape, dtype, fields = bshape, bdtype, bfields
        elif bfields != fields:
            raise DataError(f"{source}: " + MSG_ITEM_FIELDS.format(index=int(idx[0]), got=FIELDS[bfields],
                                                                   first=FIELDS[fields]))
        elif bshape != shape:
            raise DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=int(idx[0]), shape=bshape, first=shape))
        elif bdtype != dtype:
            raise DataError(MSG_ITEM_DTYPE.format(source=source, index=int(idx[0]), dtype=bdtype, first=dtype))
        ys.extend(by)
        gs.extend(bg)
    log.info("%s: read the labels and groups of %d items (one pass, x not kept)", source, n)
    return ys, gs, shape, dtype, fields


def dataset_stream(dataset: Any, source: str, groups: Any = None, transform: Callable | None = None,
                   num_workers: int = 0) -> DataStream:
    """A stream over a map-style Dataset (module docstring); ``groups`` and ``transform`` as
    ``load_data`` takes them."""
    try:
        n = len(dataset)
    except TypeError as err:
        raise DataError(MSG_NO_LEN.format(source=source)) from err
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=source))
    group_fn = groups if is_group_function(groups) else None
    given = groups_up_front(groups, n, source, lambda: sample_paths(dataset))
    names = getattr(dataset, "group_names", None) if groups is None else None
    declared = None if group_fn is not None else _declared(dataset, given is not None)
    if declared is not None and (given is not None or declared[1] is not None):
        y_raw, g_raw = declared[0], given if given is not None else declared[1]
        # the first item gives x's shape, dtype and fields (and is checked like every other)
        first = _loader(dataset, source, [[0]], 0, _Collate(source, None, False, transform))
        _, _, _, _, shape, dtype, fields = _unpack(next(iter(first)))
    else:
        ys, gs, shape, dtype, fields = _light_pass(dataset, source, n, num_workers, transform, group_fn)
        y_raw = np.asarray(ys) if fields >= 2 else None
        g_raw = given if given is not None else (
            dataset_groups(gs, source) if group_fn is not None or fields == 3 else None)
    if g_raw is None:
        raise DataError(MSG_NO_GROUPS.format(source=source))
    if not shape:
        raise DataError(MSG_X_NDIM.format(source=source, shape=(n, *shape)))
    y, group, names = validate_targets(y_raw, g_raw, names, n, source)
    known = _Known(source, y, group, names, dtype, fields, check_groups=groups is None and fields == 3)
    return DataStream(_DatasetX(dataset, known, tuple(shape), transform), y, group, names, source, tuple(shape))


def iterable_stream(iterable: Any, source: str, batched: bool, groups: Any = None,
                    transform: Callable | None = None) -> DataStream:
    """A stream over a re-iterable of items (or of batches when ``batched``), read in passes
    (module docstring)."""
    walk = _Walk(iterable, source, batched, transform)
    group_fn = groups if is_group_function(groups) else None
    ys, gs, shape, dtype, fields, n = [], [], None, None, None, 0
    for pos, x, y, g, f, item in walk.samples(None):
        if shape is None:
            shape, dtype, fields = x.shape, str(x.dtype), f
        elif f != fields:
            raise DataError(f"{source}: " + MSG_ITEM_FIELDS.format(index=pos, got=FIELDS[f], first=FIELDS[fields]))
        elif x.shape != shape:
            raise DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=pos, shape=x.shape, first=shape))
        elif str(x.dtype) != dtype:
            raise DataError(MSG_ITEM_DTYPE.format(source=source, index=pos, dtype=x.dtype, first=dtype))
        ys.append(y)
        gs.append(call_group_function(group_fn, pos, item, source) if group_fn is not None else g)
        n = pos + 1
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=source))
    given = groups_up_front(groups, n, source, lambda: None)
    g_raw = given if given is not None else (
        dataset_groups(gs, source) if group_fn is not None or fields == 3 else None)
    if g_raw is None:
        raise DataError(MSG_NO_GROUPS.format(source=source))
    if not shape:
        raise DataError(MSG_X_NDIM.format(source=source, shape=(n, *shape)))
    y, group, names = validate_targets(np.asarray(ys) if fields >= 2 else None, g_raw, None, n, source)
    log.info("%s: read the labels and groups of %d samples (one pass, x not kept)", source, n)
    known = _Known(source, y, group, names, dtype, fields, check_groups=groups is None and fields == 3)
    return DataStream(_IterableX(walk, known, tuple(shape), n), y, group, names, source, tuple(shape))
