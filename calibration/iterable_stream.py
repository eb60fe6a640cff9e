"""A stream over a re-iterable that cannot be indexed: :func:`iterable_stream`.

An IterableDataset, a DataLoader with its own ``collate_fn`` (its batches are split into samples),
or any other re-iterable yielding samples or batches (:mod:`.dataset`). One light pass learns the
labels, the groups and x's shape; then each read is one pass that keeps only the samples asked for
and yields each index list as soon as it is complete. The source must yield the same samples in
the same order on every pass (:data:`MSG_PASS_SHORT`; the labels and groups are checked too).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fqexport.errors import DataError

from .checks import check_x_values
from .dataset import FIELDS, MSG_ITEM_FIELDS, MSG_ITEM_SHAPE, batch_items, dataset_item
from .dataset_stream import MSG_EMPTY, MSG_ITEM_READ, sample_paths
from .groups import call_group_function, groups_up_front, is_group_function
from .stream import MSG_ITEM_DTYPE, DataStream, FirstRead
from .transform import apply_transform

log = logging.getLogger(__name__)

MSG_PASS_SHORT = (
    "{source}: this pass yielded {got} samples but the first pass yielded {n}; an iterable must yield "
    "the same samples in the same order every time"
)


class _Walk:
    """One pass over a re-iterable source: its samples in order as ``(position, x or None, y,
    group, item)``, x transformed and checked; ``want`` (positions) limits the x kept."""

    def __init__(self, iterable: Any, source: str, batched: bool, transform: Callable | None) -> None:
        self.iterable, self.source, self.batched, self.transform = iterable, source, batched, transform

    def _elements(self, position: Callable[[], int]) -> Iterator[Any]:
        """The source's elements; its own failure (a shard that cannot be read) as a DataError
        naming the sample it reached (``position()``: the first of a batch)."""
        elements = iter(self.iterable)
        while True:
            try:
                element = next(elements)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as err:
                raise DataError(MSG_ITEM_READ.format(source=self.source, index=position(), kind=type(err).__name__,
                                                     err=err)) from err
            yield element

    def samples(self, want: set[int] | None) -> Iterator[tuple[int, np.ndarray | None, Any, Any, int, Any]]:
        pos = 0
        for element in self._elements(lambda: pos):
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
                    row = x[k] if fields == 1 else (x[k],) + ((ys[k],) if ys is not None else ()) + (
                        (gs[k],) if gs is not None else ())  # the sample as an item of its own
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

    def __init__(self, walk: _Walk, first: FirstRead, shape: tuple[int, ...], n: int) -> None:
        self.walk, self.first, self.shape, self.n = walk, first, shape, n

    def read(self, index_lists: Iterable[np.ndarray], num_workers: int) -> Iterator[np.ndarray]:
        lists = [np.asarray(idx, dtype=np.int64) for idx in index_lists]
        needed = Counter(int(i) for idx in lists for i in idx)
        held: dict[int, np.ndarray] = {}
        k = 0
        seen = 0
        source = self.first.source
        for pos, x, y, g, fields, _ in self.walk.samples(set(needed)):
            seen = pos + 1
            if pos not in needed:
                continue
            if x.shape != self.shape:
                raise DataError(f"{source}: " + MSG_ITEM_SHAPE.format(index=pos, shape=x.shape, first=self.shape))
            self.first.check(np.array([pos]), str(x.dtype), None if y is None else [y], None if g is None else [g])
            held[pos] = x
            while k < len(lists) and all(int(i) in held for i in lists[k]):
                yield np.stack([held[int(i)] for i in lists[k]]) if len(lists[k]) else \
                    np.zeros((0, *self.shape), dtype=self.first.dtype)
                for i in lists[k]:
                    needed[int(i)] -= 1
                    if needed[int(i)] == 0:
                        held.pop(int(i), None)
                k += 1
            if k == len(lists):
                return
        while k < len(lists) and len(lists[k]) == 0:
            yield np.zeros((0, *self.shape), dtype=self.first.dtype)
            k += 1
        if k < len(lists):
            raise DataError(MSG_PASS_SHORT.format(source=source, got=seen, n=self.n))


def iterable_stream(iterable: Any, source: str, batched: bool, groups: Any = None,
                    transform: Callable | None = None, *, dataset: Any = None,
                    order: Sequence[int] | None = None) -> DataStream:
    """A stream over a re-iterable of items (or of batches when ``batched``), read in passes
    (module docstring). ``dataset``, ``order``: a DataLoader's dataset and the indices of it that
    the loader yields, in that order (its sampler's): a ``groups`` array or CSV column is then
    given per dataset sample, and a group function gets each sample's dataset index."""
    walk = _Walk(iterable, source, batched, transform)
    group_fn = groups if is_group_function(groups) else None
    index_of = (lambda pos: int(order[pos])) if order is not None else (lambda pos: pos)  # noqa: E731
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
        gs.append(call_group_function(group_fn, index_of(pos), item, source) if group_fn is not None else g)
        n = pos + 1
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=source))
    if order is not None:  # per dataset sample, taken in the order the loader yields them
        given = groups_up_front(groups, len(dataset), source, lambda: sample_paths(dataset))
        given = None if given is None else given[np.asarray(order[:n], dtype=np.int64)]
    else:
        given = groups_up_front(groups, n, source, lambda: None)
    first = FirstRead.establish(source, n, shape, dtype, fields, np.asarray(ys) if fields >= 2 else None, given, gs,
                                group_fn, None, groups_from_items=groups is None)
    log.info("%s: read the labels and groups of %d samples (one pass, x not kept)", source, n)
    return DataStream(_IterableX(walk, first, tuple(shape), n), first.y, first.group, first.names, source,
                      tuple(shape))
