"""Tests of fqexport/validation/data_checks.py: data that does not fit the model is named, with the fix."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.calibration.group_data import GroupData
from fqexport.errors import DataError, ModelLoadError
from fqexport.tasks.classification import MSG_LABELS, MSG_OUTPUT, check_logits
from fqexport.validation.data_checks import (
    MSG_EMPTY,
    MSG_EMPTY_GROUP,
    MSG_RANK,
    MSG_SHAPE,
    check_data,
    read_test_data,
)

NAMES = ("majority", "minority")


def _data(x, y=(0, 1, 2, 0), group=(0, 1, 0, 1)):
    return GroupData(np.asarray(x, np.float32), np.asarray(y, np.int64), np.asarray(group, np.int64), NAMES, "d.npz")


def _error(fn, *args, kind=DataError) -> str:
    with pytest.raises(kind) as err:
        fn(*args)
    return str(err.value)


def test_check_data_accepts_matching_data_and_a_symbolic_batch():
    check_data(_data(np.zeros((4, 1, 6, 6))), "m.onnx", ("batch", 1, 6, 6))
    check_data(_data(np.zeros((4, 1, 6, 6))), "m.onnx", (None, 1, 6, 6))


def test_check_data_names_shape_rank_and_empty_data():
    x = np.zeros((4, 1, 5, 5))
    assert _error(check_data, _data(x), "m.onnx", ("batch", 1, 6, 6)) == MSG_SHAPE.format(
        source="d.npz", got=[1, 5, 5], model="m.onnx", expected="[batch, 1, 6, 6]")
    assert _error(check_data, _data(np.zeros((4, 25))), "m.onnx", (None, 1, 5, 5)) == MSG_RANK.format(
        source="d.npz", got=1, model="m.onnx", expected="[?, 1, 5, 5]")
    empty = GroupData(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), NAMES, "e.npz")
    assert _error(check_data, empty, "m.onnx", (None, 3)) == MSG_EMPTY.format(source="e.npz")
    one_group = _data(np.zeros((4, 3)), group=(0, 0, 0, 0))
    assert _error(check_data, one_group, "m.onnx", (None, 3)) == MSG_EMPTY_GROUP.format(
        source="d.npz", name="minority", gid=1)


def test_check_logits_names_output_shape_and_label_range():
    data = _data(np.zeros((4, 3)))
    check_logits(np.zeros((4, 3)), "m.onnx", data)
    assert _error(check_logits, np.zeros(4), "m.onnx", data, kind=ModelLoadError) == MSG_OUTPUT.format(
        model="m.onnx", shape=[4])
    assert _error(check_logits, np.zeros((4, 2)), "m.onnx", data) == MSG_LABELS.format(
        source="d.npz", sample=2, label=2, model="m.onnx", num_classes=2, last=1, n=1)
    assert "sample 2: label 2 is out of range" in MSG_LABELS.format(
        source="d.npz", sample=2, label=2, model="m.onnx", num_classes=2, last=1, n=1)


def test_read_test_data_rechecks_group_data_and_reads_a_path(tmp_path):
    """A GroupData is checked as load_data checks it (validate's survey: NaN features and a
    duplicated group name were scored), a path is read."""
    data = _data(np.zeros((4, 3)))
    same = read_test_data(data)
    assert np.array_equal(same.x, data.x) and np.array_equal(same.group, data.group) and same.group_names == NAMES
    nan = _data(np.array([[0.0, np.nan, 0.0]] * 4))
    with pytest.raises(DataError, match=r"d\.npz: field 'x' contains NaN or Inf \(4 values\)"):
        read_test_data(nan)
    twice = GroupData(data.x, data.y, data.group, ("A", "A"), "d.npz")
    with pytest.raises(DataError, match=r"d\.npz: field 'group_names' names the group 'A' twice"):
        read_test_data(twice)
    np.savez(tmp_path / "t.npz", x=data.x, y=data.y, group=data.group, group_names=np.array(NAMES))
    read = read_test_data(tmp_path / "t.npz")
    assert read.source.endswith("t.npz") and len(read) == 4 and tuple(read.group_names) == NAMES


def test_integer_pixels_are_named_as_token_ids_in_compress_and_warned_in_validate(tmp_path, caplog):
    """Images stored as int32 are read as token ids (an Embedding's input): compress's error
    and validate's warning say so, with the fix."""
    import torch
    from torch import nn

    import fqexport

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    pix = np.random.default_rng(0).integers(0, 256, (32, 3, 8, 8)).astype(np.int32)
    np.savez(tmp_path / "d.npz", x=pix, y=np.arange(32) % 2, group=np.arange(32) % 2)
    with pytest.raises(DataError, match=r"x holds integers, which fqexport keeps as token ids .* save x as float32"):
        fqexport.compress(model, str(tmp_path / "d.npz"), fqexport.QuantConfig(method="rtn"), progress=False)
    fqexport.export_float(model, torch.zeros(2, 3, 8, 8), tmp_path / "f.onnx")
    with caplog.at_level("WARNING", logger="fqexport.validation"):
        fqexport.validate(tmp_path / "f.onnx", str(tmp_path / "d.npz"), measure_latency=False, kernel_check=False)
    assert caplog.text.count("field 'x' holds integers, which fqexport keeps as integer token ids") == 1
    assert "takes tensor(float)" in caplog.text


def test_an_error_while_a_model_runs_on_data_names_the_source_once():
    """survey 75: "model m.onnx on data <DS>: <DS>: sample 700: ..." (a stream's error has its source)."""
    from fqexport.validation.measure import on_data_error

    assert str(on_data_error("m.onnx", "<DS>", DataError("<DS>: sample 700: transform failed"))) == \
        "model m.onnx on data <DS>: sample 700: transform failed"
    assert str(on_data_error("m.onnx", "t.npz", DataError("input 'x' got int64"))) == \
        "model m.onnx on data t.npz: input 'x' got int64"


def test_float64_values_past_float32_are_named_as_such_not_as_inf():
    """Survey 84: 1e39 in float64 data raised numpy's overflow warning, then "contains NaN or Inf"."""
    import warnings

    import numpy as np
    import pytest

    from fqexport.calibration.checks import check_x_values
    from fqexport.errors import DataError

    x = np.ones((5, 4))
    x[3, 1] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        with pytest.raises(DataError, match=r"sample 3: field 'x' holds values past float32's range \(±3.4e38; "
                                            r"1 values, largest 1e\+39\), which fqexport computes in: rescale the data"):
            check_x_values(x, "d.npz", index=np.arange(5))
