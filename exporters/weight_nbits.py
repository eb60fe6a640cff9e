"""Rewrite rule for the ``nbits`` container: a Linear as ORT's ``com.microsoft.MatMulNBits``.

``Gemm(A, W, C, transB=1)`` or ``MatMul(A, Wᵀ) [+ Add(C)]`` → ``MatMulNBits(A, B, scales,
bias=C)`` with ``B`` ``[N, blocks, block/2]`` (two 4-bit codes per byte, zero point 8) and one
float scale per (row, block). ORT fuses ``MatMul + blocked INT4 DequantizeLinear`` into
MatMulNBits only when its MatMulAddFusion is disabled (ORT-NOTES.md); emitting the contrib op
directly needs no session option and keeps the 4-bit weight on disk and in memory.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fqexport.errors import ExportError
from fqexport.exporters.linear_consumer import bias_add, linear_consumer
from fqexport.exporters.onnx_graph import consumers
from fqexport.quant.layout import nbits_block_size

NBITS = 4  # MatMulNBits' container width: 2-4-bit codes
# MatMulNBits compute: 0 = the kernel's default (fp32 on the dequantized weight). 4 (int8
# compute) quantizes A per block inside the kernel, a second rounding the reference does not
# model. Measured (ORT 1.32, AVX512-VNNI + AMX, 1 thread, one op, min of 40-300 runs;
# docs/model-support.md): level 4 is 2x faster only for one vector (M=1: 0.011 vs 0.022 ms,
# fp32 MatMul 0.013); over tokens it is no faster (M=65, K=192 -> 768: 0.27 vs 0.19 ms; M=2080:
# 30 vs 14 ms) and int8 QDQ (MatMulIntegerToFloat) beats both (0.057 / 2.7 ms). On the
# DeiT-tiny-shaped model (every Linear MatMulNBits) level 4 agreed with the graph's math on
# 94.4% of decided samples, level 0 on 98.8%. So 0.
NBITS_ACCURACY_LEVEL = 0

MSG_NBITS_CONSUMER = (
    "layer '{name}': its weight feeds {ops}, not one Gemm(transB=1) or MatMul: cannot store it "
    "as MatMulNBits; compress with storage='int8'"
)
MSG_NBITS_BLOCKS = (
    "per-block scales of shape {shape} do not fit a MatMulNBits weight of {n} rows and K={k} in "
    "blocks of {bs} (need [{n}, {nb}]): the layer was compressed for another block size"
)


def pack_nbits(codes: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits ``B`` [N, blocks, block_size/2] (uint8, two 4-bit codes per byte, low nibble
    first, zero point 8) and ``scales`` [N·blocks] of signed codes [N, K] with per-row scales
    ``[N]`` (each row's scale repeated for its blocks) or per-block scales ``[N, blocks]``
    (the solver's, row-major); K padded with zero codes."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    u = np.full((n, blocks * block_size), 8, dtype=np.uint8)
    u[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, block_size // 2)
    if scale.ndim == 2:
        if scale.shape != (n, blocks):
            raise ExportError(MSG_NBITS_BLOCKS.format(shape=scale.shape, n=n, k=k, bs=block_size, nb=blocks))
        return packed, scale.astype(np.float32).reshape(-1)
    return packed, np.repeat(scale.astype(np.float32), blocks)


def matmul_nbits(graph: onnx.GraphProto, layer: str, weight: str, codes: np.ndarray,
                 scale: np.ndarray) -> list[TensorProto]:
    """Replace the Gemm/MatMul(+Add) reading the float initializer ``weight`` by MatMulNBits, in
    place; returns the new initializers (``weight`` itself is left for the caller to remove).

    ``codes`` ``[N, K]`` (signed, 2-4 bits), ``scale`` ``[N]`` or per block ``[N, blocks]``.
    """
    users_of = consumers(graph)
    node, gemm = linear_consumer(layer, weight, users_of, MSG_NBITS_CONSUMER)
    n, k = codes.shape
    bs = nbits_block_size(k)
    packed, scales = pack_nbits(codes, scale, bs)
    b = numpy_helper.from_array(packed, f"{layer}.weight_nbits")
    sc = numpy_helper.from_array(scales, f"{layer}.weight_nbits_scale")
    bias, output, remove = "", node.output[0], [node]
    if gemm and len(node.input) > 2:
        bias = node.input[2]
    elif not gemm:  # MatMul + Add(bias initializer) → one MatMulNBits with bias
        add = bias_add(graph, node, users_of)
        if add is not None:
            bias = next(x for x in add.input if x != node.output[0])
            output = add.output[0]
            remove.append(add)
    new = helper.make_node(
        "MatMulNBits", [node.input[0], b.name, sc.name, "", "", bias] if bias else [node.input[0], b.name, sc.name],
        [output], name=f"{layer}_MatMulNBits", domain="com.microsoft", K=k, N=n, bits=NBITS, block_size=bs,
        accuracy_level=NBITS_ACCURACY_LEVEL,
    )
    index = list(graph.node).index(node)
    for r in remove:
        graph.node.remove(r)
    graph.node.insert(index, new)
    return [b, sc]
