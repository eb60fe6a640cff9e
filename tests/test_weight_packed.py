"""Tests of exporters/weight_packed.py: INT4/INT2 codes behind a Cast to int8 that ORT folds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rule_graphs import linear_model, optimized_ops, run

from fqexport.exporters.weight_packed import packed_weight


@pytest.mark.parametrize("container,low,high,dtype,opset", [
    ("int4", -7, 8, TensorProto.INT4, 21), ("int2", -2, 2, TensorProto.INT2, 25)])
@pytest.mark.parametrize("conv", [False, True], ids=["gemm", "conv"])
def test_packed_rule_casts_narrow_codes_to_int8_before_dequantize(tmp_path, container, low, high, dtype, opset, conv):
    rng = np.random.default_rng(1)
    codes = rng.integers(low, high, size=(6, 16)).astype(np.int8)
    scale = rng.uniform(0.05, 0.2, 6).astype(np.float32)
    w = codes.reshape(6, 16, 1, 1) if conv else codes
    inits, nodes = packed_weight("l.weight", "W", w, scale, 0, container, zero_point=not conv)
    q = inits[0]
    assert q.name == "l.weight_quantized" and q.data_type == dtype
    np.testing.assert_array_equal(numpy_helper.to_array(q).astype(np.int8), w)
    cast, dq = nodes
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.INT8
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == cast.output[0] and list(dq.output) == ["W"]
    assert len(dq.input) == (2 if conv else 3)  # a Gemm weight keeps its zero point (ORT fuses QGemm then)
    model = linear_model(inits, nodes, "W", n=6, k=16, opset=opset, conv=conv)
    onnx.checker.check_model(model)
    x = rng.standard_normal((4, 16, 1, 1) if conv else (4, 16)).astype(np.float32)
    want = x.reshape(4, 16) @ (codes.astype(np.float32) * scale[:, None]).T
    got = run(model, x).reshape(4, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the Cast of the initializer is constant-folded at load: no Cast runs per call
    assert "Cast" not in optimized_ops(model, tmp_path)
