"""Tests of calibration/groups.py: groups given beside the samples — an array, a function of
(index, sample), a CSV column matched by file path or index — read through ``load_data``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.groups import MSG_NOT_IN_CSV, GroupsFromCSV
from fqexport.calibration.readers import load_data
from fqexport.errors import ConfigError, DataError


class FolderLike(torch.utils.data.Dataset):
    """ImageFolder's interface without images: ``samples`` of (path, class), ``targets``, items (x, y)."""

    def __init__(self, root, n=6):
        self.samples = [(str(root / ("cat" if i % 2 else "dog") / f"{i}.png"), i % 2) for i in range(n)]
        self.targets = [c for _, c in self.samples]
        self.reads = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((1, 2, 2), float(i)), self.targets[i]


def _csv(path, text):
    path.write_text(text)
    return path


def test_csv_by_path_relative_to_the_csv_folder_reads_no_sample(tmp_path):
    ds = FolderLike(tmp_path)
    rows = "".join(f"{'cat' if i % 2 else 'dog'}/{i}.png,{'dark' if i < 2 else 'light'}\n" for i in range(6))
    csv = _csv(tmp_path / "groups.csv", "path,skin\n" + rows)
    stream = load_data(ds, groups=GroupsFromCSV(csv, "skin"))
    assert stream.group_names == ("dark", "light") and stream.group.tolist() == [0, 0, 1, 1, 1, 1]
    assert stream.y.tolist() == [0, 1, 0, 1, 0, 1]  # the dataset's targets
    assert ds.reads == 1  # sample 0 only (its shape and fields): no pass over the data
    assert stream.take([5]).x[0, 0, 0, 0] == 5.0


def test_csv_root_and_absolute_paths(tmp_path):
    ds = FolderLike(tmp_path / "images", n=2)
    meta = tmp_path / "meta"
    meta.mkdir()
    csv = _csv(meta / "g.csv", f"path,g\ndog/0.png,a\n{tmp_path / 'images' / 'cat' / '1.png'},b\n")
    stream = load_data(ds, groups=GroupsFromCSV(csv, "g", root=tmp_path / "images"))
    assert stream.group.tolist() == [0, 1]


def test_csv_by_index_and_integer_ids(tmp_path):
    csv = _csv(tmp_path / "g.csv", "index,g\n2,1\n0,0\n1,1\n")
    stream = load_data([torch.zeros(2)] * 3, groups=GroupsFromCSV(csv, "g", key="index"))
    assert stream.group.tolist() == [0, 1, 1] and stream.group_names == ("group0", "group1")
    assert stream.y is None


def test_csv_names_that_differ_only_by_surrounding_spaces_are_one_group_and_said(tmp_path, caplog):
    """'trailing ' and 'trailing' became one group without a word: two groups at 84 and 68 % read as
    one at 76 % (survey 52). Cells are read stripped (a CSV written 'a, b'); the merge is warned about."""
    csv = _csv(tmp_path / "g.csv", 'index,g\n0,trailing\n1,"trailing "\n2,other\n3, other\n')
    with caplog.at_level("WARNING", logger="fqexport.calibration.groups"):
        stream = load_data([torch.zeros(2)] * 4, groups=GroupsFromCSV(csv, "g", key="index"))
    assert stream.group_names == ("other", "trailing") and stream.group.tolist() == [1, 1, 0, 0]
    said = [r.getMessage() for r in caplog.records]
    assert sorted(said) == [
        f"{csv}: the group names ' other', 'other' differ only by spaces around them and are read as one group "
        "'other' (a CSV's cells are read without surrounding spaces, as in 'a, b'); rename them if they are "
        "different groups",
        f"{csv}: the group names 'trailing', 'trailing ' differ only by spaces around them and are read as one "
        "group 'trailing' (a CSV's cells are read without surrounding spaces, as in 'a, b'); rename them if they "
        "are different groups"]


def test_csv_codes_that_are_not_plain_integers_are_names(tmp_path):
    """"01" and "1" are two groups (they were merged into id 1); "²" is a name (int() raised: exit 3) (survey 29)."""
    csv = _csv(tmp_path / "g.csv", "index,g\n0,0\n1,01\n2,1\n3,²\n")
    stream = load_data([torch.zeros(2)] * 4, groups=GroupsFromCSV(csv, "g", key="index"))
    assert stream.group_names == ("0", "01", "1", "²") and stream.group.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"index"):
        load_data([torch.zeros(2)] * 1, groups=GroupsFromCSV(_csv(tmp_path / "h.csv", "index,g\n²,a\n"), "g",
                                                             key="index"))


def test_csv_errors_name_the_file_and_the_first_sample(tmp_path):
    ds = FolderLike(tmp_path)
    csv = _csv(tmp_path / "g.csv", "path,skin\ndog/0.png,dark\ncat/1.png,dark\n")
    with pytest.raises(DataError) as info:
        load_data(ds, groups=GroupsFromCSV(csv, "skin"))
    assert str(info.value) == "<FolderLike>: " + MSG_NOT_IN_CSV.format(
        index=2, what=str(tmp_path / "dog" / "2.png"), csv=csv, key="path")
    with pytest.raises(DataError, match=r"g\.csv: missing column 'tone' in the header \['path', 'skin'\]"):
        load_data(ds, groups=GroupsFromCSV(csv, "tone"))
    with pytest.raises(DataError) as info:  # the key's column missing: named as the key, not as column=
        load_data(ds, groups=GroupsFromCSV(csv, "skin", key="index"))
    assert str(info.value).endswith("g.csv: missing column 'index' in the header ['path', 'skin']; "
                                    "GroupsFromCSV(key='index') matches the samples by it")
    dup = _csv(tmp_path / "d.csv", "path,skin\ndog/0.png,a\ndog/0.png,b\n")
    with pytest.raises(DataError, match=r"d\.csv: line 3: path 'dog/0\.png' appears twice \(first on line 2\)"):
        load_data(ds, groups=GroupsFromCSV(dup, "skin"))
    with pytest.raises(DataError, match=r"GroupsFromCSV\(key='path'\) needs the samples' file paths"):
        load_data([torch.zeros(2)] * 2, groups=GroupsFromCSV(csv, "skin"))
    with pytest.raises(DataError, match=r"absent\.csv: file not found"):
        load_data(ds, groups=GroupsFromCSV(tmp_path / "absent.csv", "skin"))
    with pytest.raises(ConfigError, match=r"GroupsFromCSV\.key='name' must be one of 'path', 'index'"):
        GroupsFromCSV(csv, "skin", key="name")


def test_array_and_function_groups(tmp_path):
    ds = FolderLike(tmp_path)
    stream = load_data(ds, groups=np.array(["a", "b", "a", "b", "a", "b"]))
    assert stream.group.tolist() == [0, 1, 0, 1, 0, 1] and ds.reads == 1
    with pytest.raises(DataError, match=r"<FolderLike>: groups has 4 entries but the source has 6 samples"):
        load_data(ds, groups=[0, 1, 0, 1])
    seen = []
    stream = load_data(ds, groups=lambda i, sample: seen.append((i, float(sample[0][0, 0, 0]))) or ("hi" if i > 3 else "lo"))
    assert stream.group_names == ("hi", "lo") and stream.group.tolist() == [1, 1, 1, 1, 0, 0]
    assert seen == [(i, float(i)) for i in range(6)]  # (index, the item as the dataset yields it)
    with pytest.raises(DataError, match=r"<FolderLike>: sample 3: groups\(3, sample\) failed: KeyError: 3"):
        load_data(ds, groups=lambda i, s: {0: 0, 1: 0, 2: 1}[i])
    with pytest.raises(ConfigError, match="groups must be an array of ids or names"):
        load_data(ds, groups="skin")
