"""Readers of group-labeled data: :func:`load_data`, the one entry point, and :func:`open_stream`.

``load_data(source, groups=None, transform=None)`` gives what every API function accepts:

- a :class:`GroupData` (re-checked, :mod:`.checks`), an ``.npz`` path (:mod:`.npz`) or a COCO
  ``.json`` of a detection set and its images (:mod:`.coco`): a GroupData in memory;
- a ``.csv`` image manifest (:mod:`.manifest`), a torch Dataset, a DataLoader or another
  re-iterable yielding ``x``, ``(x, y)`` or ``(x, y, group)``: a :class:`~.stream.DataStream`,
  whose x is read batch by batch (:mod:`.stream`). A DataLoader yields batches; another iterable
  yields batches when its first element's y is 1-D with x's length, else samples;
- a DataStream: itself.

``groups`` (:mod:`.groups`: an array, a function ``(index, sample) -> group`` or
:class:`~.groups.GroupsFromCSV`) gives the groups when the samples do not carry them (and replaces
them when they do); ``transform`` (:mod:`.transform`) is applied to x. Labels are optional: a
stage that needs them says so. Bad input raises one :class:`DataError` whose message starts with
the file (or source) and names the field or the first bad sample.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate, default_convert

from fqexport.errors import ConfigError, DataError

from .checks import validate, validate_group_data
from .coco import load_coco
from .dataset import dataset_groups, to_numpy
from .group_data import GroupData
from .groups import call_group_function, groups_up_front
from .manifest import ManifestDataset, read_manifest_rows
from .npz import load_npz
from .dataset_stream import dataset_stream
from .iterable_stream import iterable_stream
from .stream import DataStream, in_memory_stream, npz_stream
from .transform import apply_transform

log = logging.getLogger(__name__)

MSG_UNSUPPORTED = (
    "cannot load data from a {kind}; give a GroupData, an .npz or .csv path, or a torch Dataset, "
    "DataLoader or iterable yielding x, (x, y) or (x, y, group)"
)
MSG_SUFFIX = (
    "{source}: unsupported data file type {suffix!r}; give an .npz (arrays x, y, group) or a .csv "
    "manifest (path,label,group), or a COCO .json of a detection set"
)
MSG_ONE_SHOT = (
    "{source}: an iterator can be read only once, and the data is read in several passes; give a "
    "re-iterable (a list, a Dataset, a DataLoader, an IterableDataset)"
)
MSG_RAW_IMAGES = (
    "%s: images as CHW float in [0, 1], no resize, no normalisation; a model trained on normalised or "
    "resized inputs needs load_data(..., transform=...)"
)
MSG_SHUFFLED = (
    "{source}: a DataLoader with shuffle=True and its own collate_fn yields its samples in another order "
    "every pass, and the data is read in several passes; give shuffle=False (with the default collate_fn "
    "its dataset is read by index, and shuffling does not matter)"
)
MSG_RANDOM_DRAW = (
    "{source}: its sampler ({sampler}) draws another set of samples every pass, and the data is read in "
    "several passes; give the samples to use as a fixed set (a Subset of the dataset, or "
    "SubsetRandomSampler(indices))"
)
MSG_REORDERED = (
    "{source}: with its own collate_fn, a DataLoader is read as it yields its batches, in several passes, but "
    "its sampler ({sampler}) yields the samples in another order (or another set) every pass; give a sampler "
    "with a fixed order (e.g. a list of indices), or the default collate_fn (the dataset is then read by index)"
)
MSG_LOADED = "load_data: {source} is already loaded; give groups= and transform= when it is first loaded"
# Samples per call of a transform on in-memory data.
_TRANSFORM_BATCH = 256


def load_data(source: Any, groups: Any = None, transform: Callable[[torch.Tensor], Any] | None = None, *,
              num_workers: int = 0) -> GroupData | DataStream:
    """Group-labeled data from ``source`` (see the module docstring): a GroupData in memory for
    a GroupData or an ``.npz`` path, else a DataStream. ``num_workers``: DataLoader worker
    processes that read a Dataset's or a CSV manifest's items (0: in this process)."""
    if isinstance(source, DataStream):
        if groups is not None or transform is not None:
            raise ConfigError(MSG_LOADED.format(source=source.source))
        return source
    if isinstance(source, GroupData):
        return _with_options(validate(source), groups, transform)
    if isinstance(source, (str, os.PathLike)):
        suffix = Path(source).suffix.lower()
        if suffix == ".npz":
            return _with_options(load_npz(source), groups, transform)
        if suffix == ".json":  # COCO: boxes, images beside it, a group per image (or groups=)
            return _with_options(load_coco(source, groups), None, transform)
        if suffix == ".csv":
            rows, folder, name = read_manifest_rows(source)
            if transform is None:
                log.info(MSG_RAW_IMAGES, name)
            return dataset_stream(ManifestDataset(rows, folder, name, groups_given=groups is not None), name, groups,
                                  transform, num_workers)
        raise DataError(MSG_SUFFIX.format(source=source, suffix=suffix or "(no suffix)"))
    return _stream_of(source, groups, transform, num_workers)


def is_npz_path(source: Any) -> bool:
    """Whether ``source`` is the path of an ``.npz`` file (what :func:`open_stream` memory-maps)."""
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz"


def read_data(source: Any) -> GroupData | DataStream:
    """:func:`load_data`'s data, an ``.npz`` path memory-mapped (:func:`open_stream`): only the
    samples a stage reads come into memory (``compress``'s draw, ``validate``'s batches, the
    search's held-in and held-out parts)."""
    return open_stream(source) if is_npz_path(source) else load_data(source)


def open_stream(source: Any, groups: Any = None, transform: Callable[[torch.Tensor], Any] | None = None,
                num_workers: int = 0) -> DataStream:
    """``load_data``'s data as a DataStream always (fine-tuning reads its training data so): a
    GroupData is wrapped, an ``.npz`` (without groups or transform) memory-mapped, not read."""
    if is_npz_path(source) and groups is None and transform is None:
        return npz_stream(Path(source))
    data = load_data(source, groups, transform, num_workers=num_workers)
    return data if isinstance(data, DataStream) else in_memory_stream(data)


def _stream_of(source: Any, groups: Any, transform: Callable | None, num_workers: int) -> DataStream:
    """A stream over a Dataset, a DataLoader or a re-iterable (module docstring of :mod:`.stream`)."""
    if isinstance(source, (dict, str, bytes, np.ndarray, torch.Tensor)):
        raise DataError(MSG_UNSUPPORTED.format(kind=type(source).__name__))
    if isinstance(source, DataLoader):
        ds = source.dataset
        items = source.collate_fn in (default_collate, default_convert)
        name = f"<DataLoader of {type(ds).__name__}>"
        if not isinstance(ds, IterableDataset) and items:
            return dataset_stream(ds, name, groups, transform, num_workers or source.num_workers,
                                  indices=lambda n: _loader_indices(source, name, n))
        if isinstance(source.sampler, RandomSampler):
            raise DataError(MSG_SHUFFLED.format(source=name))
        # read batch by batch as it yields them: the same samples in the same order on every pass,
        # each named by its dataset index
        order = None if isinstance(ds, IterableDataset) else _read_order(source, name, len(ds))
        # batch_size=None: the loader passes its dataset's elements on, which may be batches already
        batched = source.batch_sampler is not None or source.batch_size is not None or _yields_batches(source)
        return iterable_stream(source, name, batched, groups, transform, dataset=None if order is None else ds,
                               order=order)
    name = f"<{type(source).__name__}>"
    if isinstance(source, IterableDataset):  # samples or batches, by its first element as any iterable's
        return iterable_stream(source, name, _yields_batches(source), groups, transform)
    if isinstance(source, (list, tuple)) and _yields_batches(source):  # a list of batches, like any iterable's
        return iterable_stream(source, name, True, groups, transform)
    if isinstance(source, (Dataset, list, tuple)):
        return dataset_stream(source, name, groups, transform, num_workers)
    if hasattr(source, "__iter__"):
        if iter(source) is source:
            raise DataError(MSG_ONE_SHOT.format(source=name))
        return iterable_stream(source, name, _yields_batches(source), groups, transform)
    raise DataError(MSG_UNSUPPORTED.format(kind=type(source).__name__))


def _loader_indices(loader: DataLoader, name: str, n: int) -> list[int] | None:
    """The indices of its ``n``-sample map-style dataset that a DataLoader reads (its sampler's, or
    its batch sampler's: one of the user's own, or one that drops a last partial batch), in data
    order; None when it reads every index once (sequential or shuffled): the dataset is then
    read by index as it is. A sampler that draws another set each pass is a DataError."""
    sampler, batches = loader.sampler, loader.batch_sampler
    own_batches = batches is not None and getattr(batches, "sampler", None) is not sampler
    if own_batches or (batches is not None and getattr(batches, "drop_last", False)):
        sampler = batches  # its batches name the indices
    elif isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == n):
        return None
    first = _sampled(sampler)
    if first != _sampled(sampler):
        raise DataError(MSG_RANDOM_DRAW.format(source=name, sampler=type(sampler).__name__))
    return None if first == list(range(n)) else first


def _read_order(loader: DataLoader, name: str, n: int) -> list[int] | None:
    """The dataset indices a DataLoader over an ``n``-sample map-style dataset yields, in the order
    it yields them (None: 0, 1, ..., n − 1); a DataError when another pass yields another order."""
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if isinstance(sampler, SequentialSampler):
        return None
    order = _yielded(sampler)
    if order != _yielded(sampler):
        raise DataError(MSG_REORDERED.format(source=name, sampler=type(getattr(sampler, "sampler", sampler)).__name__))
    return None if order == list(range(n)) else order


def _yielded(sampler: Any) -> list[int]:
    """The indices one pass of a sampler (or a batch sampler: its batches, lists, arrays or
    tensors) yields, in its order."""
    return [int(i) for item in sampler for i in np.asarray(item).reshape(-1)]


def _sampled(sampler: Any) -> list[int]:
    """The indices one pass of a sampler (or a batch sampler: its batches, lists, arrays or
    tensors) yields, sorted."""
    return sorted(_yielded(sampler))


def _yields_batches(iterable: Any) -> bool:
    """True when the first element is a batch ``(x [B, ...], y [B], ...)``: its y is 1-D with x's
    length, and longer than 1 (a sample's label is one number, often wrapped as ``tensor([y])``
    beside a one-channel ``x [1, H, W]``, which a batch of one would look like). An x-only
    iterable yields samples."""
    first = next(iter(iterable), None)
    if not isinstance(first, (tuple, list)) or len(first) < 2 or isinstance(first[1], (str, bytes)):
        return False
    y = to_numpy(first[1]) if not isinstance(first[1], (list, tuple)) else np.asarray(first[1], dtype=object)
    if isinstance(first[0], (tuple, list, dict)):  # several inputs: refused by name (dataset.x_array) either way
        return y.ndim == 1 and len(y) > 1
    return y.ndim == 1 and len(y) > 1 and np.ndim(first[0]) >= 1 and len(y) == len(first[0])


def _with_options(data: GroupData, groups: Any, transform: Callable | None) -> GroupData:
    """In-memory ``data`` with ``transform`` applied to x (a batch at a time) and its groups
    replaced by ``groups`` (a function is called with ``(index, (x, y, group name))``)."""
    if groups is None and transform is None:
        return data
    n, source = len(data), data.source
    x = data.x
    if transform is not None:
        x = np.concatenate([apply_transform(transform, data.x[s:s + _TRANSFORM_BATCH], s, source)
                            for s in range(0, n, _TRANSFORM_BATCH)])
    group, names = data.group, data.group_names
    if groups is not None:
        names = None
        group = groups_up_front(groups, n, source, lambda: None)
        if group is None:
            group = dataset_groups([
                call_group_function(groups, i, (data.x[i], None if data.y is None else data.y[i],
                                                 data.group_names[data.group[i]]), source)
                for i in range(n)], source)
    return validate_group_data(x, data.y, group, names, source, data.annotations)
