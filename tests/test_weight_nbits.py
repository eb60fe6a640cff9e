"""Tests of exporters/weight_nbits.py: a Linear rewritten into com.microsoft.MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from rule_graphs import linear_model, run

from fqexport.errors import ExportError
from fqexport.exporters.weight_nbits import MSG_NBITS_BLOCKS, NBITS_ACCURACY_LEVEL, matmul_nbits, pack_nbits


def test_pack_nbits_layout():
    codes = np.array([[-8, 7, 0, 1] + [0] * 14], np.int8)  # K = 18: two blocks of 16, padded
    packed, scales = pack_nbits(codes, np.array([0.5], np.float32), 16)
    assert packed.shape == (1, 2, 8) and packed.dtype == np.uint8
    assert packed[0, 0, 0] == (0 | 15 << 4) and packed[0, 0, 1] == (8 | 9 << 4)
    assert np.all(packed[0, 1] == 0x88)  # zero codes (and padding) are 8 | 8 << 4
    np.testing.assert_array_equal(scales, [0.5, 0.5])


def test_pack_nbits_refuses_block_scales_of_another_block_size():
    with pytest.raises(ExportError, match=r"^per-block scales of shape \(2, 4\)"):
        pack_nbits(np.zeros((2, 64), np.int8), np.ones((2, 4), np.float32), 32)
    assert MSG_NBITS_BLOCKS.startswith("per-block scales")


@pytest.mark.parametrize("block_scales", [False, True], ids=["per-row", "per-block"])
def test_gemm_becomes_matmulnbits_with_its_bias_and_the_same_output(block_scales):
    rng = np.random.default_rng(2)
    n, k = 6, 192  # nbits_block_size(192) = 64: three blocks
    codes = rng.integers(-7, 8, size=(n, k)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (n, 3) if block_scales else n).astype(np.float32)
    w = codes.astype(np.float32) * (np.repeat(scale, 64, axis=1) if block_scales else scale[:, None])
    model = linear_model([onnx.numpy_helper.from_array(w, "fc.weight")], [], "fc.weight", n=n, k=k)
    graph = model.graph
    new = matmul_nbits(graph, "fc", "fc.weight", codes, scale)
    graph.initializer.remove(next(i for i in graph.initializer if i.name == "fc.weight"))
    graph.initializer.extend(new)
    (node,) = graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.input[5] == "b"
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, 4, 64)
    assert attrs["accuracy_level"] == NBITS_ACCURACY_LEVEL
    onnx.checker.check_model(model)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_a_weight_not_read_by_one_gemm_or_matmul_says_why():
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "fc.weight")
    model = linear_model([w], [], "fc.weight", n=4, k=4)
    model.graph.node.append(helper.make_node("Relu", ["fc.weight"], ["r"]))
    with pytest.raises(ExportError, match=r"^layer 'fc': its weight feeds Gemm, Relu, not one Gemm\(transB=1\) or MatMul"):
        matmul_nbits(model.graph, "fc", "fc.weight", np.ones((4, 4), np.int8), np.ones(4, np.float32))
