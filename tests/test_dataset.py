"""Tests of calibration/dataset.py: stacking a torch Dataset (or a list) of (x, y, group) items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.dataset import from_dataset
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


def test_from_dataset_mixed_item_types():
    items = [
        (torch.full((1, 2, 2), 0.5), torch.tensor(1), torch.tensor(0)),
        (np.ones((1, 2, 2)), np.int64(2), 1),
        ([[[0.0, 1.0], [2.0, 3.0]]], 0, np.array(1)),
    ]
    data = from_dataset(_Tuples(items, group_names=["a", "b"]), source="toy")
    assert data.x.shape == (3, 1, 2, 2) and data.x.dtype == np.float32
    assert data.x[2].ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert data.y.tolist() == [1, 2, 0]
    assert data.group.tolist() == [0, 1, 1]
    assert data.group_names == ("a", "b")
    assert data.source == "toy"


def test_from_dataset_string_groups_and_plain_list():
    items = [(np.zeros(3), 0, "young"), (np.ones(3), 1, "old"), (np.ones(3), 1, "young")]
    data = from_dataset(items)
    assert data.group_names == ("old", "young")
    assert data.group.tolist() == [1, 0, 1]


def test_from_dataset_errors():
    with pytest.raises(DataError, match=r"<Dataset>: sample 1: field 'x' has shape \(4,\) but sample 0 has \(3,\)"):
        from_dataset([(np.zeros(3), 0, 0), (np.zeros(4), 0, 0)])
    with pytest.raises(DataError, match=r"sample 0 must be a tuple \(x, y, group\), got tuple of length 2"):
        from_dataset([(np.zeros(3), 0)])
    with pytest.raises(DataError, match="the dataset is empty"):
        from_dataset([])
    with pytest.raises(DataError, match=r"sample 0: field 'y' must be a single number, got shape \(2,\)"):
        from_dataset([(np.zeros(3), np.array([0, 1]), 0)])
    with pytest.raises(DataError, match="field 'x' contains NaN or Inf \\(1 values\\)"):
        from_dataset([(np.array([0.0, np.nan]), 0, 0)])
    with pytest.raises(DataError, match="mixes names"):
        from_dataset([(np.zeros(3), 0, "a"), (np.zeros(3), 0, 1)])

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise KeyError(i)

    with pytest.raises(DataError, match="sample 0 cannot be read: KeyError"):
        from_dataset(Broken())
