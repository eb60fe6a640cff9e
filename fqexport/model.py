"""The result of compression: quantized layers and the compressed model that exports them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import ExportResult, export_qdq
from fqexport.metadata import ExportMetadata
from fqexport.quant.grid import dequantize


@dataclass
class QuantizedLayer:
    """A quantized Conv/Linear layer: integer codes and per-output-channel scales.

    The dequantized weight is ``codes * scale[:, None, ...]``; ``codes`` has the weight's shape.
    """

    name: str
    kind: str
    bits: int
    qmax: int
    codes: torch.Tensor  # int8
    scale: torch.Tensor  # float32 [out]
    params: int
    macs: int = 0

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.codes.float(), self.scale)

    def storage(self, mode: str) -> str:
        """Container of this layer's codes under storage ``mode``."""
        if mode == "int8" or self.bits > 4:
            return "int8"
        if mode == "packed" and self.bits <= 2:
            return "int2"
        return "int4"


@dataclass
class CompressedModel:
    """The result of :func:`compress`: a fake-quant PyTorch reference and its layer codes.

    Attributes:
        reference: the quantized model in PyTorch (weights on their grids, activations
            fake-quantized at the points the ONNX export places Q/DQ pairs) — what the export
            must match.
        float_model: the BN-folded float model.
        layers: quantized layers by module name.
        config: the QuantConfig used.
        group_names: names of the calibration groups.
        input_shape: shape of one sample.
        num_classes: width of the model output.
        calib: the group-balanced calibration subset used (export checks run on it).
        metadata: provenance and resources, written into the ONNX file by the exporter.
    """

    reference: torch.fx.GraphModule
    float_model: torch.fx.GraphModule
    layers: dict[str, QuantizedLayer]
    config: QuantConfig
    group_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    calib: GroupData
    metadata: ExportMetadata

    @property
    def avg_weight_bits(self) -> float:
        """Parameter-weighted average weight width of the quantized layers."""
        total = sum(l.params for l in self.layers.values())
        return sum(l.bits * l.params for l in self.layers.values()) / max(total, 1)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per quantized layer: name, kind, bits, params, MACs, storage."""
        return [
            {"name": l.name, "kind": l.kind, "bits": l.bits, "params": l.params, "macs": l.macs,
             "storage": l.storage(self.config.storage)}
            for l in self.layers.values()
        ]

    def predict(self, x: np.ndarray, batch_size: int = 256, quantized: bool = True) -> np.ndarray:
        """Logits of the fake-quant reference (or the float model) on ``x``."""
        model = self.reference if quantized else self.float_model
        outs = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                outs.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)

    def export(self, path: str | Path, *, storage: str | None = None, check: bool = True) -> ExportResult:
        """Write a QDQ ONNX model to ``path`` (atomically) and check it; see exporters.qdq_onnx."""
        return export_qdq(self, path, storage=storage, check=check)
