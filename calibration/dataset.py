"""The items of a Dataset or an iterable, and the batches of a DataLoader, as numpy arrays.

An item is ``x`` (a tensor or numpy array), or a tuple/list ``(x,)``, ``(x, y)`` or
``(x, y, group)``: y a class id, group an id or a name (tensors, numpy values or Python numbers).
A batch (what a DataLoader yields) is the same with every field batch-first: ``x [B, ...]``,
``y [B]``, ``group [B]`` (or a list of names, as ``default_collate`` makes them). A tuple item is
always read as fields, never as an x of numbers: give an x-only sample as a tensor or array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .checks import data_error

MSG_ITEM_SHAPE = "sample {index}: field 'x' has shape {shape} but sample 0 has {first}; all samples must share a shape"
MSG_ITEM_KIND = (
    "sample {index} must be x (a tensor or array), (x, y) or (x, y, group), got {kind}"
)
MSG_MULTI_INPUT = (
    "{where}: field 'x' is a {kind} of {n} tensors (a model with several inputs); fqexport feeds the model one "
    "tensor: wrap the model in a module whose forward takes one tensor (e.g. the inputs flattened and "
    "concatenated, split again in forward)"
)
MSG_ITEM_FIELDS = "sample {index} has the fields {got} but sample 0 has {first}; every sample must have the same fields"
MSG_BATCH_LENGTH = "batch of samples {first}..: field '{field}' has {got} entries but x has {n}"
FIELDS = {1: "(x)", 2: "(x, y)", 3: "(x, y, group)"}


@dataclass(frozen=True)
class Item:
    """One sample: x as an array, y a number or None, group an id, a name or None; ``fields``
    counts what the item held (1: x, 2: x and y, 3: x, y and group)."""

    x: np.ndarray
    y: Any
    group: Any
    fields: int


MSG_DATASET_MASKS = ("; a segmenter's per-pixel masks [H, W] are not read from a Dataset's items: save the data as "
                     "an .npz with fields x, group and masks (docs/tasks.md)")


def to_numpy(value: Any) -> np.ndarray:
    """``value`` as a numpy array; a tensor numpy has no dtype for (bfloat16, float8) as float32."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:
            return value.float().numpy()
    return np.asarray(value)


def x_array(value: Any, where: str, source: str) -> np.ndarray:
    """Field x of a sample or batch (``where`` names it) as an array; several tensors (a model
    with several inputs) are a DataError (:data:`MSG_MULTI_INPUT`)."""
    if isinstance(value, (tuple, list, dict)) and any(
            isinstance(v, (torch.Tensor, np.ndarray)) for v in (value.values() if isinstance(value, dict) else value)):
        raise data_error(source, MSG_MULTI_INPUT.format(where=where, kind=type(value).__name__, n=len(value)))
    return to_numpy(value)


def _scalar(value: Any, field: str, index: int, source: str) -> Any:
    if isinstance(value, (str, bytes)):
        if field != "group":
            raise data_error(source, f"sample {index}: field '{field}' is the string {value!r}")
        return value.decode() if isinstance(value, bytes) else value
    arr = to_numpy(value)
    if arr.size != 1:
        masks = MSG_DATASET_MASKS if field == "y" and arr.ndim == 2 else ""
        raise data_error(
            source, f"sample {index}: field '{field}' must be a single number, got shape {arr.shape}{masks}"
        )
    return arr.reshape(()).item()


def _kind(item: Any) -> str:
    if isinstance(item, (tuple, list)):
        return f"{type(item).__name__} of length {len(item)}"
    return type(item).__name__


def dataset_item(item: Any, index: int, source: str) -> Item:
    """One item (see the module docstring) as an :class:`Item`."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return Item(to_numpy(item), None, None, 1)
    if not isinstance(item, (tuple, list)) or not 1 <= len(item) <= 3:
        raise data_error(source, MSG_ITEM_KIND.format(index=index, kind=_kind(item)))
    y = _scalar(item[1], "y", index, source) if len(item) >= 2 else None
    g = _scalar(item[2], "group", index, source) if len(item) == 3 else None
    return Item(x_array(item[0], f"sample {index}", source), y, g, len(item))


def check_fields(item: Item, first: int, index: int, source: str) -> None:
    """DataError unless ``item`` has the fields of sample 0 (``first``)."""
    if item.fields != first:
        raise data_error(source, MSG_ITEM_FIELDS.format(index=index, got=FIELDS[item.fields], first=FIELDS[first]))


def _column(value: Any, field: str, n: int, first: int, source: str) -> list[Any]:
    """A batch's y or group column as a list of ``n`` plain values."""
    if isinstance(value, (list, tuple)):
        values = [_scalar(v, field, first + i, source) for i, v in enumerate(value)]
    else:
        arr = to_numpy(value).reshape(-1)
        values = arr.tolist()
        if arr.dtype.kind in "SU":
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
    if len(values) != n:
        raise data_error(source, MSG_BATCH_LENGTH.format(first=first, field=field, got=len(values), n=n))
    return values


def batch_items(batch: Any, first: int, source: str) -> tuple[np.ndarray, list[Any] | None, list[Any] | None, int]:
    """A DataLoader batch (see the module docstring) as ``(x [B, ...], y list or None, group list
    or None, fields)``; ``first`` is the position of its first sample (for the messages)."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        x = to_numpy(batch)
        return x, None, None, 1
    if not isinstance(batch, (tuple, list)) or not 1 <= len(batch) <= 3:
        raise data_error(source, MSG_ITEM_KIND.format(index=first, kind=_kind(batch)))
    x = x_array(batch[0], f"batch of samples {first}..", source)
    if x.ndim < 1:
        raise data_error(source, f"batch of samples {first}..: field 'x' must be batch-first [B, ...], got a scalar")
    n = x.shape[0]
    y = _column(batch[1], "y", n, first, source) if len(batch) >= 2 else None
    g = _column(batch[2], "group", n, first, source) if len(batch) == 3 else None
    return x, y, g, len(batch)


def dataset_groups(gs: Sequence[Any], source: str) -> np.ndarray:
    """The groups of a Dataset's items (all names or all ids) as one array."""
    is_name = [isinstance(g, str) for g in gs]
    if any(is_name) and not all(is_name):
        raise data_error(source, "field 'group' mixes names (strings) and ids (numbers)")
    return np.array(gs) if all(is_name) else np.asarray(gs)
