"""Reader of torch Datasets (any indexable with ``__len__``) yielding ``(x, y, group)`` items."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .checks import data_error, validate_group_data
from .group_data import GroupData
from .progress import reading_bar

MSG_ITEM_SHAPE = "sample {index}: field 'x' has shape {shape} but sample 0 has {first}; all samples must share a shape"


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _scalar(value: Any, field: str, index: int, source: str) -> Any:
    if isinstance(value, (str, bytes)):
        if field != "group":
            raise data_error(source, f"sample {index}: field '{field}' is the string {value!r}")
        return value.decode() if isinstance(value, bytes) else value
    arr = _to_numpy(value)
    if arr.size != 1:
        raise data_error(
            source, f"sample {index}: field '{field}' must be a single number, got shape {arr.shape}"
        )
    return arr.reshape(()).item()


def dataset_item(item: Any, index: int, source: str) -> tuple[np.ndarray, Any, Any]:
    """One Dataset item ``(x, y, group)`` as ``(x array, y number, group id or name)``."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise data_error(
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
        raise data_error(source, "the dataset has no len(); give an indexable Dataset") from err
    if n == 0:
        raise data_error(source, "the dataset is empty")
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    gs: list[Any] = []
    shape: tuple[int, ...] | None = None
    for i in reading_bar(range(n), n, "reading dataset"):
        try:
            item = dataset[i]
        except Exception as err:  # the dataset's own failure, wrapped with its index
            raise data_error(source, f"sample {i} cannot be read: {type(err).__name__}: {err}") from err
        x, y, g = dataset_item(item, i, source)
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise data_error(source, MSG_ITEM_SHAPE.format(index=i, shape=x.shape, first=shape))
        xs.append(x)
        ys.append(y)
        gs.append(g)
    names = getattr(dataset, "group_names", None)
    return validate_group_data(np.stack(xs), np.asarray(ys), dataset_groups(gs, source), names, source)


def dataset_groups(gs: Sequence[Any], source: str) -> np.ndarray:
    """The groups of a Dataset's items (all names or all ids) as one array."""
    is_name = [isinstance(g, str) for g in gs]
    if any(is_name) and not all(is_name):
        raise data_error(source, "field 'group' mixes names (strings) and ids (numbers)")
    return np.array(gs) if all(is_name) else np.asarray(gs)
