"""Nodes of an ONNX graph whose result for one sample depends on the other samples of its batch.

A batch split into parts that run apart (the kernel emulation runs one part per thread) changes
what such a node computes, so a graph that holds one must run whole batches. The batch is axis 0
of a node's data input (its first input). A node is coupled when it takes

- one range over its whole input: DynamicQuantizeLinear and ORT's fused DynamicQuantizeMatMul and
  DynamicQuantizeLSTM (the files of ``quantize_dynamic``);
- statistics over the batch: BatchNormalization in training mode, MeanVarianceNormalization over
  axis 0 (its default axes are 0, 2, 3);
- a reduction over axis 0 (no axes: all of them; axes known only at run time: maybe 0);
- values along axis 0 of a non-constant input: Softmax, LogSoftmax, Hardmax, ArgMax and ArgMin
  (their default axis is 0), TopK, CumSum, LpNormalization, Gather, GatherElements, GatherND,
  Scatter*, Split, Slice, Compress (a Gather from an embedding table picks rows of the table, not
  samples); ORT's QLinearSoftmax and QLinearReduceMean as their float ops.

An axis counted from the end is resolved with the input's rank where the graph records it, else
taken as possibly 0 (but -1: a batch tensor has rank 2 or more). A batch axis that a Transpose
moved or a Reshape folded is not followed.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from fqexport.exporters.onnx_graph import attributes

# (domain, op) of the ops that take one range over their whole input
WHOLE_TENSOR_OPS = (("", "DynamicQuantizeLinear"), ("com.microsoft", "DynamicQuantizeMatMul"),
                    ("com.microsoft", "DynamicQuantizeLSTM"))
REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
# op -> its default axis (None: the op flattens its input without an axis), for the ops that mix or
# pick values along one axis given as the attribute ``axis``
ALONG_AXIS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "ArgMax": 0, "ArgMin": 0, "TopK": -1,
              "LpNormalization": -1, "Gather": 0, "GatherElements": 0, "Scatter": 0, "ScatterElements": 0,
              "Split": 0, "Compress": None}
# ops that index their input's leading axes (GatherND: unless batch_dims >= 1)
LEADING_AXES = ("GatherND", "ScatterND")


def ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """Value name -> its rank, where the graph records a shape (inputs, value_info, outputs,
    initializers)."""
    out = {t.name: len(t.dims) for t in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def _maybe_batch(axis: int, rank: int | None) -> bool:
    """Whether ``axis`` of an input of ``rank`` (None: unknown) may be axis 0."""
    if axis >= 0:
        return axis == 0
    return axis + rank == 0 if rank is not None else axis <= -2


def batch_coupled(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], rank: Mapping[str, int]) -> bool:
    """Whether ``node``'s result for one sample may depend on the other samples of the batch (see
    the module's list). ``constants``: the graph's initializers by name; ``rank``: :func:`ranks`."""
    op, domain = node.op_type, node.domain if node.domain != "ai.onnx" else ""
    if (domain, op) in WHOLE_TENSOR_OPS:
        return True
    if domain == "com.microsoft" and op.startswith("QLinear"):  # QLinearSoftmax, QLinearReduceMean: as the float op
        op = op[len("QLinear"):]
    elif domain:
        return False
    if not node.input or node.input[0] in constants:
        return False
    attrs = attributes(node)
    data_rank = rank.get(node.input[0])
    if op == "BatchNormalization":
        return bool(attrs.get("training_mode", 0))
    if op == "MeanVarianceNormalization":
        return any(_maybe_batch(int(a), data_rank) for a in attrs.get("axes", (0, 2, 3)))
    if op in REDUCTIONS:
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:  # axes as an input (opset 18, ReduceSum 13)
            if node.input[1] not in constants:
                return True
            axes = constants[node.input[1]].reshape(-1).tolist()
        if not axes:  # all axes, unless told to do nothing
            return not attrs.get("noop_with_empty_axes", 0)
        return any(_maybe_batch(int(a), data_rank) for a in axes)
    if op == "CumSum":
        axis = constants.get(node.input[1]) if len(node.input) > 1 else None
        return axis is None or _maybe_batch(int(np.asarray(axis).reshape(-1)[0]), data_rank)
    if op == "Slice":
        axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if axes is None:  # the leading axes, from 0
            return True
        return axes not in constants or any(_maybe_batch(int(a), data_rank) for a in constants[axes].reshape(-1))
    if op in ALONG_AXIS:
        axis = attrs.get("axis", ALONG_AXIS[op])
        return axis is None or _maybe_batch(int(axis), data_rank)
    if op in LEADING_AXES:
        return int(attrs.get("batch_dims", 0)) < 1
    return False


def batch_coupled_nodes(graph: onnx.GraphProto, constants: Mapping[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` that are :func:`batch_coupled` (``constants``: its initializers)."""
    rank = ranks(graph)
    return [n for n in graph.node if batch_coupled(n, constants, rank)]
