"""Tests of calibration/readers.py: load_data's dispatch over GroupData, .npz, .csv and Datasets."""

from __future__ import annotations

import numpy as np
import pytest
import npz_arrays
import torch

from fqexport.calibration.annotations import Boxes, Masks
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
    # detection / segmentation data holds its boxes or masks, not "no labels" (survey 55)
    boxes = GroupData(data.x, None, data.group, data.group_names, "det.npz",
                      Boxes(np.array([[0.0, 0.0, 2.0, 2.0]] * 3, np.float32), np.zeros(3, np.int64), np.array([0, 0, 4])))
    assert repr(boxes) == "GroupData(det.npz: 5 samples of (3, 4, 4), 3 boxes, groups {'light': 3, 'dark': 2})"
    masks = GroupData(data.x, None, data.group, data.group_names, "seg.npz", Masks(np.zeros((5, 4, 4), np.int64)))
    assert repr(masks) == "GroupData(seg.npz: 5 samples of (3, 4, 4), 5 masks, groups {'light': 3, 'dark': 2})"
    assert "no labels" in repr(GroupData(data.x, None, data.group, data.group_names))


def _loader_data(loader) -> tuple[np.ndarray, str]:
    """The first feature of every sample load_data reads from ``loader``, and the source name."""
    data = load_data(loader).take()
    return data.x[:, 0].astype(int), data.source


def test_a_dataloader_is_read_through_its_sampler():
    """Only the samples a DataLoader's sampler (or batch sampler) reads are the data (the survey:
    a SubsetRandomSampler's 100 of 300 samples were validated as all 300)."""
    from torch.utils.data import BatchSampler, DataLoader, SubsetRandomSampler, WeightedRandomSampler

    ds = _Tuples([(np.full(2, i, np.float32), i % 3, i % 2) for i in range(30)])
    picked = [25, 3, 7, 11, 4]
    values, source = _loader_data(DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler(picked)))
    assert values.tolist() == sorted(picked) and source == "<DataLoader of _Tuples>"
    assert _loader_data(DataLoader(ds, batch_size=4, sampler=picked))[0].tolist() == sorted(picked)
    batches = BatchSampler(SubsetRandomSampler(picked), batch_size=2, drop_last=False)
    assert _loader_data(DataLoader(ds, batch_sampler=batches))[0].tolist() == sorted(picked)
    # every sample once, in order or shuffled: the dataset as it is
    assert _loader_data(DataLoader(ds, batch_size=4, shuffle=True))[0].tolist() == list(range(30))
    # the last partial batch dropped: 28 samples, in order
    assert _loader_data(DataLoader(ds, batch_size=4, drop_last=True))[0].tolist() == list(range(28))
    with pytest.raises(DataError, match=r"its sampler \(WeightedRandomSampler\) draws another set of samples every pass"):
        load_data(DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(np.ones(30), 10)))
    with pytest.raises(DataError, match=r"its sampler \(BatchSampler\) draws another set"):
        load_data(DataLoader(ds, batch_size=8, shuffle=True, drop_last=True))  # 6 of 30 dropped at random


class _Named(torch.utils.data.Dataset):
    group_names = ("light", "dark")

    def __len__(self):
        return 30

    def __getitem__(self, i):
        if i == 25:
            raise OSError("unreadable")
        return np.full(2, i, np.float32), i % 3, i % 2


def test_a_sampler_keeps_the_dataset_its_indices_and_names():
    """Read through a sampler, a sample is still the dataset's: its group names, a groups array
    per dataset sample, a group function and an error all see the dataset's own index (review)."""
    from torch.utils.data import DataLoader, SubsetRandomSampler

    picked = [11, 3, 7, 4]
    loader = lambda: DataLoader(_Named(), batch_size=2, sampler=SubsetRandomSampler(picked))  # noqa: E731
    data = load_data(loader()).take()
    assert data.group_names == ("light", "dark") and data.group.tolist() == [1, 0, 1, 1]  # samples 3, 4, 7, 11
    by_array = load_data(loader(), groups=np.array(["a" if i < 5 else "b" for i in range(30)])).take()
    assert [by_array.group_names[g] for g in by_array.group] == ["a", "a", "b", "b"]
    seen = []
    by_function = load_data(loader(), groups=lambda i, sample: seen.append(i) or ("odd" if i % 2 else "even")).take()
    assert sorted(seen) == [3, 4, 7, 11] and [by_function.group_names[g] for g in by_function.group] == [
        "odd", "even", "odd", "odd"]
    with pytest.raises(DataError, match=r"sample 25 cannot be read: OSError: unreadable"):
        load_data(DataLoader(_Named(), batch_size=2, sampler=[3, 25])).take()


def _collate(items):
    """A collate_fn of the user's own (the loader is then read as it yields its batches)."""
    x, y, g = zip(*items)
    return torch.from_numpy(np.stack(x)), torch.tensor(y), list(g)


def test_a_loader_with_its_own_collate_reads_its_sampler_in_a_fixed_order():
    """With its own collate_fn, a DataLoader is read as it yields its batches: a sampler that
    reorders every pass is refused (survey 17: groups were paired with other samples' images),
    and a groups array per dataset sample is taken at the indices the sampler yields."""
    from torch.utils.data import DataLoader, SubsetRandomSampler

    ds = _Tuples([(np.full(2, i, np.float32), i % 3, "x") for i in range(30)])
    with pytest.raises(DataError, match=r"its sampler \(SubsetRandomSampler\) yields the samples in another order"):
        load_data(DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(10, 20)), collate_fn=_collate))
    order = [21, 4, 17, 8]
    data = load_data(DataLoader(ds, batch_size=2, sampler=order, collate_fn=_collate),
                     groups=np.array(["low" if i < 10 else "high" for i in range(30)])).take()
    assert data.x[:, 0].astype(int).tolist() == order
    assert [data.group_names[g] for g in data.group] == ["high", "low", "high", "low"]


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        import os

        return np.full(2, os.getpid(), np.float32), i % 2, i % 2


def test_a_dataloaders_workers_read_every_pass():
    """A DataLoader's num_workers read the samples of every pass, not only the first (survey 17:
    compress and validate decoded every image in the main process)."""
    import os

    from torch.utils.data import DataLoader

    data = load_data(DataLoader(_Pids(), batch_size=4, num_workers=2)).take()
    assert (data.x[:, 0] != np.float32(os.getpid())).all()
