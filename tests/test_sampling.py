"""Tests of calibration/sampling.py: balanced draws and stratified hold-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import (
    balanced_allocation,
    group_balanced_subset,
    split_holdout,
    stratified_folds,
)
from fqexport.errors import ConfigError


def _data(counts=(90, 10, 3)) -> GroupData:
    group = np.concatenate([np.full(c, g) for g, c in enumerate(counts)]).astype(np.int64)
    n = len(group)
    x = np.arange(n, dtype=np.float32)[:, None]  # x encodes the original index
    y = (np.arange(n) % 2).astype(np.int64)
    return GroupData(x, y, group, tuple(f"g{i}" for i in range(len(counts))), "toy")


def test_balanced_allocation_water_filling():
    # 30 over 3 groups: g2 gives its 3, then 27 over two: g1 gives 10 (< 13), g0 takes 17
    assert balanced_allocation(np.array([90, 10, 3]), 30).tolist() == [17, 10, 3]
    assert balanced_allocation(np.array([90, 10, 3]), 9).tolist() == [3, 3, 3]
    assert balanced_allocation(np.array([50, 50, 50]), 10).tolist() == [3, 3, 4]
    assert balanced_allocation(np.array([90, 10, 3]), 1000).tolist() == [90, 10, 3]
    assert balanced_allocation(np.array([5, 0, 5]), 7).tolist() == [3, 0, 4]


def test_group_balanced_subset_counts_unique_and_deterministic():
    data = _data()
    sub = group_balanced_subset(data, 30, seed=3)
    assert len(sub) == 30
    assert sub.group_counts().tolist() == [17, 10, 3]
    idx = sub.x[:, 0].astype(int)
    assert len(set(idx.tolist())) == 30  # without replacement
    np.testing.assert_array_equal(sub.group, data.group[idx])  # rows stay aligned
    np.testing.assert_array_equal(sub.y, data.y[idx])
    again = group_balanced_subset(data, 30, seed=3)
    np.testing.assert_array_equal(again.x, sub.x)
    other = group_balanced_subset(data, 30, seed=4)
    assert not np.array_equal(other.x, sub.x)
    # order is shuffled, not grouped: groups interleave
    assert not np.all(np.diff(sub.group) >= 0)
    assert sub.group_names == data.group_names and sub.source == "toy"


def test_group_balanced_subset_more_than_available_returns_all_shuffled():
    data = _data((4, 2))
    sub = group_balanced_subset(data, 100, seed=0)
    assert sorted(sub.x[:, 0].astype(int).tolist()) == list(range(6))
    assert sub.group_counts().tolist() == [4, 2]


def test_group_balanced_subset_rejects_bad_n():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            group_balanced_subset(_data(), bad)


def test_split_holdout_stratified():
    data = _data((90, 10, 3, 1))
    kept, hold = split_holdout(data, 0.2, seed=1)
    # round(0.2·c), clamped to [1, c-1] for c >= 2; a single sample stays in kept
    assert hold.group_counts().tolist() == [18, 2, 1, 0]
    assert kept.group_counts().tolist() == [72, 8, 2, 1]
    a, b = kept.x[:, 0].astype(int), hold.x[:, 0].astype(int)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(len(data)))
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)  # original order kept
    kept2, hold2 = split_holdout(data, 0.2, seed=1)
    np.testing.assert_array_equal(hold2.x, hold.x)


def test_split_holdout_keeps_both_sides_for_tiny_groups():
    data = _data((2, 2))
    kept, hold = split_holdout(data, 0.9, seed=0)
    assert kept.group_counts().tolist() == [1, 1] and hold.group_counts().tolist() == [1, 1]
    kept, hold = split_holdout(data, 0.05, seed=0)
    assert hold.group_counts().tolist() == [1, 1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_holdout_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"fraction=.* must be in \(0, 1\)"):
        split_holdout(_data(), fraction)


def test_stratified_folds_cover_every_sample_once_and_spread_groups():
    data = _data((90, 10, 3, 1))
    folds = stratified_folds(data, 4, seed=2)
    assert len(folds) == 4
    every = np.concatenate(folds)
    # disjoint and complete, but for the one-sample group's sample (held in for every fit)
    assert sorted(every.tolist()) == list(range(len(data) - 1))
    assert data.group[len(data) - 1] == 3
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for g, c in enumerate(data.group_counts()[:3]):
        per_fold = [int((data.group[f] == g).sum()) for f in folds]
        assert sum(per_fold) == c and max(per_fold) - min(per_fold) <= 1
    assert all(np.all(np.diff(f) > 0) for f in folds)
    again = stratified_folds(data, 4, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(data, 4, seed=3)))


@pytest.mark.parametrize("k, message", [(1, "k=1 must be an integer >= 2"), (True, "k=True must be"),
                                        (200, "200 folds need at least 200 samples")])
def test_stratified_folds_rejects_bad_k(k, message):
    with pytest.raises(ConfigError, match=message):
        stratified_folds(_data(), k)
