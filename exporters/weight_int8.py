"""Rewrite rule for the ``int8`` container: codes as an int8 initializer + ``DequantizeLinear``.

``W = DequantizeLinear(q_int8, scale[C], zero_point int8 zeros[C], axis)`` — what ORT's QDQ
fusion turns into QLinearConv / QGemm / MatMulIntegerToFloat (ORT-NOTES.md).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper


def int8_weight(base: str, output: str, codes: np.ndarray, scale: np.ndarray,
                axis: int) -> tuple[list[TensorProto], list[NodeProto]]:
    """Initializers and the ``DequantizeLinear`` node producing the float weight ``output``.

    ``base`` prefixes the new values (``<layer>.weight``): ``_quantized``, ``_scale``,
    ``_zero_point``; ``axis`` is the axis of the per-channel ``scale``.
    """
    q = numpy_helper.from_array(codes.astype(np.int8), f"{base}_quantized")
    s = numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale")
    zp = numpy_helper.from_array(np.zeros(scale.shape[0], dtype=np.int8), f"{base}_zero_point")
    node = helper.make_node("DequantizeLinear", [q.name, s.name, zp.name], [output],
                            name=f"{base}_DequantizeLinear", axis=axis)
    return [q, s, zp], [node]
