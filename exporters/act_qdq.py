"""ONNX translation of the fake-quant reference's activation quantization points.

``fqexport::act_qdq`` (graph/act_quant.py) is a PyTorch custom op; torch.onnx.export turns each
call into a per-tensor ``QuantizeLinear → DequantizeLinear`` pair with the calibrated scale and
zero point: a uint8 zero point (CPU targets: ONNX Runtime fuses the pairs into its integer
kernels), or for a ``symmetric`` point an int8 zero point 0 (the GPU target's S8S8).
"""

from __future__ import annotations

import onnx
from onnxscript import opset21 as op


def act_qdq_onnx(x, scale: float, zero_point: int, symmetric: bool = False):
    """onnxscript translation of ``fqexport::act_qdq`` for torch.onnx.export."""
    s = op.Constant(value_float=scale)
    dtype = onnx.TensorProto.INT8 if symmetric else onnx.TensorProto.UINT8
    z = op.Cast(op.Constant(value_int=zero_point), to=dtype)
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)
