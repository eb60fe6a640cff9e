"""The one op that reads a Linear's float weight initializer, for the rules that replace that op
(:mod:`.weight_nbits`: MatMulNBits; :mod:`.weight_blocked`: a blocked INT4 ``DequantizeLinear``
→ ``MatMul``): ``Gemm(A, W, C, transB=1)`` (torch's export of a Linear on ``[B, K]``) or
``MatMul(A, Wᵀ)`` (on ``[B, T, K]``, with the bias in a following ``Add``).
"""

from __future__ import annotations

import onnx
from onnx import NodeProto

from fqexport.errors import ExportError
from fqexport.exporters.onnx_graph import attributes


def linear_consumer(layer: str, weight: str, users_of: dict[str, list[NodeProto]], message: str) -> tuple[NodeProto, bool]:
    """The one ``Gemm(transB=1)`` (alpha = beta = 1) or ``MatMul`` reading ``weight`` as B, and
    whether it is a Gemm; ExportError(``message`` with ``name`` and ``ops``) saying what reads it
    otherwise."""
    users = users_of.get(weight, [])
    node = users[0] if len(users) == 1 else None
    if node is not None and list(node.input).index(weight) == 1:
        a = attributes(node)
        if node.op_type == "Gemm" and a.get("transA", 0) == 0 and a.get("transB", 0) == 1 \
                and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0:
            return node, True
        if node.op_type == "MatMul":
            return node, False
    raise ExportError(message.format(name=layer, ops=", ".join(u.op_type for u in users) or "nothing"))


def bias_add(graph: onnx.GraphProto, matmul: NodeProto, users_of: dict[str, list[NodeProto]]) -> NodeProto | None:
    """The ``Add`` of a bias initializer that alone reads ``matmul``'s output, if any."""
    add = users_of.get(matmul.output[0], [])
    if len(add) != 1 or add[0].op_type != "Add":
        return None
    inits = {i.name for i in graph.initializer}
    other = [x for x in add[0].input if x != matmul.output[0]]
    return add[0] if len(other) == 1 and other[0] in inits else None
