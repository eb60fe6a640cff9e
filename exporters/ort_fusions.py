"""An export pass for CPU targets: two rewrites after which ONNX Runtime fuses more of the graph
into integer kernels. The graph's math stays the same: the unoptimized session gives the same
outputs before and after (tests/test_ort_fusions.py). Measured on an AVX2 CPU without VNNI
(docs/ort-kernels.md).

1. A ``ReduceMean`` over every spatial axis with ``keepdims=1`` (what torch exports for
   ``AdaptiveAvgPool2d(1)``) becomes a ``GlobalAveragePool``. Between a DequantizeLinear and a
   QuantizeLinear ORT runs that as ``QLinearGlobalAveragePool`` in NHWC, so the ``Transpose``,
   ``DequantizeLinear``, ``ReduceMean`` and ``QuantizeLinear`` it ran before go (the demo
   SmallResNet: 2 % faster at batch 1, outputs bit-identical).
2. A ``Gemm`` that keeps a float output (the logits layer) gets its float bias as int32 in steps
   of s_x·s_w[c] behind its own ``DequantizeLinear``. ORT then fuses it into a ``QGemm`` with a
   float output. Before, it ran a float ``Gemm`` that dequantized its int8 weight on every call.
   The reference already rounds biases to that grid
   (:func:`~fqexport.graph.act_quant.round_biases_to_int32_grid`), so the values stay the same.
   A bias that is not on the grid stays float.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fqexport.exporters.onnx_graph import attributes, producers, remove_unused_initializers

log = logging.getLogger(__name__)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs by name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                values[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                values[node.output[0]] = np.array(helper.get_attribute_value(a))
    return values


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks that ONNX shape inference knows (a value missing has an unknown rank)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def global_average_pools(model: onnx.ModelProto) -> list[str]:
    """Rewrite 1 (in place): each ReduceMean over all spatial axes of a 3-D+ tensor with
    ``keepdims=1`` becomes a GlobalAveragePool; returns the rewritten nodes' names."""
    graph = model.graph
    consts, ranks, done = _constants(graph), _ranks(model), []
    for node in graph.node:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        attrs = attributes(node)
        rank = ranks.get(node.input[0])
        axes = consts.get(node.input[1])
        if rank is None or rank < 3 or axes is None or attrs.get("keepdims", 1) != 1 or attrs.get("noop_with_empty_axes", 0):
            continue
        if sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)) != list(range(2, rank)):
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        done.append(node.name)
    return done


def _float_output_gemm(node: onnx.NodeProto, graph: onnx.GraphProto, made_by: Mapping[str, onnx.NodeProto],
                       consts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(bias, s_x, s_w)`` of a Gemm that ORT would leave in float for want of an int32 bias:
    A = DequantizeLinear(uint8, per tensor), B = DequantizeLinear(int8 codes, per output channel,
    ``transB=1``), C a float initializer, alpha = beta = 1, no QuantizeLinear reading the output."""
    if node.op_type != "Gemm" or len(node.input) != 3:
        return None
    attrs = attributes(node)
    if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    if any(node.output[0] in n.input and n.op_type == "QuantizeLinear" for n in graph.node):
        return None
    dq_a, dq_b = made_by.get(node.input[0]), made_by.get(node.input[1])
    bias = consts.get(node.input[2])
    if dq_a is None or dq_b is None or dq_a.op_type != "DequantizeLinear" or dq_b.op_type != "DequantizeLinear":
        return None
    s_x, z_x = consts.get(dq_a.input[1]), consts.get(dq_a.input[2]) if len(dq_a.input) > 2 else None
    s_w = consts.get(dq_b.input[1])
    if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or s_x is None or s_x.size != 1:
        return None
    if z_x is None or z_x.dtype != np.uint8 or s_w is None or s_w.shape != bias.shape:
        return None
    return bias, np.float32(s_x.reshape(-1)[0]), s_w.astype(np.float32)


def int32_gemm_biases(model: onnx.ModelProto) -> list[str]:
    """Rewrite 2 (in place): the float bias of each float-output Gemm as int32 behind a
    DequantizeLinear (scale s_x·s_w[c]) when it lies on that grid; returns the Gemms' names."""
    graph = model.graph
    made_by, consts, done, new_nodes = producers(graph), _constants(graph), [], []
    for node in graph.node:
        found = _float_output_gemm(node, graph, made_by, consts)
        if found is None:
            continue
        bias, s_x, s_w = found
        # float32, as ORT computes the bias scale; an INT2 row's s_w may be negative (levels
        # mirrored): q = rint(b / step) has the sign that keeps q·step = b
        step = s_x * s_w
        q = np.rint(bias / np.where(step != 0, step, 1)).astype(np.int64)
        if np.any(step == 0) or np.any(np.abs(q) >= 2**31) or not np.array_equal(q.astype(np.float32) * step, bias):
            log.debug("Gemm %s keeps its float bias: not on the int32 grid s_x*s_w", node.name)
            continue
        base = f"{node.input[2]}_int32"
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int32), base),
                                  numpy_helper.from_array(step, f"{base}_scale"),
                                  numpy_helper.from_array(np.zeros(q.shape, np.int32), f"{base}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"],
                              name=f"{base}_DequantizeLinear", axis=0)
        new_nodes.append(dq)
        node.input[2] = dq.output[0]
        done.append(node.name)
    nodes = new_nodes + list(graph.node)  # (a DequantizeLinear of initializers depends on nothing)
    del graph.node[:]
    graph.node.extend(nodes)
    remove_unused_initializers(graph)
    return done


def fuse_for_ort(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Both rewrites, in place; the nodes each one changed."""
    changed = {"GlobalAveragePool": global_average_pools(model), "int32 Gemm bias": int32_gemm_biases(model)}
    log.info("ORT fusion rewrites: %s", {k: len(v) for k, v in changed.items()})
    return changed
