"""ONNX translation of the fake-quant reference's activation quantization points.

``fqexport::act_qdq`` (graph/act_quant.py) is a PyTorch custom op; torch.onnx.export turns each
call into a uint8 per-tensor ``QuantizeLinear → DequantizeLinear`` pair with the calibrated
scale and zero point, which ONNX Runtime fuses into its integer kernels.
"""

from __future__ import annotations

import onnx
from onnxscript import opset21 as op


def act_qdq_onnx(x, scale: float, zero_point: int):
    """onnxscript translation of ``fqexport::act_qdq`` for torch.onnx.export."""
    s = op.Constant(value_float=scale)
    z = op.Cast(op.Constant(value_int=zero_point), to=onnx.TensorProto.UINT8)
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)
