"""Tests of exporters/weight_blocked.py: a Linear rewritten into a blocked INT4 DequantizeLinear →
MatMul (the GPU target's INT4), checked by onnx.checker and run in ONNX Runtime's CPU session."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from rule_graphs import linear_model, run

from fqexport.errors import ExportError
from fqexport.exporters.weight_blocked import MSG_BLOCKED_CONSUMER, MSG_BLOCKED_SCALES, blocked_int4_weight

N, K, BLOCK = 6, 192, 64  # nbits_block_size(192) = 64: three blocks


def _codes_and_weight(rng, block_scales: bool):
    codes = rng.integers(-8, 8, size=(N, K)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (N, K // BLOCK) if block_scales else N).astype(np.float32)
    w = codes.astype(np.float32) * (np.repeat(scale, BLOCK, axis=1) if block_scales else scale[:, None])
    return codes, scale, w


def _rewrite(model, codes, scale, weight="fc.weight"):
    graph = model.graph
    new = blocked_int4_weight(graph, "fc", weight, codes, scale)
    graph.initializer.remove(next(i for i in graph.initializer if i.name == weight))
    graph.initializer.extend(new)
    return new


def _token_model(w_kn: np.ndarray, t: int = 5) -> onnx.ModelProto:
    """x [B, t, K] → MatMul(x, W[K, N]) + b → y [B, t, N]: torch's export of a Linear over tokens."""
    k, n = w_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "val_7"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])], "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", t, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", t, n])],
        initializer=[numpy_helper.from_array(w_kn, "val_7"), numpy_helper.from_array(np.full(n, 0.5, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _fused(model, tmp_path, accuracy_level: int) -> tuple[ort.InferenceSession, list[str]]:
    """ORT's optimized CPU session with MatMulNBits at ``accuracy_level`` (0: fp32 compute on the
    dequantized weight, what the CUDA kernel computes; the CPU session's default is 4, int8 A),
    and the op types of its graph."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("block_scales", [False, True], ids=["per-row", "per-block"])
def test_gemm_becomes_blocked_int4_dequantize_matmul_add_with_the_same_output(block_scales, tmp_path):
    rng = np.random.default_rng(3)
    codes, scale, w = _codes_and_weight(rng, block_scales)
    model = linear_model([numpy_helper.from_array(w, "fc.weight")], [], "fc.weight", n=N, k=K)
    q, s = _rewrite(model, codes, scale)
    dq, mm, add = model.graph.node
    assert (dq.op_type, mm.op_type, add.op_type) == ("DequantizeLinear", "MatMul", "Add")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": BLOCK}
    assert list(dq.input) == ["fc.weight_quantized", "fc.weight_scale"]  # zero point 0 left out (int4)
    assert q.data_type == TensorProto.INT4 and list(q.dims) == [K, N]
    np.testing.assert_array_equal(numpy_helper.to_array(q).astype(np.int8), codes.T)
    assert s.data_type == TensorProto.FLOAT and list(s.dims) == [K // BLOCK, N]
    assert mm.input[1] == dq.output[0] and list(add.input) == [mm.output[0], "b"] and list(add.output) == ["y"]
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((3, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x, optimized=False), x @ w.T, rtol=1e-5, atol=1e-5)
    # the pattern ORT fuses into MatMulNBits (here on the CPU; its CUDA EP fuses the same selector group)
    sess, ops = _fused(model, tmp_path, accuracy_level=0)
    assert ops == ["MatMulNBits"]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_int4_codes_take_half_a_byte_each():
    codes, scale, w = _codes_and_weight(np.random.default_rng(4), True)
    model = linear_model([numpy_helper.from_array(w, "fc.weight")], [], "fc.weight", n=N, k=K)
    q, s = _rewrite(model, codes, scale)
    assert len(q.raw_data) == N * K // 2 and len(s.raw_data) == 4 * N * (K // BLOCK)


def test_a_short_last_block_and_a_linear_over_tokens(tmp_path):
    rng = np.random.default_rng(5)
    k = 130  # nbits_block_size(130) = 32: five blocks, the last one 2 wide
    codes = rng.integers(-8, 8, size=(N, k)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, N).astype(np.float32)
    w = codes.astype(np.float32) * scale[:, None]
    model = _token_model(np.ascontiguousarray(w.T))
    _rewrite(model, codes, scale, weight="val_7")
    dq, mm, add = model.graph.node
    assert dq.output[0] == "val_7" and mm.input[1] == "val_7"  # the MatMul keeps its op and its B name
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute}["block_size"] == 32
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own math
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T + 0.5, rtol=1e-5, atol=1e-5)
    sess, ops = _fused(model, tmp_path, accuracy_level=0)
    assert ops == ["MatMulNBits"]  # the bias Add folded in
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T + 0.5, rtol=1e-5, atol=1e-5)


def test_scales_of_another_block_size_are_refused_naming_the_layer():
    codes, _, w = _codes_and_weight(np.random.default_rng(6), False)
    model = linear_model([numpy_helper.from_array(w, "fc.weight")], [], "fc.weight", n=N, k=K)
    with pytest.raises(ExportError, match=r"^layer 'fc': per-block scales of shape \(6, 2\) do not fit K=192 in "
                                          r"blocks of 64 \(need \[6, 3\]\)"):
        blocked_int4_weight(model.graph, "fc", "fc.weight", codes, np.ones((N, 2), np.float32))
    assert MSG_BLOCKED_SCALES.startswith("layer '{name}': per-block scales")


def test_a_weight_not_read_by_one_gemm_or_matmul_says_why():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "fc.weight")
    model = linear_model([w], [], "fc.weight", n=4, k=4)
    model.graph.node.append(helper.make_node("Relu", ["fc.weight"], ["r"]))
    with pytest.raises(ExportError, match=r"^layer 'fc': its weight feeds Gemm, Relu, not one Gemm\(transB=1\) or "
                                          r"MatMul: cannot store it as blocked INT4 weights for the GPU; compress with "
                                          r"storage='int8'$"):
        blocked_int4_weight(model.graph, "fc", "fc.weight", np.ones((4, 4), np.int8), np.ones(4, np.float32))
    assert MSG_BLOCKED_CONSUMER.endswith("compress with storage='int8'")
