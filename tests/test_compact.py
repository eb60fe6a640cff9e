"""exporters/compact.py: the export's last pass shrinks the file, not what ORT runs."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fqexport.config import QuantConfig
from fqexport.exporters import qdq_onnx
from fqexport.exporters.compact import compact_graph
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress
from fqexport.validation.gate import validate
from fqexport.validation.resources import from_graph

# every container: int8 (fused QLinearConv), INT4, INT2 (DQ + Mul), MatMulNBits
BITS = {"stem": 8, "conv_a": 4, "conv_b": 2, "dw": 3, "pw": 2, "fc": 4}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, cnn_model, cnn_data):
    """The same packed mixed-width CNN exported without and with the compaction pass."""
    d = tmp_path_factory.mktemp("compact")
    cm = compress(cnn_model, cnn_data, QuantConfig(num_calib=64, batch_size=64, storage="packed", layer_bits=BITS),
                  progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qdq_onnx, "compact_graph", lambda model, layers: None)
        plain = export_qdq(cm, d / "plain.onnx")
    return plain, export_qdq(cm, d / "compact.onnx"), cm


def _optimized(path, x, dump):
    """(logits, op-type counts) of the optimized ORT session (what deploys)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dump)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return out, collections.Counter(n.op_type for n in onnx.load(str(dump)).graph.node)


def test_compact_file_is_smaller_and_ort_runs_the_same_kernels_and_outputs(pair, cnn_data, tmp_path):
    plain, compact, _ = pair
    assert compact.size_bytes < plain.size_bytes - 2000  # value_info, names, zero points, defaults
    model = onnx.load(str(compact.path))
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.value_info) == 0
    convs = {f"{name}.weight" for name in BITS if name != "fc"}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in convs]
    assert len(weight_dq) == 5 and all(len(n.input) == 2 for n in weight_dq)  # no conv zero points
    # comparing two graphs in the same optimized session type (not fused kernels vs float math)
    got_plain, ops_plain = _optimized(plain.path, cnn_data.x[:96], tmp_path / "a.onnx")
    got_compact, ops_compact = _optimized(compact.path, cnn_data.x[:96], tmp_path / "b.onnx")
    np.testing.assert_array_equal(got_compact, got_plain)
    assert ops_compact == ops_plain
    assert ops_compact["QLinearConv"] >= 1 and ops_compact["MatMulNBits"] == 1


def test_layers_are_still_found_by_name(pair, cnn_data):
    plain, compact, cm = pair
    model = onnx.load(str(compact.path))
    inits = {t.name: t for t in model.graph.initializer}
    for name, container in compact.storage.items():
        if container == "nbits":
            assert f"{name}.weight_nbits" in inits
            assert [n.name for n in model.graph.node if n.op_type == "MatMulNBits"] == [f"{name}_MatMulNBits"]
        else:
            assert f"{name}.weight_quantized" in inits and f"{name}.weight_scale" in inits
            # the DequantizeLinear (or the INT2 scale Mul) still outputs the old weight's name
            assert any(f"{name}.weight" in n.output for n in model.graph.node), name
    assert inits["conv_b.weight_quantized"].data_type == TensorProto.INT2
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    # readers of the file: metadata, the graph's resources (weights found through their DQ), validate
    assert [r.name for r in read_metadata(compact.path).layers] == list(cm.layers)
    a, b = from_graph(onnx.load(str(plain.path))), from_graph(model)
    assert (b.params, b.avg_weight_bits, b.macs) == (a.params, a.avg_weight_bits, a.macs) and b.macs
    rep_a = validate(plain.path, cnn_data, measure_latency=False)
    rep_b = validate(compact.path, cnn_data, measure_latency=False)
    assert rep_b.metrics.by_group == rep_a.metrics.by_group
    assert rep_b.fused_kernels == rep_a.fused_kernels


def test_metadata_json_is_compact(pair):
    _, compact, _ = pair
    value = next(p.value for p in onnx.load(str(compact.path)).metadata_props if p.key == "fqexport")
    assert ", " not in value and '": ' not in value
    assert json.dumps(json.loads(value), sort_keys=True, separators=(",", ":")) == value


def _tiny_graph() -> onnx.ModelProto:
    """x -> Q/DQ (scalar scale 0.1, zp 0) -> Conv(W = DQ(int8 codes, scales, zeros)) -> Q/DQ
    (another scalar 0.1 and zp 0) -> y; a second weight has a nonzero zero point."""
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [
        f32("val_1", 0.1), numpy_helper.from_array(np.array(0, np.uint8), "val_2"),
        f32("val_3", 0.1), numpy_helper.from_array(np.array(0, np.uint8), "val_4"),
        numpy_helper.from_array(np.array([[[[1]], [[-2]]], [[[3]], [[4]]]], np.int8), "conv.weight_quantized"),
        f32("conv.weight_scale", [0.5, 0.25]),
        numpy_helper.from_array(np.zeros(2, np.int8), "conv.weight_zero_point"),
        numpy_helper.from_array(np.array([[1, 2]], np.int8), "other_q"),
        numpy_helper.from_array(np.array(1, np.int8), "other_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "val_1", "val_2"], ["xq"], name="node_QuantizeLinear_0",
                         saturate=1, axis=1),
        helper.make_node("DequantizeLinear", ["xq", "val_1", "val_2"], ["act_qdq_0"], name="node_act_qdq_0"),
        helper.make_node("DequantizeLinear", ["conv.weight_quantized", "conv.weight_scale", "conv.weight_zero_point"],
                         ["conv.weight"], name="conv.weight_DequantizeLinear", axis=0),
        helper.make_node("Conv", ["act_qdq_0", "conv.weight"], ["conv2d"], name="node_conv2d", group=1,
                         dilations=[1, 1], strides=[1, 1], kernel_shape=[1, 1]),
        helper.make_node("QuantizeLinear", ["conv2d", "val_3", "val_4"], ["yq"], name="node_QuantizeLinear_1"),
        helper.make_node("DequantizeLinear", ["yq", "val_3", "val_4"], ["y"], name="node_act_qdq_1"),
        helper.make_node("DequantizeLinear", ["other_q", "val_1", "other_zp"], ["z"], name="node_other"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])]
    vi = [helper.make_tensor_value_info("conv2d", TensorProto.FLOAT, ["N", 2, 3, 3])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits, value_info=vi),
                             opset_imports=[helper.make_opsetid("", 21)])


def test_compact_graph_passes_on_a_hand_built_graph():
    model = _tiny_graph()
    x = np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})
    want = run(model)
    stats = compact_graph(model, ["conv"])
    onnx.checker.check_model(model, full_check=True)
    for got, ref in zip(run(model), want):
        np.testing.assert_array_equal(got, ref)
    g = model.graph
    assert stats.value_info == 1 and len(g.value_info) == 0
    # the all-zero weight zero point is dropped; the nonzero one stays
    assert stats.zero_points == 1
    assert [len(n.input) for n in g.node if n.op_type == "DequantizeLinear"] == [3, 2, 3, 3]
    # 0.1 and uint8 0 appear once each (and the int8 zero point 1)
    assert stats.merged_constants == 2
    scalars = [t for t in g.initializer if not t.dims]
    assert sorted(t.data_type for t in scalars) == [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8]
    assert all(len(t.name) <= 3 for t in scalars)
    # layer names, inputs and outputs stay; torch's value and node names become numbers
    names = {t.name for t in g.initializer}
    assert {"conv.weight_quantized", "conv.weight_scale"} <= names and "conv.weight_zero_point" not in names
    assert [n.name for n in g.node] == [f"n{i}" for i in range(len(g.node))]
    conv = next(n for n in g.node if n.op_type == "Conv")
    assert conv.input[1] == "conv.weight" and conv.output[0].startswith("t")
    # schema defaults dropped: QuantizeLinear saturate/axis, Conv group; attributes without a
    # schema default (Conv dilations, strides) stay
    assert sorted(a.name for a in conv.attribute) == ["dilations", "kernel_shape", "strides"]
    assert all(not n.attribute for n in g.node if n.op_type == "QuantizeLinear")
    assert stats.bytes_after < stats.bytes_before
