"""Tests of exporters/weight_int8.py: int8 codes + a per-channel DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from rule_graphs import linear_model, run

from fqexport.exporters.weight_int8 import int8_weight


def test_int8_rule_writes_codes_scale_and_zero_point_that_dequantize_to_the_weight():
    rng = np.random.default_rng(0)
    codes = rng.integers(-63, 64, size=(5, 12)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    inits, nodes = int8_weight("fc.weight", "W", codes, scale, axis=0)
    assert [i.name for i in inits] == ["fc.weight_quantized", "fc.weight_scale", "fc.weight_zero_point"]
    assert [i.data_type for i in inits] == [TensorProto.INT8, TensorProto.FLOAT, TensorProto.INT8]
    (dq,) = nodes
    assert dq.op_type == "DequantizeLinear" and list(dq.output) == ["W"] and dq.attribute[0].i == 0
    model = linear_model(inits, nodes, "W", n=5, k=12)
    onnx.checker.check_model(model)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    want = x @ (codes.astype(np.float32) * scale[:, None]).T
    np.testing.assert_allclose(run(model, x, optimized=False), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(model, x), want, rtol=1e-5, atol=1e-5)


def test_int8_rule_puts_the_scale_on_the_axis_it_is_given():
    # a MatMul weight laid out [K, N] has its output channels on axis 1
    codes = np.arange(12, dtype=np.int8).reshape(3, 4)
    inits, (dq,) = int8_weight("w", "W", codes, np.ones(4, np.float32), axis=1)
    assert dq.attribute[0].i == 1 and list(inits[1].dims) == [4] and list(inits[2].dims) == [4]
