"""Rewrite rule for the ``int4-blocked`` container (the ``gpu`` target): a Linear as a blocked INT4
``DequantizeLinear`` → ``MatMul``.

``W[K, N] = DequantizeLinear(q_INT4[K, N], scale[blocks, N], axis=0, block_size)`` (opset 21
blocked quantization along K, zero point 0 left out), read as B by a ``MatMul``: ``Gemm(A, W, C,
transB=1)`` becomes ``MatMul(A, W) + C``, a torch ``MatMul(A, Wᵀ)`` keeps its op. This is the
weight-only pattern ORT's CUDA EP fuses into MatMulNBits (axis 0, ``block_size`` a power of 2 >=
16, scale ``[ceil(K/block_size), N]``, the MatMul's only DequantizeLinear input and no
QuantizeLinear after it) and TensorRT imports as INT4 weights; ONNX Runtime's CPU runs it too
(a float MatMul on the dequantized weight). Block: :func:`~fqexport.quant.layout.nbits_block_size`
of K, the layer's per-block scales or its row scale repeated over the blocks.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fqexport.errors import ExportError
from fqexport.exporters.linear_consumer import linear_consumer
from fqexport.exporters.onnx_graph import consumers
from fqexport.quant.layout import nbits_block_size

MSG_BLOCKED_CONSUMER = (
    "layer '{name}': its weight feeds {ops}, not one Gemm(transB=1) or MatMul: cannot store it "
    "as blocked INT4 weights for the GPU; compress with storage='int8'"
)
MSG_BLOCKED_SCALES = (
    "layer '{name}': per-block scales of shape {shape} do not fit K={k} in blocks of {bs} "
    "(need [{n}, {nb}]): the layer was compressed for another block size"
)


def blocked_scales(layer: str, scale: np.ndarray, n: int, k: int, block_size: int) -> np.ndarray:
    """``scale [N]`` (per row) or ``[N, blocks]`` (per block) as the DequantizeLinear's
    ``[blocks, N]``, blocks = ceil(K / block_size)."""
    blocks = math.ceil(k / block_size)
    if scale.ndim == 1:
        return np.repeat(scale.astype(np.float32)[None, :], blocks, axis=0)
    if scale.shape != (n, blocks):
        raise ExportError(MSG_BLOCKED_SCALES.format(name=layer, shape=scale.shape, k=k, bs=block_size, n=n, nb=blocks))
    return np.ascontiguousarray(scale.astype(np.float32).T)


def blocked_int4_weight(graph: onnx.GraphProto, layer: str, weight: str, codes: np.ndarray,
                        scale: np.ndarray) -> list[TensorProto]:
    """Replace the float initializer ``weight`` read by one Gemm(transB=1) or MatMul with a
    blocked INT4 DequantizeLinear → MatMul, in place; returns the new initializers (``weight``
    itself is left for the caller to remove).

    ``codes`` ``[N, K]`` (signed, 2-4 bits), ``scale`` ``[N]`` or per block ``[N, blocks]``.
    """
    users_of = consumers(graph)
    node, gemm = linear_consumer(layer, weight, users_of, MSG_BLOCKED_CONSUMER)
    n, k = codes.shape
    bs = nbits_block_size(k)
    q = numpy_helper.from_array(np.ascontiguousarray(codes.T).astype(ml_dtypes.int4), f"{layer}.weight_quantized")
    s = numpy_helper.from_array(blocked_scales(layer, scale, n, k, bs), f"{layer}.weight_scale")
    w = weight if not gemm else f"{layer}.weight_dequantized"
    dq = helper.make_node("DequantizeLinear", [q.name, s.name], [w], name=f"{layer}.weight_DequantizeLinear",
                          axis=0, block_size=bs)
    index = list(graph.node).index(node)
    new = [dq]
    if gemm:  # Gemm(A, W, C, transB=1) → MatMul(A, W[K, N]) (+ Add C)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        product = f"{layer}_MatMul_output" if bias else node.output[0]
        new.append(helper.make_node("MatMul", [node.input[0], w], [product], name=f"{layer}_MatMul"))
        if bias:
            new.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{layer}_bias_Add"))
        graph.node.remove(node)
    for offset, added in enumerate(new):
        graph.node.insert(index + offset, added)
    return [q, s]
