"""Tests of calibration/checks.py: labels against a model, a streamed batch's groups (the readers' field
checks are tested through the readers in test_npz.py, test_dataset.py and test_manifest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.calibration.checks import check_labels, check_x_values, group_ids, validate_group_data
from fqexport.errors import DataError


def test_check_labels():
    data = validate_group_data(np.zeros((3, 1)), [0, 4, 1], [0, 0, 0], source="val.npz")
    check_labels(data, 5)
    with pytest.raises(DataError, match=r"val.npz: sample 1: field 'y' holds the label 4 outside \[0, 4\) \(1 sample\(s\) outside; the model has num_classes=4\)"):
        check_labels(data, 4)


def test_group_ids_of_a_batch_name_the_sample_by_its_position_in_the_source():
    index = np.array([10, 11])
    assert group_ids(np.array(["b", "a"]), ["a", "b"], "train.npz", index).tolist() == [1, 0]
    with pytest.raises(DataError) as info:
        group_ids(np.array([0, 2]), ["a", "b"], "train.npz", index)
    assert str(info.value) == ("train.npz: sample 11: field 'group' holds the id 2 but group_names has only 2 names "
                               "(ids 0..1)")
    with pytest.raises(DataError) as info:
        group_ids(np.array(["a", "c"]), ["a", "b"], "train.npz", index)
    assert str(info.value) == "train.npz: field 'group' holds the name 'c' (sample 11) that is not in group_names ['a', 'b']"



def test_uint8_x_is_warned_about_once_per_source(caplog):
    x = np.full((4, 1, 2, 2), 200, np.uint8)
    with caplog.at_level("WARNING", logger="fqexport.calibration.checks"):
        got = check_x_values(x, "u8.npz")
        check_x_values(x, "u8.npz", np.arange(4))  # the next batch of the same stream: no repeat
    assert got.dtype == np.float32 and got.max() == 200.0  # the values are not rescaled
    assert caplog.text.count("u8.npz: field 'x' is uint8, read as pixels: the model gets its values as floats "
                             "0-255") == 1
    assert "token ids belong in a signed integer x (int64)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fqexport.calibration.checks"):
        check_x_values(x.astype(np.float32) / 255, "f.npz")
    assert "uint8" not in caplog.text


def test_uint16_x_is_warned_about_like_uint8_with_its_own_range(caplog):
    """16-bit pixels (DICOM, 16-bit PNG) in an npz went to the model unscaled without a word, while a
    manifest's 16-bit images are divided by 65535 (survey 47)."""
    x = np.full((4, 1, 2, 2), 4000, np.uint16)
    with caplog.at_level("WARNING", logger="fqexport.calibration.checks"):
        got = check_x_values(x, "ct.npz")
    assert got.dtype == np.float32 and got.max() == 4000.0
    assert ("ct.npz: field 'x' is uint16, read as pixels: the model gets its values as floats 0-65535, not scaled "
            "to [0, 1] as the CSV manifest's images are; if the model was trained on [0, 1] (or normalised) inputs, "
            "save x / 65535") in caplog.text


def test_a_broken_limit_shows_the_value_on_its_side_of_the_limit():
    """2 decimals printed "0.00 MB exceeds 0.0001" and "0.50 pp exceeds 0.5" (survey 22)."""
    from fqexport.validation.checks import _shown

    assert _shown(0.000187, 0.0001, ok=False, above=True) == ("0.000187", "0.0001")
    assert _shown(100 / 199, 0.5, ok=False, above=True) == ("0.502513", "0.5")
    assert _shown(84.996, 85.0, ok=False, above=False) == ("84.996", "85")
    assert _shown(3.14159, 5.0, ok=True, above=True) == ("3.14", "5")  # plainly on its side: 2 decimals
    # float round-off at the limit (0.84 - 0.83 as pp), which the check takes as the limit: no 16 digits (survey 68)
    assert _shown((0.84 - 0.83) * 100, 1.0, ok=True, above=True) == ("1.00", "1")
    assert _shown(85.0, 85.0, ok=True, above=False) == ("85.00", "85")  # at the limit: passes, as shown
    # at a limit of more digits than 2 decimals (a size of 4908133 bytes): read "4.91 MB within 4.90813" (survey 77)
    assert _shown(4.908133, 4.908133, ok=True, above=True) == ("4.908133", "4.908133")
    assert _shown(4.908134, 4.908133, ok=False, above=True) == ("4.91", "4.908133")
    # a limit of many digits missed by 1e-6: both printed "66.6667" (survey 40)
    value, limit = 200 / 3 - 1e-6, 200 / 3
    assert _shown(value, limit, ok=False, above=False) == ("66.666666", "66.666667")
