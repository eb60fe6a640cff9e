"""exporters/ort_fusions.py: rewrites after which ORT fuses more integer kernels, same graph math."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fqexport.exporters import qdq_onnx
from fqexport.exporters.ort_fusions import fuse_for_ort, global_average_pools, int32_gemm_biases
from fqexport.exporters.qdq_onnx import export_qdq


def _run(path_or_model, x, optimized, dump=None):
    """(outputs, op-type counts of what ORT ran) of one session."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if dump is not None:
        so.optimized_model_filepath = str(dump)
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ops = collections.Counter(n.op_type for n in onnx.load(str(dump)).graph.node) if dump is not None else None
    return out, ops


@pytest.fixture(scope="module")
def pair(tmp_path_factory, cnn_cm8):
    """The tiny CNN's W8A8 export without and with the pass."""
    d = tmp_path_factory.mktemp("fusions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qdq_onnx, "fuse_for_ort", lambda model: None)
        plain = export_qdq(cnn_cm8, d / "plain.onnx")
    return plain.path, export_qdq(cnn_cm8, d / "fused.onnx").path


def test_pool_and_logits_layer_fuse_into_integer_kernels(pair, cnn_data, tmp_path):
    plain, fused = pair
    x = cnn_data.x[:64]
    y_plain, ops_plain = _run(plain, x, True, tmp_path / "plain_opt.onnx")
    y_fused, ops_fused = _run(fused, x, True, tmp_path / "fused_opt.onnx")
    assert ops_plain["ReduceMean"] == 1 and ops_plain["Gemm"] == 1 and ops_plain["QGemm"] == 0
    assert ops_fused["QLinearGlobalAveragePool"] == 1 and ops_fused["QGemm"] == 1
    assert ops_fused["ReduceMean"] == ops_fused["Gemm"] == 0
    assert sum(ops_fused.values()) < sum(ops_plain.values())
    # the QGemm's float output differs from the float Gemm's by float rounding only
    assert np.abs(y_fused - y_plain).max() < 1e-4
    np.testing.assert_array_equal(y_fused.argmax(1), y_plain.argmax(1))


def test_graph_math_is_unchanged(pair, cnn_data):
    plain, fused = pair
    np.testing.assert_array_equal(_run(fused, cnn_data.x, False)[0], _run(plain, cnn_data.x, False)[0])


def _pool_gemm_model(keepdims: int = 1, axes=(2, 3), bias_off_grid: bool = False) -> onnx.ModelProto:
    """x [N, 4, 3, 3] -> Q/DQ -> ReduceMean -> Flatten -> Q/DQ -> Gemm(DQ int8 W, float bias) -> y."""
    sx, sw = np.float32(0.02), np.full(5, 0.01, np.float32)
    step = sx * sw
    bias = (np.arange(5, dtype=np.float32) - 2) * step * 7
    if bias_off_grid:
        bias[0] += step[0] / 3
    inits = [numpy_helper.from_array(np.array(sx), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(np.array(axes, np.int64), "axes"),
             numpy_helper.from_array(np.arange(20, dtype=np.int8).reshape(5, 4) - 10, "wq"),
             numpy_helper.from_array(sw, "sw"), numpy_helper.from_array(np.zeros(5, np.int8), "zw"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("ReduceMean", ["xd", "axes"], ["m"], keepdims=keepdims),
             helper.make_node("Flatten", ["m"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "sx", "zx"], ["fq"]),
             helper.make_node("DequantizeLinear", ["fq", "sx", "zx"], ["fd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Gemm", ["fd", "wd", "b"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_rewrites_apply_and_the_checker_and_outputs_agree():
    model = _pool_gemm_model()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    changed = fuse_for_ort(model)
    assert len(changed["GlobalAveragePool"]) == 1 and len(changed["int32 Gemm bias"]) == 1
    onnx.checker.check_model(model)
    assert "b" not in {t.name for t in model.graph.initializer}
    bias = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["b_int32"]
    np.testing.assert_array_equal(bias, (np.arange(5) - 2) * 7)
    x = np.random.default_rng(0).random((8, 4, 3, 3)).astype(np.float32) * 5
    np.testing.assert_array_equal(_run(model, x, False)[0], _run(before, x, False)[0])


@pytest.mark.parametrize("keepdims,axes", [(0, (2, 3)), (1, (3,)), (1, (1, 2, 3))])
def test_a_mean_that_is_not_a_global_pool_stays(keepdims, axes):
    assert global_average_pools(_pool_gemm_model(keepdims=keepdims, axes=axes)) == []


def test_negative_axes_count_from_the_rank():
    assert len(global_average_pools(_pool_gemm_model(axes=(-2, -1)))) == 1


def test_a_bias_off_the_int32_grid_stays_float():
    model = _pool_gemm_model(bias_off_grid=True)
    assert int32_gemm_biases(model) == []
    assert "b" in {t.name for t in model.graph.initializer}


def test_a_2bit_logits_layer_with_mirrored_rows_fuses_into_qgemm(cnn_model, cnn_data, tmp_path):
    """At 2 bits a row's scale is negative when its largest |w| is positive (levels mirrored);
    the int32 bias then has the sign of b / (s_x·s_w) and the head still runs as a QGemm, with
    ORT's output equal to the PyTorch reference's."""
    from fqexport.config import QuantConfig
    from fqexport.pipeline.compress import compress

    cm = compress(cnn_model, cnn_data, QuantConfig(weight_bits=2, num_calib=128, target="x86-avx2"), progress=False)
    assert bool((cm.layers["fc"].scale < 0).any())
    path = export_qdq(cm, tmp_path / "w2.onnx").path
    x = cnn_data.x[:64]
    y, ops = _run(path, x, True, tmp_path / "w2_opt.onnx")
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0
    np.testing.assert_allclose(y, cm.predict(x), rtol=1e-5, atol=1e-5)
