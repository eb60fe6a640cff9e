"""Tiny one-op graphs for the weight-rule tests: ``y = Gemm(x, W, b, transB=1)`` or a 1×1 ``Conv``
whose float weight ``W`` is produced by the nodes a rewrite rule returns."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def linear_model(inits, nodes, weight: str, n: int, k: int, opset: int = 21, conv: bool = False) -> onnx.ModelProto:
    """x [B, k] (or [B, k, 1, 1] for ``conv``) → op(x, ``weight``, zeros bias) → y [B, n]."""
    bias = numpy_helper.from_array(np.zeros(n, np.float32), "b")
    op = (helper.make_node("Conv", ["x", weight, "b"], ["y"]) if conv
          else helper.make_node("Gemm", ["x", weight, "b"], ["y"], transB=1))
    shape = ["B", k, 1, 1] if conv else ["B", k]
    graph = helper.make_graph(
        [*nodes, op], "rule", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n, 1, 1] if conv else ["B", n])], initializer=[*inits, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    if opset >= 25:
        model.ir_version = max(model.ir_version, 11)
    return model


def run(model: onnx.ModelProto, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    """Output of ORT's CPU session (optimized: what deploys) on ``x``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """Op types of the graph ORT runs after its optimizations."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
