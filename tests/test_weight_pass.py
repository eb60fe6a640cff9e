"""Tests of exporters/weight_pass.py: finding each layer's weight and writing its own container."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from fqexport.errors import ExportError
from fqexport.exporters.weight_pass import MSG_NO_WEIGHT, find_weight, positive_scales
from fqexport.model import QuantizedLayer


def _layer(codes: np.ndarray, scale: np.ndarray) -> QuantizedLayer:
    return QuantizedLayer("fc", "linear", 8, 63, torch.from_numpy(codes), torch.from_numpy(scale), codes.size, "int8")


def test_find_weight_by_name_then_by_value_transposed_or_not():
    codes = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    layer = _layer(codes, np.array([0.5, 1.0, 2.0], np.float32))
    w = layer.dequantized().numpy()
    by_name = {"fc.weight": numpy_helper.from_array(w, "fc.weight")}
    assert find_weight(by_name, layer, w) == (by_name["fc.weight"], False)
    transposed = {"val_3": numpy_helper.from_array(np.ascontiguousarray(w.T), "val_3")}
    assert find_weight(transposed, layer, w) == (transposed["val_3"], True)
    other = {"val_4": numpy_helper.from_array(w + 1.0, "val_4")}
    with pytest.raises(ExportError) as err:
        find_weight(other, layer, w)
    assert str(err.value) == MSG_NO_WEIGHT.format(name="fc")


def test_positive_scales_move_signs_into_the_codes_per_channel_and_per_block():
    codes = np.array([[-2, 1], [1, -2]], np.int8)
    q, s = positive_scales(codes, np.array([-0.5, 0.25], np.float32))
    np.testing.assert_array_equal(q, [[2, -1], [1, -2]])
    np.testing.assert_array_equal(s, [0.5, 0.25])
    np.testing.assert_array_equal(q * s[:, None], codes * np.array([-0.5, 0.25])[:, None])
    # ConvTranspose: channels on axis 1
    q1, _ = positive_scales(codes, np.array([1.0, -1.0], np.float32), axis=1)
    np.testing.assert_array_equal(q1, [[-2, -1], [1, 2]])
    # per-block scales [N, blocks] over K=3 in blocks of 2 (the last block short)
    qb, sb = positive_scales(np.array([[1, 2, 3]], np.int8), np.array([[1.0, -2.0]], np.float32), block=2)
    np.testing.assert_array_equal(qb, [[1, 2, -3]]) and np.testing.assert_array_equal(sb, [[1.0, 2.0]])
