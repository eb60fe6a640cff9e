"""Tests of exporters/gpu_rules.py: each rule of what TensorRT's ONNX importer and ORT's CUDA EP
take, refused on a hand-built graph with its message; the exported tiny CNN and MLP pass."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fqexport.exporters.gpu_rules import (
    MSG_ACT_SCALE,
    MSG_ADD,
    MSG_BLOCKED,
    MSG_PAD,
    MSG_UINT8,
    MSG_WEIGHT_AXIS,
    MSG_WEIGHT_CONSUMER,
    MSG_WEIGHT_ONLY_INPUT,
    MSG_WEIGHT_ONLY_OUTPUT,
    MSG_WEIGHT_SCALE,
    MSG_WEIGHT_TYPE,
    MSG_WEIGHT_ZERO_POINT,
    MSG_ZERO_POINT_MISSING,
    MSG_ZERO_POINT_TYPE,
    MSG_ZERO_POINT_VALUE,
    RULES,
    Violation,
    check_gpu_qdq,
)

C = 4  # channels


def _init(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _qdq(src: str, out: str, zp: str = "zp", scale: str = "s") -> list:
    """An activation pair ``src`` → QuantizeLinear → DequantizeLinear → ``out`` (nodes named q_<out>, dq_<out>)."""
    inputs = [scale, zp] if zp else [scale]
    return [helper.make_node("QuantizeLinear", [src, *inputs], [f"{out}_q"], name=f"q_{out}"),
            helper.make_node("DequantizeLinear", [f"{out}_q", *inputs], [out], name=f"dq_{out}")]


def _conv_weight(name="w", axis=0, codes_dtype=np.int8, scale_shape=(C,), zero_point=None) -> tuple[list, list]:
    inits = [_init(f"{name}_q", np.ones((C, C, 1, 1)), codes_dtype), _init(f"{name}_s", np.full(scale_shape, 0.1), np.float32)]
    inputs = [f"{name}_q", f"{name}_s"]
    if zero_point is not None:
        inits.append(_init(f"{name}_zp", np.full(C, zero_point), np.int8))
        inputs.append(f"{name}_zp")
    return inits, [helper.make_node("DequantizeLinear", inputs, [name], name=f"dq_{name}", axis=axis)]


def _model(nodes, inits, *, input_type=TensorProto.FLOAT, shape=("B", C, 4, 4), out="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", input_type, list(shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", C, 4, 4])],
        initializer=[_init("s", 0.05, np.float32), _init("zp", 0, np.int8), *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _conv_model(**weight) -> onnx.ModelProto:
    """x → pair → Conv(DQ(w)) → y: what the GPU export writes."""
    inits, nodes = _conv_weight(**weight)
    return _model([*nodes, *_qdq("x", "xq"), helper.make_node("Conv", ["xq", "w"], ["y"], name="conv")], inits)


def _messages(model) -> list[str]:
    return [str(v) for v in check_gpu_qdq(model)]


def test_a_conforming_graph_has_no_violations():
    model = _conv_model()
    onnx.checker.check_model(model)
    assert check_gpu_qdq(model) == []


def test_every_violation_names_its_rule_node_and_op():
    v = Violation("no-uint8", "n3", "Cast", "its output is uint8")
    assert str(v) == "[no-uint8] Cast 'n3': its output is uint8"
    assert RULES == ("int8-activations", "per-tensor-activations", "weight-per-channel", "weight-only-int4",
                     "add-inputs-quantized", "no-qdq-between-pad-and-conv", "no-uint8")


def test_uint8_activations_are_refused():
    model = _conv_model()
    model.graph.initializer.append(_init("zp_u8", 128, np.uint8))
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.name.endswith("xq"):
            node.input[2] = "zp_u8"
    assert _messages(model) == [
        "[int8-activations] QuantizeLinear 'q_xq': " + MSG_ZERO_POINT_TYPE.format(op="QuantizeLinear", dtype="uint8"),
        "[int8-activations] DequantizeLinear 'dq_xq': " + MSG_ZERO_POINT_TYPE.format(op="DequantizeLinear", dtype="uint8"),
        "[no-uint8] initializer 'zp_u8': " + MSG_UINT8.format(what="initializer 'zp_u8'"),
    ]


def test_a_missing_or_nonzero_activation_zero_point_is_refused():
    model = _conv_model()
    model.graph.initializer.append(_init("zp3", 3, np.int8))
    q, dq = (n for n in model.graph.node if n.name in ("q_xq", "dq_xq"))
    del q.input[2]  # QuantizeLinear's default zero point is uint8
    dq.input[2] = "zp3"
    assert _messages(model) == [
        "[int8-activations] QuantizeLinear 'q_xq': " + MSG_ZERO_POINT_MISSING.format(op="QuantizeLinear"),
        "[int8-activations] DequantizeLinear 'dq_xq': " + MSG_ZERO_POINT_VALUE.format(op="DequantizeLinear", value=3),
    ]


def test_per_channel_activation_scales_are_refused():
    model = _conv_model()
    model.graph.initializer.extend([_init("s4", np.full(C, 0.05), np.float32), _init("zp4", np.zeros(C), np.int8)])
    for node in model.graph.node:
        if node.name in ("q_xq", "dq_xq"):
            node.input[1], node.input[2] = "s4", "zp4"
            node.attribute.append(helper.make_attribute("axis", 1))
    msg = MSG_ACT_SCALE.format(op="QuantizeLinear", shape=[C])
    assert _messages(model)[0] == "[per-tensor-activations] QuantizeLinear 'q_xq': " + msg


@pytest.mark.parametrize("weight, message", [
    (dict(axis=1), MSG_WEIGHT_AXIS.format(weight="w_q", op="Conv", axis=1, want=0)),
    (dict(scale_shape=()), MSG_WEIGHT_SCALE.format(weight="w_q", shape=[], channels=C, axis=0)),
    (dict(codes_dtype=np.uint8), MSG_WEIGHT_TYPE.format(weight="w_q", dtype="uint8")),
    (dict(zero_point=2), MSG_WEIGHT_ZERO_POINT.format(weight="w_q")),
], ids=["axis", "per-tensor", "uint8-codes", "zero-point"])
def test_conv_weights_must_be_int8_per_channel_on_the_output_axis(weight, message):
    got = _messages(_conv_model(**weight))
    assert got[0] == "[weight-per-channel] DequantizeLinear 'dq_w': " + message
    if weight.get("codes_dtype") is np.uint8:
        assert got[1] == "[no-uint8] initializer 'w_q': " + MSG_UINT8.format(what="initializer 'w_q'")


def _linear_model(op: str, axis: int, block: int = 0, codes_dtype=np.int8, quantized_input=True, quantized_output=False):
    """x [B, 8] → (pair) → Gemm(transB=1) over W [3, 8] or MatMul over W [8, 3] → y (→ pair)."""
    k, n = 8, 3
    shape = (n, k) if op == "Gemm" else (k, n)
    scale = (n,) if not block else (k // block, n)
    attrs = dict(axis=axis, **({"block_size": block} if block else {}))
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", **attrs)]
    inits = [_init("w_q", np.ones(shape), codes_dtype), _init("w_s", np.full(scale, 0.1), np.float32)]
    src = "x"
    if quantized_input:
        nodes += _qdq("x", "xq")
        src = "xq"
    out = "mm" if quantized_output else "y"
    nodes.append(helper.make_node(op, [src, "w"], [out], name="linear", **({"transB": 1} if op == "Gemm" else {})))
    if quantized_output:
        nodes += _qdq("mm", "y")
    return _model(nodes, inits, shape=("B", k))


def test_linear_weights_are_per_channel_on_their_output_axis_or_blocked_int4_along_k():
    assert check_gpu_qdq(_linear_model("Gemm", axis=0)) == []  # Gemm transB=1: W [N, K], axis 0
    assert check_gpu_qdq(_linear_model("MatMul", axis=1)) == []  # MatMul: W [K, N], axis 1
    assert _messages(_linear_model("MatMul", axis=0, block=4, quantized_input=False)) == [
        "[weight-per-channel] DequantizeLinear 'dq_w': " + MSG_WEIGHT_TYPE.format(weight="w_q", dtype="int8")]
    assert _messages(_linear_model("Gemm", axis=1)) == [
        "[weight-per-channel] DequantizeLinear 'dq_w': " + MSG_WEIGHT_AXIS.format(weight="w_q", op="Gemm", axis=1, want=0)]
    assert _messages(_linear_model("MatMul", axis=0)) == [
        "[weight-per-channel] DequantizeLinear 'dq_w': " + MSG_WEIGHT_AXIS.format(weight="w_q", op="MatMul", axis=0, want=1)]
    assert _messages(_linear_model("Gemm", axis=1, block=4, codes_dtype=ml_dtypes.int4)) == [
        "[weight-per-channel] DequantizeLinear 'dq_w': " + MSG_BLOCKED.format(weight="w_q", op="Gemm", axis=1)]


def test_blocked_int4_matmul_runs_weight_only():
    ok = _linear_model("MatMul", axis=0, block=4, codes_dtype=ml_dtypes.int4, quantized_input=False)
    assert ok.graph.initializer[2].data_type == TensorProto.INT4 and check_gpu_qdq(ok) == []
    bad = _linear_model("MatMul", axis=0, block=4, codes_dtype=ml_dtypes.int4, quantized_input=True, quantized_output=True)
    assert _messages(bad) == [
        "[weight-only-int4] MatMul 'linear': " + MSG_WEIGHT_ONLY_INPUT.format(weight="w_q"),
        "[weight-only-int4] MatMul 'linear': " + MSG_WEIGHT_ONLY_OUTPUT.format(weight="w_q"),
    ]


def test_int4_weights_that_are_not_blocked_are_refused():
    assert _messages(_linear_model("MatMul", axis=1, codes_dtype=ml_dtypes.int4)) == [
        "[weight-per-channel] DequantizeLinear 'dq_w': " + MSG_WEIGHT_TYPE.format(weight="w_q", dtype="INT4")]


def test_a_weight_dequantize_that_feeds_no_weight_input_is_refused():
    inits, nodes = _conv_weight()
    model = _model([*nodes, helper.make_node("Relu", ["w"], ["y"], name="relu")], inits)
    assert _messages(model) == ["[weight-per-channel] DequantizeLinear 'dq_w': "
                                + MSG_WEIGHT_CONSUMER.format(weight="w_q", ops="Relu")]


def test_both_inputs_of_a_residual_add_are_quantized():
    both = _model([*_qdq("x", "a"), helper.make_node("Relu", ["x"], ["r"], name="relu"), *_qdq("r", "b"),
                   helper.make_node("Add", ["a", "b"], ["y"], name="add")], [])
    assert check_gpu_qdq(both) == []
    one = _model([*_qdq("x", "a"), helper.make_node("Relu", ["x"], ["r"], name="relu"),
                  helper.make_node("Add", ["a", "r"], ["y"], name="add")], [])
    assert _messages(one) == ["[add-inputs-quantized] Add 'add': " + MSG_ADD.format(quantized="a", other="r")]
    constant = _model([*_qdq("x", "a"), helper.make_node("Add", ["a", "pos"], ["y"], name="add")],
                      [_init("pos", np.zeros((1, C, 4, 4)), np.float32)])
    assert check_gpu_qdq(constant) == []  # a position embedding (or bias) is not a residual input


def test_no_pair_between_a_pad_and_its_conv():
    inits, nodes = _conv_weight()
    pads = _init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    before = _model([*nodes, *_qdq("x", "xq"), helper.make_node("Pad", ["xq", "pads"], ["p"], name="pad"),
                     helper.make_node("Conv", ["p", "w"], ["y"], name="conv")], [*inits, pads])
    assert check_gpu_qdq(before) == []
    between = _model([*nodes, helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"), *_qdq("p", "pq"),
                      helper.make_node("Conv", ["pq", "w"], ["y"], name="conv")], [*inits, pads])
    assert _messages(between) == ["[no-qdq-between-pad-and-conv] Conv 'conv': " + MSG_PAD.format(pad="pad")]


def test_no_uint8_anywhere():
    model = _model([helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.UINT8),
                    helper.make_node("Cast", ["c"], ["y"], name="back", to=TensorProto.FLOAT)], [],
                   input_type=TensorProto.UINT8)
    assert _messages(model) == [
        "[no-uint8] graph input/output 'x': " + MSG_UINT8.format(what="'x'"),
        "[no-uint8] Cast 'cast': " + MSG_UINT8.format(what="its output"),
    ]


def test_matmulnbits_is_refused_for_its_uint8_codes(cnn_exports):
    # the CPU export of the mixed CNN stores fc as com.microsoft.MatMulNBits (uint8 packed codes)
    # and uint8 activation pairs: neither is what TensorRT or the CUDA EP take
    got = check_gpu_qdq(onnx.load(str(cnn_exports["auto"].path)))
    assert {v.rule for v in got} == {"int8-activations", "no-uint8"}
    assert "[no-uint8] initializer 'fc.weight_nbits': " + MSG_UINT8.format(what="initializer 'fc.weight_nbits'") in map(str, got)


def test_the_exported_gpu_cnn_and_mlp_pass(gpu_exports):
    for name, res in gpu_exports.items():
        assert check_gpu_qdq(onnx.load(str(res.path))) == [], name
