"""The result of compression: quantized layers and the compressed model that exports them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import ExportResult, export_qdq
from fqexport.graph.act_quant import round_biases_to_int32_grid
from fqexport.graph.prepare import float_layers
from fqexport.metadata import FLOAT_BITS, ExportMetadata, LayerRecord
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
        """Container of this layer's codes under storage ``mode``.

        ``"int8"``: an int8 container for every layer (fused QLinearConv/QGemm). ``"auto"``:
        <=4-bit Linear layers as ``"nbits"`` (blocked INT4 in ORT's MatMulNBits: 4 bits on disk,
        1.4x faster than fp32 at batch 1) — the exporter keeps a Linear over tokens
        (``[B, T, K]`` input) in int8, where MatMulNBits runs at fp32 speed and int8 twice as
        fast — and every conv in int8 (ORT has no 4-bit conv kernel: packed INT4 convs run
        5-40x slower than fp32). ``"packed"``: smallest file — every <=4-bit Linear as
        MatMulNBits, 3-4-bit convs packed INT4, 2-bit layers INT2 (float fallbacks: slower).
        """
        if mode == "int8" or self.bits > 4:
            return "int8"
        if mode == "packed" and self.bits <= 2:
            return "int2"
        if self.kind == "linear":
            return "nbits"
        return "int4" if mode == "packed" else "int8"


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

    def __post_init__(self) -> None:
        # 1. Biases on ORT's int32 grid (s_x·s_w[c]): the reference then computes what the
        #    optimized session computes (ORT-NOTES: "Float conv biases become int32").
        round_biases_to_int32_grid(self.reference, {n: l.scale for n, l in self.layers.items()})
        # 2. Weight layers left in float, counted at 32 bits beside the quantized ones.
        floats = tuple(
            LayerRecord(f.name, f.kind, FLOAT_BITS, f.params, storage="float32")
            for f in float_layers(self.reference) if f.name not in self.layers
        )
        self.metadata = replace(
            self.metadata, float_layers=floats, quantized_fraction=round(self.quantized_fraction_of(floats), 6),
            avg_weight_bits=round(self.avg_bits_of(floats), 4),
        )

    def avg_bits_of(self, floats: tuple[LayerRecord, ...]) -> float:
        q = sum(l.params for l in self.layers.values())
        f = sum(l.params for l in floats)
        return (sum(l.bits * l.params for l in self.layers.values()) + FLOAT_BITS * f) / max(q + f, 1)

    def quantized_fraction_of(self, floats: tuple[LayerRecord, ...]) -> float:
        q = sum(l.params for l in self.layers.values())
        return q / max(q + sum(l.params for l in floats), 1)

    @property
    def avg_weight_bits(self) -> float:
        """Parameter-weighted average weight width over all weight layers: quantized layers at
        their width, layers left in float (``metadata.float_layers``) at 32 bits."""
        return self.avg_bits_of(self.metadata.float_layers)

    @property
    def quantized_fraction(self) -> float:
        """Fraction of the weight parameters (weight layers) that are quantized."""
        return self.quantized_fraction_of(self.metadata.float_layers)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per quantized layer (name, kind, bits, params, MACs, storage), then one per
        weight layer left in float (bits 32, storage ``float32``)."""
        rows = [
            {"name": l.name, "kind": l.kind, "bits": l.bits, "params": l.params, "macs": l.macs,
             "storage": l.storage(self.config.storage)}
            for l in self.layers.values()
        ]
        return rows + [
            {"name": f.name, "kind": f.kind, "bits": f.bits, "params": f.params, "macs": 0, "storage": "float32"}
            for f in self.metadata.float_layers
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
