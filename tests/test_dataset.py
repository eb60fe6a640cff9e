"""Tests of calibration/dataset.py: the items of a torch Dataset (or a list) — x, (x, y) or
(x, y, group) — and the batches of a DataLoader, read through ``load_data`` (a stream) and ``take``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.dataset import batch_items, dataset_item
from fqexport.calibration.readers import load_data
from fqexport.errors import DataError


class _Tuples(torch.utils.data.Dataset):
    def __init__(self, items, group_names=None):
        self.items = items
        if group_names is not None:
            self.group_names = group_names

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _stacked(items, **kw):
    return load_data(items, **kw).take()


def test_dataset_mixed_item_types():
    items = [
        (torch.full((1, 2, 2), 0.5), torch.tensor(1), torch.tensor(0)),
        (np.ones((1, 2, 2)), np.int64(2), 1),
        ([[[0.0, 1.0], [2.0, 3.0]]], 0, np.array(1)),
    ]
    stream = load_data(_Tuples(items, group_names=["a", "b"]))
    data = stream.take()
    assert data.x.shape == (3, 1, 2, 2) and data.x.dtype == np.float32
    assert data.x[2].ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert data.y.tolist() == [1, 2, 0]
    assert data.group.tolist() == [0, 1, 1]
    assert data.group_names == ("a", "b")
    assert data.source == "<_Tuples>"


def test_dataset_string_groups_and_plain_list():
    items = [(np.zeros(3), 0, "young"), (np.ones(3), 1, "old"), (np.ones(3), 1, "young")]
    data = _stacked(items)
    assert data.group_names == ("old", "young")
    assert data.group.tolist() == [1, 0, 1]


def test_dataset_errors():
    with pytest.raises(DataError, match=r"<list>: sample 1: field 'x' has shape \(4,\) but sample 0 has \(3,\)"):
        _stacked([(np.zeros(3), 0, 0), (np.zeros(4), 0, 0)])
    with pytest.raises(DataError, match=r"sample 0 must be x \(a tensor or array\), \(x, y\) or \(x, y, group\), "
                                        r"got tuple of length 4"):
        _stacked([(np.zeros(3), 0, 0, 0)])
    with pytest.raises(DataError, match=r"sample 1 has the fields \(x, y\) but sample 0 has \(x, y, group\)"):
        _stacked([(np.zeros(3), 0, 0), (np.zeros(3), 0)])
    with pytest.raises(DataError, match="the dataset is empty"):
        _stacked([])
    with pytest.raises(DataError, match=r"sample 0: field 'y' must be a single number, got shape \(2,\)"):
        _stacked([(np.zeros(3), np.array([0, 1]), 0)])
    with pytest.raises(DataError, match="field 'x' contains NaN or Inf \\(1 values\\)"):
        _stacked([(np.array([0.0, np.nan]), 0, 0)])
    with pytest.raises(DataError, match="mixes names"):
        _stacked([(np.zeros(3), 0, "a"), (np.zeros(3), 0, 1)])

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise KeyError(i)

    with pytest.raises(DataError, match="sample 0 cannot be read: KeyError"):
        _stacked(Broken())


def test_item_forms():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    item = dataset_item(torch.from_numpy(x), 4, "s")
    assert item.fields == 1 and item.y is None and item.group is None and item.x.tolist() == x.tolist()
    item = dataset_item((x, torch.tensor(2)), 4, "s")
    assert (item.fields, item.y, item.group) == (2, 2, None)
    item = dataset_item([x, 1, b"dark"], 4, "s")
    assert (item.fields, item.y, item.group) == (3, 1, "dark")
    with pytest.raises(DataError, match=r"^s: sample 4 must be x .*, got dict$"):
        dataset_item({"x": x}, 4, "s")
    with pytest.raises(DataError, match=r"^s: sample 4: field 'y' is the string 'cat'$"):
        dataset_item((x, "cat"), 4, "s")


def test_batch_forms():
    xb = torch.zeros(3, 2)
    x, y, g, fields = batch_items(xb, 10, "s")
    assert x.shape == (3, 2) and y is None and g is None and fields == 1
    x, y, g, fields = batch_items([xb, torch.tensor([0, 1, 0]), ("a", "b", "a")], 10, "s")
    assert y == [0, 1, 0] and g == ["a", "b", "a"] and fields == 3
    with pytest.raises(DataError, match=r"^s: batch of samples 10\.\.: field 'y' has 2 entries but x has 3$"):
        batch_items([xb, torch.tensor([0, 1])], 10, "s")


def test_bfloat16_samples_and_transforms_read_as_float32():
    """numpy has no bfloat16: a Dataset or transform giving it was a raw TypeError (survey 26)."""
    x = torch.randn(6, 2, 3)
    items = [(x[i].bfloat16(), i % 2, i % 2) for i in range(6)]
    data = _stacked(items)
    assert data.x.dtype == np.float32
    np.testing.assert_array_equal(data.x, x.bfloat16().float().numpy())
    moved = _stacked(items, transform=lambda t: t.bfloat16() * 2)
    np.testing.assert_array_equal(moved.x, (x.bfloat16().float() * 2).bfloat16().float().numpy())


def test_several_inputs_per_sample_are_refused_by_name():
    img, meta = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    with pytest.raises(DataError, match=r"sample 0: field 'x' is a tuple of 2 tensors \(a model with several "
                                        r"inputs\); fqexport feeds the model one tensor: wrap the model"):
        load_data([((img[i], meta[i]), 0, 0) for i in range(4)])
    with pytest.raises(DataError, match=r"batch of samples 0\.\.: field 'x' is a tuple of 2 tensors"):
        _stacked([((img, meta), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))])
