"""Tests of exporters/batch_coupling.py: which nodes mix the samples of a batch."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from fqexport.exporters.batch_coupling import batch_coupled, batch_coupled_nodes, ranks

CONSTANTS = {"table": np.zeros((10, 4), np.float32), "ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64),
             "ax_last2": np.array([-2, -1], np.int64)}
RANK4 = {"x": 4}  # x: [N, C, H, W]


def node(op, inputs=("x",), domain="", **attrs):
    return helper.make_node(op, list(inputs), ["y"], domain=domain, **attrs)


@pytest.mark.parametrize("n, rank, coupled", [
    # one range over the whole tensor (quantize_dynamic's files)
    (node("DynamicQuantizeLinear"), RANK4, True),
    (node("DynamicQuantizeMatMul", ("x", "w", "s"), domain="com.microsoft"), RANK4, True),
    # statistics over the batch
    (node("BatchNormalization", ("x", "s", "b", "m", "v")), RANK4, False),
    (node("BatchNormalization", ("x", "s", "b", "m", "v"), training_mode=1), RANK4, True),
    (node("MeanVarianceNormalization"), RANK4, True),  # default axes 0, 2, 3
    (node("MeanVarianceNormalization", axes=[2, 3]), RANK4, False),
    # reductions: axes as an attribute or an input, negative axes through the rank
    (node("ReduceMean", axes=[-2, -1]), RANK4, False),
    (node("ReduceMean", axes=[-2, -1]), {}, True),  # rank unknown: -2 may be the batch
    (node("ReduceMean", axes=[-1]), {}, False),
    (node("ReduceMean", axes=[-4]), RANK4, True),
    (node("ReduceMax"), RANK4, True),  # no axes: all of them
    (node("ReduceSum", ("x", "ax1")), RANK4, False),
    (node("ReduceSum", ("x", "ax0")), RANK4, True),
    (node("ReduceSum", ("x", "ax_last2")), RANK4, False),
    (node("ReduceSum", ("x", "runtime_axes")), RANK4, True),
    (node("ReduceSum", ("x",), noop_with_empty_axes=1), RANK4, False),
    # values along one axis
    (node("Softmax", axis=-1), RANK4, False),
    (node("Softmax", axis=0), RANK4, True),
    (node("QLinearSoftmax", ("x", "s", "z", "s", "z"), domain="com.microsoft", axis=-1), RANK4, False),
    (node("ArgMax"), RANK4, True),  # default axis 0
    (node("ArgMax", axis=1), RANK4, False),
    (node("Gather", ("table", "ids")), RANK4, False),  # an embedding table's rows, not samples
    (node("Gather", ("x", "ids")), RANK4, True),
    (node("Gather", ("x", "ids"), axis=1), RANK4, False),
    (node("Slice", ("x", "st", "en", "ax1")), RANK4, False),
    (node("Slice", ("x", "st", "en", "ax0")), RANK4, True),
    (node("Slice", ("x", "st", "en")), RANK4, True),
    (node("CumSum", ("x", "ax1")), RANK4, False),
    (node("GatherND", ("x", "idx"), batch_dims=1), RANK4, False),
    (node("GatherND", ("x", "idx")), RANK4, True),
    # per sample
    (node("Conv", ("x", "w")), RANK4, False),
    (node("QLinearConv", ("x", "s", "z", "w", "s", "z", "s", "z")), RANK4, False),
    (node("Flatten", axis=1), RANK4, False),
    (node("LayerNormalization", ("x", "s"), axis=-1), RANK4, False),
])
def test_nodes_that_mix_the_samples_of_a_batch(n, rank, coupled):
    assert batch_coupled(n, CONSTANTS, rank) is coupled


def test_ranks_come_from_the_graph_and_resolve_negative_axes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("ReduceMean", ["h"], ["y"], axes=[-2])],
                              "g", [x], [y], value_info=[h])
    assert ranks(graph) == {"x": 2, "h": 2}
    assert [n.op_type for n in batch_coupled_nodes(graph, {})] == ["ReduceMean"]  # -2 of a rank-2 tensor: the batch
