"""Rewrite rule for the ``int4`` / ``int2`` containers: packed codes behind a ``Cast`` to int8.

``W = DequantizeLinear(Cast(q_INT4|INT2 → int8), scale[C][, 0], axis)``. ONNX Runtime has no
integer kernel for INT4/INT2 weights: a ``DequantizeLinear`` of packed codes runs on every call
and the layer falls back to float. The ``Cast`` of an initializer is constant-folded when the
session loads, before the QDQ fusion, so the file stores 4 or 2 bits per code and the session
runs the fused int8 kernel, bit-identical to an int8 container (ORT-NOTES.md, measured).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

PACKED_DTYPES = {"int4": ml_dtypes.int4, "int2": ml_dtypes.int2}


def packed_weight(base: str, output: str, codes: np.ndarray, scale: np.ndarray, axis: int, container: str,
                  zero_point: bool) -> tuple[list[TensorProto], list[NodeProto]]:
    """Initializers and the ``Cast → DequantizeLinear`` nodes producing the float weight ``output``.

    ``container``: ``"int4"`` or ``"int2"``. ``zero_point``: a Gemm/MatMul weight needs its
    (zero) zero point for ORT to fuse QGemm / MatMulIntegerToFloat; a Conv does not.
    ``base`` prefixes the new values (``<layer>.weight``).
    """
    q = numpy_helper.from_array(codes.astype(PACKED_DTYPES[container]), f"{base}_quantized")
    s = numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale")
    codes8 = f"{base}_codes"
    inits, dq_in = [q, s], [codes8, s.name]
    if zero_point:
        zp = numpy_helper.from_array(np.zeros(scale.shape[0], dtype=np.int8), f"{base}_zero_point")
        inits.append(zp)
        dq_in.append(zp.name)
    nodes = [
        helper.make_node("Cast", [q.name], [codes8], name=f"{base}_Cast", to=TensorProto.INT8),
        helper.make_node("DequantizeLinear", dq_in, [output], name=f"{base}_DequantizeLinear", axis=axis),
    ]
    return inits, nodes
