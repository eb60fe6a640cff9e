"""Tests of calibration/npz.py: reading .npz files (and the checks of their fields)."""

from __future__ import annotations

import numpy as np
import pytest
import npz_arrays

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import load_npz, save_npz
from fqexport.errors import DataError


def test_load_npz_converts_dtypes_and_default_names(tmp_path):
    x, y, group = npz_arrays.arrays()
    data = load_npz(npz_arrays.save(tmp_path, x=x, y=y.astype(np.int32), group=group.astype(np.uint8)))
    assert data.x.dtype == np.float32 and data.x.shape == (6, 2, 3)
    assert data.y.dtype == np.int64 and data.group.dtype == np.int64
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    assert data.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.group_names == ("group0", "group1")
    assert data.group_counts().tolist() == [3, 3]
    assert data.source.endswith("d.npz")


def test_load_npz_explicit_group_names(tmp_path):
    x, y, group = npz_arrays.arrays()
    data = load_npz(npz_arrays.save(tmp_path, x=x, y=y, group=group, group_names=np.array(["light", "dark"])))
    assert data.group_names == ("light", "dark")
    assert data.group.tolist() == [0, 1, 0, 1, 0, 1]


def test_load_npz_string_groups_sorted_unique(tmp_path):
    x, y, _ = npz_arrays.arrays()
    group = np.array(["m", "f", "m", "x", "f", "m"])
    data = load_npz(npz_arrays.save(tmp_path, x=x, y=y, group=group))
    assert data.group_names == ("f", "m", "x")
    assert data.group.tolist() == [1, 0, 1, 2, 0, 1]


def test_load_npz_string_groups_follow_given_names(tmp_path):
    x, y, _ = npz_arrays.arrays(4)
    group = np.array(["b", "a", "b", "a"])
    data = load_npz(npz_arrays.save(tmp_path, x=x, y=y, group=group, group_names=np.array(["b", "a"])))
    assert data.group_names == ("b", "a")
    assert data.group.tolist() == [0, 1, 0, 1]
    with pytest.raises(DataError, match=r"holds the name 'b' \(sample 0\) that is not in group_names"):
        load_npz(npz_arrays.save(tmp_path, "e.npz", x=x, y=y, group=group, group_names=np.array(["a", "c"])))


def test_load_npz_whole_number_float_labels_accepted(tmp_path):
    x, y, group = npz_arrays.arrays()
    data = load_npz(npz_arrays.save(tmp_path, x=x, y=y.astype(np.float32), group=group.astype(np.float64)))
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda a: a.update(x=np.where(np.arange(36).reshape(6, 2, 3) % 12 == 0, np.nan, a["x"])),
         "d.npz: field 'x' contains NaN or Inf (3 values)"),
        (lambda a: a.update(x=np.full((6, 2), np.inf)), "field 'x' contains NaN or Inf (12 values)"),
        (lambda a: a.pop("group"), "d.npz: missing array 'group'"),
        (lambda a: a.update(y=a["y"][:5]), "length mismatch: field 'x' has 6 samples but field 'y' has 5"),
        (lambda a: a.update(group=a["group"][:4]), "field 'x' has 6 samples but field 'group' has 4"),
        (lambda a: a.update(x=np.array(["a"] * 6).reshape(6, 1)), "field 'x' must be numeric, got dtype <U1"),
        (lambda a: a.update(x=np.arange(6.0)), "field 'x' must have at least 2 dims"),
        (lambda a: a.update(y=a["y"] + 0.5), "field 'y' must hold integers, found the non-integer value 0.5"),
        (lambda a: a.update(group=a["group"] + 0.25), "field 'group' must hold integers"),
        (lambda a: a.update(y=a["y"] - 1), "field 'y' holds the negative label -1"),
        # they were cast to int64 first and reported as the negative label -9223372036854775808 (survey 40)
        (lambda a: a.update(y=np.where(np.arange(6) == 2, 1e20, a["y"])),
         "field 'y' holds the value 1e+20 (dtype float64), too large for a class or group id"),
        (lambda a: a.update(y=np.where(np.arange(6) == 2, np.uint64(2**63 + 5), a["y"].astype(np.uint64))),
         "field 'y' holds the value 9223372036854775813 (dtype uint64), too large"),
        (lambda a: a.update(group=a["group"] - 1), "field 'group' holds the negative id -1"),
        (lambda a: a.update(group_names=np.array(["only"])),
         "field 'group' holds the id 1 but group_names has only 1 names"),
        (lambda a: a.update(group_names=np.array(["a", "minority", "b"]), group=np.array([0, 2] * 3)),
         "group 'minority' has no samples"),
        (lambda a: a.update(x=a["x"][:0], y=a["y"][:0], group=a["group"][:0]), "the dataset is empty"),
        (lambda a: a.update(group_names=np.array(["a", "a"])), "names the group 'a' twice"),
    ],
)
def test_load_npz_rejects_bad_fields(tmp_path, change, fragment):
    x, y, group = npz_arrays.arrays()
    arrays = {"x": x, "y": y, "group": group}
    change(arrays)
    path = npz_arrays.save(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_load_npz_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="missing.npz: file not found"):
        load_npz(tmp_path / "missing.npz")
    text = tmp_path / "text.npz"
    text.write_text("not an archive at all")
    with pytest.raises(DataError, match="text.npz: cannot read as .npz"):
        load_npz(text)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.npz: cannot read as .npz"):
        load_npz(empty)
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DataError, match="single.npz: is a single .npy array, not an .npz archive"):
        load_npz(single)
    with pytest.raises(DataError, match="is a directory"):
        load_npz(tmp_path)


def test_load_npz_object_array_refused_without_pickle(tmp_path):
    x, y, _ = npz_arrays.arrays()
    path = npz_arrays.save(tmp_path, x=x, y=y, group=np.array([0, 1, 0, 1, 0, {}], dtype=object))
    with pytest.raises(DataError, match="field 'group' cannot be read"):
        load_npz(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_save_npz_round_trips_with_and_without_labels(tmp_path, compressed):
    x, y, group = npz_arrays.arrays()
    data = GroupData(x.astype(np.float32), y, group, ("a", "b"), "mem")
    path = save_npz(data, tmp_path / "d.npz", compressed=compressed)
    assert path == tmp_path / "d.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]
    back = load_npz(path)
    np.testing.assert_array_equal(back.x, data.x)
    np.testing.assert_array_equal(back.y, y)
    assert back.group.tolist() == group.tolist() and back.group_names == ("a", "b")
    unlabeled = save_npz(GroupData(data.x, None, group, ("a", "b")), tmp_path / "u.npz", compressed=compressed)
    assert sorted(np.load(unlabeled).files) == ["group", "group_names", "x"]
    assert load_npz(unlabeled).y is None


def test_save_npz_of_an_array_says_what_it_needs(tmp_path):
    """An ndarray gave AttributeError: 'numpy.ndarray' object has no attribute 'x' (survey 32)."""
    from fqexport.calibration.npz import save_npz
    from fqexport.errors import ConfigError

    with pytest.raises(ConfigError, match=r"save_npz needs a GroupData .* not a ndarray"):
        save_npz(np.zeros((2, 3)), tmp_path / "a.npz")


@pytest.mark.parametrize("offset", [1, 1.0])
def test_integer_group_ids_with_a_gap_keep_their_own_names(tmp_path, offset):
    """ids 1, 2 (as many data sets code them, or a test set lacking group 0) are the groups
    'group1' and 'group2': never renumbered, which would name them after other groups."""
    x, y, group = npz_arrays.arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y, group=group + offset)
    data = load_npz(tmp_path / "d.npz")
    assert data.group_names == ("group1", "group2")
    assert np.array_equal(data.group, group) and np.array_equal(np.bincount(data.group), np.bincount(group))
