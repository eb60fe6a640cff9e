"""Tests of calibration/readers.py: load_data's dispatch over GroupData, .npz, .csv and Datasets."""

from __future__ import annotations

import numpy as np
import pytest
import npz_arrays
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.errors import DataError


class _Tuples(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_load_data_dispatch(tmp_path):
    x, y, group = npz_arrays.arrays()
    npz = npz_arrays.save(tmp_path, x=x, y=y, group=group)
    assert len(load_data(npz)) == 6
    assert len(load_data(str(npz))) == 6
    gd = GroupData(x.astype(np.float32), y, group, ("a", "b"), "mem")
    assert load_data(gd).group_names == ("a", "b")
    ds = _Tuples([(np.zeros(2), 0, 0), (np.ones(2), 1, 1)])
    loaded = load_data(ds)
    assert loaded.take().x.shape == (2, 2) and loaded.source == "<_Tuples>"
    with pytest.raises(DataError, match=r"d.txt: unsupported data file type '.txt'"):
        load_data(tmp_path / "d.txt")
    with pytest.raises(DataError, match="cannot load data from a dict"):
        load_data({"x": x})
    bad = GroupData(np.full((2, 1), np.nan, np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64), ("a",), "mem")
    with pytest.raises(DataError, match="mem: field 'x' contains NaN or Inf \\(2 values\\)"):
        load_data(bad)


def test_group_data_prints_a_summary_not_its_arrays():
    data = GroupData(np.zeros((5, 3, 4, 4), np.float32), np.arange(5) % 2, np.array([0, 0, 0, 1, 1]),
                     ("light", "dark"), "calib.npz")
    assert repr(data) == "GroupData(calib.npz: 5 samples of (3, 4, 4), labels, groups {'light': 3, 'dark': 2})"
    assert "no labels" in repr(GroupData(data.x, None, data.group, data.group_names))
