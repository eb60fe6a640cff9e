"""Tests of calibration/readers.py: .npz, torch Dataset, CSV manifest, validation, dispatch."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import (
    check_labels,
    from_dataset,
    load_csv_manifest,
    load_data,
    load_npz,
    validate_group_data,
)
from fqexport.errors import DataError


def _arrays(n: int = 6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 3)).astype(np.float64)
    y = np.arange(n) % 3
    group = np.array([0, 1] * (n // 2))
    return x, y, group


def _save(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- npz


def test_load_npz_converts_dtypes_and_default_names(tmp_path):
    x, y, group = _arrays()
    data = load_npz(_save(tmp_path, x=x, y=y.astype(np.int32), group=group.astype(np.uint8)))
    assert data.x.dtype == np.float32 and data.x.shape == (6, 2, 3)
    assert data.y.dtype == np.int64 and data.group.dtype == np.int64
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    assert data.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.group_names == ("group0", "group1")
    assert data.group_counts().tolist() == [3, 3]
    assert data.source.endswith("d.npz")


def test_load_npz_explicit_group_names(tmp_path):
    x, y, group = _arrays()
    data = load_npz(_save(tmp_path, x=x, y=y, group=group, group_names=np.array(["light", "dark"])))
    assert data.group_names == ("light", "dark")
    assert data.group.tolist() == [0, 1, 0, 1, 0, 1]


def test_load_npz_string_groups_sorted_unique(tmp_path):
    x, y, _ = _arrays()
    group = np.array(["m", "f", "m", "x", "f", "m"])
    data = load_npz(_save(tmp_path, x=x, y=y, group=group))
    assert data.group_names == ("f", "m", "x")
    assert data.group.tolist() == [1, 0, 1, 2, 0, 1]


def test_load_npz_string_groups_follow_given_names(tmp_path):
    x, y, _ = _arrays(4)
    group = np.array(["b", "a", "b", "a"])
    data = load_npz(_save(tmp_path, x=x, y=y, group=group, group_names=np.array(["b", "a"])))
    assert data.group_names == ("b", "a")
    assert data.group.tolist() == [0, 1, 0, 1]
    with pytest.raises(DataError, match=r"holds the name 'b' \(sample 0\) that is not in group_names"):
        load_npz(_save(tmp_path, "e.npz", x=x, y=y, group=group, group_names=np.array(["a", "c"])))


def test_load_npz_whole_number_float_labels_accepted(tmp_path):
    x, y, group = _arrays()
    data = load_npz(_save(tmp_path, x=x, y=y.astype(np.float32), group=group.astype(np.float64)))
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
    x, y, group = _arrays()
    arrays = {"x": x, "y": y, "group": group}
    change(arrays)
    path = _save(tmp_path, **arrays)
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
    x, y, _ = _arrays()
    path = _save(tmp_path, x=x, y=y, group=np.array([0, 1, 0, 1, 0, {}], dtype=object))
    with pytest.raises(DataError, match="field 'group' cannot be read"):
        load_npz(path)


# --------------------------------------------------------------------------- Dataset


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


# --------------------------------------------------------------------------- CSV


def _write_png(path, array, mode):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)


def _manifest(tmp_path, rows, header="path,label,group"):
    path = tmp_path / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_load_csv_manifest_grayscale(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png", np.array([[0, 255], [51, 102]], np.uint8), "L")
    _write_png(tmp_path / "img" / "b.png", np.full((2, 2), 255, np.uint8), "L")
    _write_png(tmp_path / "img" / "c.png", np.zeros((2, 2), np.uint8), "L")
    path = _manifest(tmp_path, ["img/a.png,1,dark", "img/b.png,0,light", "img/c.png,2,dark"])
    data = load_csv_manifest(path)
    assert data.x.shape == (3, 1, 2, 2) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[0, 0], [[0.0, 1.0], [0.2, 0.4]], atol=1e-6)
    assert data.y.tolist() == [1, 0, 2]
    assert data.group_names == ("dark", "light")
    assert data.group.tolist() == [0, 1, 0]


def test_load_csv_manifest_rgb_chw_and_integer_groups(tmp_path):
    pytest.importorskip("PIL")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255  # red channel
    rgb[0, 0, 2] = 51
    _write_png(tmp_path / "r.png", rgb, "RGB")
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 7, np.uint8)], axis=2)
    _write_png(tmp_path / "q.png", rgba, "RGBA")
    data = load_csv_manifest(_manifest(tmp_path, ["r.png,0,1", "q.png,1,0"]))
    assert data.x.shape == (2, 3, 2, 3)  # CHW, alpha dropped
    assert data.x[0, 0].min() == 1.0 and data.x[0, 1].max() == 0.0
    assert data.x[0, 2, 0, 0] == pytest.approx(0.2)
    assert data.group.tolist() == [1, 0] and data.group_names == ("group0", "group1")


def test_load_csv_manifest_errors(tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8), "L")
    _write_png(tmp_path / "big.png", np.zeros((3, 3), np.uint8), "L")
    _write_png(tmp_path / "rgb.png", np.zeros((2, 2, 3), np.uint8), "RGB")
    with pytest.raises(DataError, match=r"line 3: image big.png is 1x3x3 \(CHW\) but a.png is 1x2x2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0,g", "big.png,0,g"]))
    with pytest.raises(DataError, match="image rgb.png is 3x2x2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0,g", "rgb.png,0,g"]))
    with pytest.raises(DataError, match="manifest.csv line 2: image file not found: .*nope.png"):
        load_csv_manifest(_manifest(tmp_path, ["nope.png,0,g"]))
    with pytest.raises(DataError, match=r"missing column 'group' in the header \['path', 'label'\]"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0"], header="path,label"))
    with pytest.raises(DataError, match="column 'label' must be an integer class id, got 'cat'"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,cat,g"]))
    with pytest.raises(DataError, match="manifest.csv: the dataset is empty"):
        load_csv_manifest(_manifest(tmp_path, []))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="line 2: cannot read image .*junk.png"):
        load_csv_manifest(_manifest(tmp_path, ["junk.png,0,g"]))
    with pytest.raises(DataError, match="field 'y' holds the negative label -2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,-2,g"]))
    with pytest.raises(DataError, match="absent.csv: file not found"):
        load_csv_manifest(tmp_path / "absent.csv")


def test_load_csv_manifest_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
    path = _manifest(tmp_path, ["a.png,0,g"])
    with pytest.raises(DataError, match=r'pip install "fqexport\[images\]"'):
        load_csv_manifest(path)


# --------------------------------------------------------------------------- dispatch, labels


def test_load_data_dispatch(tmp_path):
    x, y, group = _arrays()
    npz = _save(tmp_path, x=x, y=y, group=group)
    assert len(load_data(npz)) == 6
    assert len(load_data(str(npz))) == 6
    gd = GroupData(x.astype(np.float32), y, group, ("a", "b"), "mem")
    assert load_data(gd).group_names == ("a", "b")
    ds = _Tuples([(np.zeros(2), 0, 0), (np.ones(2), 1, 1)])
    loaded = load_data(ds)
    assert loaded.x.shape == (2, 2) and loaded.source == "<_Tuples>"
    with pytest.raises(DataError, match=r"d.txt: unsupported data file type '.txt'"):
        load_data(tmp_path / "d.txt")
    with pytest.raises(DataError, match="cannot load data from a dict"):
        load_data({"x": x})
    bad = GroupData(np.full((2, 1), np.nan, np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64), ("a",), "mem")
    with pytest.raises(DataError, match="mem: field 'x' contains NaN or Inf \\(2 values\\)"):
        load_data(bad)


def test_check_labels():
    data = validate_group_data(np.zeros((3, 1)), [0, 4, 1], [0, 0, 0], source="val.npz")
    check_labels(data, 5)
    with pytest.raises(DataError, match=r"val.npz: field 'y' holds the label 4 outside \[0, 4\) \(the model has num_classes=4\)"):
        check_labels(data, 4)
