"""A stream over a map-style Dataset: :func:`dataset_stream` (:mod:`.stream` says what a stream is).

Items are ``x``, ``(x, y)`` or ``(x, y, group)`` (:mod:`.dataset`); a CSV manifest is such a
Dataset (:class:`~.manifest.ManifestDataset`), and so is a DataLoader's dataset. Labels and groups
come from the dataset's ``labels_and_groups()`` method (two arrays of length N) or, with the groups
known up front (``groups=`` an array or a CSV column), its ``targets`` (the labels, as
torchvision's ImageFolder has them) — else from one light pass through a
``DataLoader(num_workers=...)`` that checks every item and keeps only its label and group. Batches
are read through ``DataLoader(dataset, batch_sampler=<the index lists>, num_workers=...)``, each
item transformed and checked in the workers; a failing item reaches the main process as the text
of its error, so the message is ours and names its index.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fqexport.errors import DataError

from .checks import check_x_values
from .dataset import FIELDS, MSG_ITEM_FIELDS, MSG_ITEM_SHAPE, check_fields, dataset_item
from .groups import call_group_function, groups_up_front, is_group_function
from .stream import MSG_ITEM_DTYPE, DataStream, FirstRead
from .transform import apply_transform

log = logging.getLogger(__name__)

MSG_ITEM_READ = "{source}: sample {index} cannot be read: {kind}: {err}"
MSG_EMPTY = "{source}: the dataset is empty"
MSG_NO_LEN = "{source}: the dataset has no len(); give an indexable Dataset"
# Items per batch of the light pass over a Dataset (labels and groups only).
_LIGHT_BATCH = 256


class Picked(Dataset):
    """The samples ``indices`` of ``dataset``, in that order (a DataLoader's sampler's): the
    stream reads position i as ``dataset[indices[i]]``; messages and a group function name the
    dataset's own index (:meth:`index_of`), and what the dataset declares (labels and groups,
    ``targets``, file paths) is taken at ``indices``."""

    def __init__(self, dataset: Any, indices: Any) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.group_names = getattr(dataset, "group_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

    def index_of(self, i: int) -> int:
        return int(self.indices[i])


def _index_of(dataset: Any) -> Callable[[int], int]:
    """A stream position -> the dataset's own index (the same but for a :class:`Picked`)."""
    return dataset.index_of if isinstance(dataset, Picked) else int


def _describe(dataset: Any) -> Callable[[int], str] | None:
    """The dataset's ``describe_item(index)`` (where a sample comes from: a manifest's line and
    image), else None."""
    return getattr(dataset.dataset if isinstance(dataset, Picked) else dataset, "describe_item", None)


def _shape_mismatch(source: str, index: int, shape: Any, first: Any, describe: Callable[[int], str] | None,
                    first_index: int) -> DataError:
    """Sample ``index``'s shape is not sample 0's: both named where the dataset can say where
    they come from (the odd one may be sample 0: a grayscale image first in an RGB manifest)."""
    where = f" ({describe(index)}; sample 0: {describe(first_index)})" if describe is not None else ""
    return DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=index, shape=shape, first=first) + where)


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
            return i, None, MSG_ITEM_READ.format(source=self.source, index=_index_of(self.dataset)(i),
                                                 kind=type(err).__name__, err=err)


class _Collate:
    """Items -> ``(indices, x or None, y list, group list, x shape, x dtype, fields)``, x transformed
    and checked (finite, one shape, the fields of sample 0), the groups from ``group_fn`` when
    given; or the error text of the first bad item. Runs in the DataLoader's workers."""

    def __init__(self, source: str, shape: tuple[int, ...] | None, keep_x: bool,
                 transform: Callable | None = None, group_fn: Callable | None = None,
                 fields: int | None = None, index_of: Callable[[int], int] = int,
                 describe: Callable[[int], str] | None = None) -> None:
        self.source, self.shape, self.keep_x = source, shape, keep_x
        self.transform, self.group_fn, self.fields = transform, group_fn, fields
        self.index_of, self.describe = index_of, describe

    def __call__(self, items: list[tuple[int, Any, str | None]]):
        try:
            for _, _, err in items:
                if err is not None:
                    return err
            positions = np.array([i for i, _, _ in items], dtype=np.int64)
            # the dataset's own indices name the samples (in messages, to a group function)
            idx = np.array([self.index_of(int(i)) for i in positions], dtype=np.int64)
            parsed = [dataset_item(item, int(i), self.source) for i, (_, item, _) in zip(idx, items)]
            fields = self.fields or parsed[0].fields
            xs = []
            for i, p in zip(idx, parsed):
                check_fields(p, fields, int(i), self.source)
                xs.append(p.x if self.transform is None
                          else apply_transform(self.transform, p.x[None], int(i), self.source)[0])
            shape = self.shape if self.shape is not None else xs[0].shape
            for i, x in zip(idx, xs):
                if x.shape != shape:
                    raise _shape_mismatch(self.source, int(i), x.shape, shape, self.describe, self.index_of(0))
            x = check_x_values(np.stack(xs), self.source, idx)
            gs = ([call_group_function(self.group_fn, int(i), item, self.source) for i, (_, item, _) in zip(idx, items)]
                  if self.group_fn is not None else [p.group for p in parsed])
            return (positions, torch.from_numpy(x) if self.keep_x else None, [p.y for p in parsed], gs,
                    tuple(shape), str(x.dtype), fields)
        except DataError as err:
            return str(err)


def _loader(dataset: Any, source: str, lists: list[list[int]], num_workers: int, collate: _Collate) -> DataLoader:
    return DataLoader(_Indexed(dataset, source), batch_sampler=lists, num_workers=num_workers, collate_fn=collate)


def _unpack(batch):
    if isinstance(batch, str):
        raise DataError(batch)
    return batch


class _DatasetX:
    """x of a map-style Dataset, read through a DataLoader per pass."""

    def __init__(self, dataset: Any, first: FirstRead, shape: tuple[int, ...], transform: Callable | None,
                 num_workers: int = 0) -> None:
        self.dataset, self.first, self.shape, self.transform = dataset, first, shape, transform
        self.num_workers = num_workers  # the source's own (a DataLoader's, load_data's): every pass uses them

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        num_workers = max(num_workers, self.num_workers)
        lists = [[int(i) for i in idx] for idx in index_lists]
        collate = _Collate(self.first.source, self.shape, True, self.transform, fields=self.first.fields,
                           index_of=_index_of(self.dataset), describe=_describe(self.dataset))
        for batch in _loader(self.dataset, self.first.source, lists, num_workers, collate):
            idx, x, ys, gs, _, dtype, _ = _unpack(batch)
            self.first.check(idx, dtype, ys, gs)
            yield x.numpy()


def sample_paths(dataset: Any) -> list[str] | None:
    """The samples' file paths of an ImageFolder-like dataset (``samples`` or ``imgs``: a list of
    ``(path, label)``), else None."""
    if isinstance(dataset, Picked):
        paths = sample_paths(dataset.dataset)
        return None if paths is None else [paths[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        samples = getattr(dataset, "imgs", None)
    if samples is None:
        return None
    return [str(s[0]) if isinstance(s, (tuple, list)) else str(s) for s in samples]


def _declared(dataset: Any, groups_known: bool) -> tuple[Any, Any] | None:
    """``(labels, groups or None)`` a dataset states without reading an item: its
    ``labels_and_groups()``, or — when the groups are known anyway — its ``targets``."""
    if isinstance(dataset, Picked):
        whole = _declared(dataset.dataset, groups_known)
        pick = dataset.indices
        return None if whole is None else tuple(None if a is None else np.asarray(a)[pick] for a in whole)
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
    index_of = _index_of(dataset)
    collate = _Collate(source, None, False, transform, group_fn, index_of=index_of, describe=_describe(dataset))
    for batch in _loader(dataset, source, lists, num_workers, collate):
        positions, _, by, bg, bshape, bdtype, bfields = _unpack(batch)
        idx = [index_of(int(positions[0]))]  # the first sample's own index, for the messages below
        if shape is None:
            shape, dtype, fields = bshape, bdtype, bfields
        elif bfields != fields:
            raise DataError(f"{source}: " + MSG_ITEM_FIELDS.format(index=int(idx[0]), got=FIELDS[bfields],
                                                                   first=FIELDS[fields]))
        elif bshape != shape:
            raise _shape_mismatch(source, int(idx[0]), bshape, shape, collate.describe, index_of(0))
        elif bdtype != dtype:
            raise DataError(MSG_ITEM_DTYPE.format(source=source, index=int(idx[0]), dtype=bdtype, first=dtype))
        ys.extend(by)
        gs.extend(bg)
    log.info("%s: read the labels and groups of %d items (one pass, x not kept)", source, n)
    return ys, gs, shape, dtype, fields


def dataset_stream(dataset: Any, source: str, groups: Any = None, transform: Callable | None = None,
                   num_workers: int = 0, indices: Callable[[int], Any] | None = None) -> DataStream:
    """A stream over a map-style Dataset (module docstring); ``groups`` and ``transform`` as
    ``load_data`` takes them. ``indices(len(dataset))``: the dataset indices to read (a
    DataLoader's sampler's; None: all), each sample still named by its own index, a ``groups``
    array or CSV column still given per dataset sample."""
    try:
        n = len(dataset)
    except TypeError as err:
        raise DataError(MSG_NO_LEN.format(source=source)) from err
    group_fn = groups if is_group_function(groups) else None
    given = groups_up_front(groups, n, source, lambda: sample_paths(dataset))
    picked = indices(n) if indices is not None else None
    if picked is not None:
        dataset, n = Picked(dataset, picked), len(picked)
        given = None if given is None else given[dataset.indices]
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=source))
    names = getattr(dataset, "group_names", None) if groups is None else None
    declared = None if group_fn is not None else _declared(dataset, given is not None)
    if declared is not None and (given is not None or declared[1] is not None):
        y_raw, given, gs = declared[0], given if given is not None else declared[1], []
        # the first item gives x's shape, dtype and fields (and is checked like every other)
        loader = _loader(dataset, source, [[0]], 0, _Collate(source, None, False, transform, index_of=_index_of(dataset)))
        _, _, _, _, shape, dtype, fields = _unpack(next(iter(loader)))
    else:
        ys, gs, shape, dtype, fields = _light_pass(dataset, source, n, num_workers, transform, group_fn)
        y_raw = np.asarray(ys) if fields >= 2 else None
    first = FirstRead.establish(source, n, shape, dtype, fields, y_raw, given, gs, group_fn, names,
                                groups_from_items=groups is None)
    describe = _describe(dataset)
    origin = f"sample 0: {describe(_index_of(dataset)(0))}" if describe is not None else None
    return DataStream(_DatasetX(dataset, first, tuple(shape), transform, num_workers), first.y, first.group,
                      first.names, source, tuple(shape), shape_origin=origin)
