"""The result of compression: quantized layers and the compressed model that exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import ExportResult, export_qdq, nbits_block_size
from fqexport.graph.act_quant import round_biases_to_int32_grid
from fqexport.graph.prepare import float_layers
from fqexport.metadata import FLOAT_BITS, ExportMetadata, LayerRecord
from fqexport.quant.grid import as_rows, column_scales, num_blocks
from fqexport.quant.hessian import conv_transpose_rows, conv_transpose_weight


def token_linear(kind: str, macs: int, params: int) -> bool:
    """Whether a layer is a Linear applied to several vectors per sample (``[B, T, K]``: tokens,
    positions): it does more multiply-accumulates per sample than it has weights."""
    return kind == "linear" and int(macs) > int(params)


def layer_container(kind: str, bits: int, mode: str, tokens: bool = False) -> str:
    """Container of a ``kind`` layer's ``bits``-wide codes under storage ``mode``; see
    :meth:`QuantizedLayer.storage`. ``tokens``: a Linear over tokens (:func:`token_linear`),
    which ``"auto"`` stores INT4 + Cast (int8 kernel) rather than MatMulNBits (fp32 speed there)."""
    if mode == "int8" or bits > 4:
        return "int8"
    if bits <= 2:
        return "int2"
    return "nbits" if kind == "linear" and not (tokens and mode == "auto") else "int4"


# Narrowest width given per-block scales (2-bit layers lost accuracy with them; see below).
MIN_BLOCK_SCALE_BITS = 3


def scale_block_size(kind: str, bits: int, mode: str, cols: int, tokens: bool = False) -> int | None:
    """Columns per weight scale of a layer with ``cols`` inputs: the MatMulNBits block
    (``nbits_block_size(cols)``) when its codes go to MatMulNBits under storage ``mode`` and a
    row spans more than one block — MatMulNBits stores one scale per block anyway, so the solver
    may choose each (GPTQ's groupsize) at no cost in bytes; ``None`` (one scale per row) otherwise.
    ``tokens``: a Linear over ``[B, T, K]``, which ``"auto"`` stores INT4 + Cast (per-row scales).
    Only at 3-4 bits: measured with benchmarks/nbits_bench.py, per-block scales raised the 4-bit
    DeiT-tiny-shaped model's top-1 agreement with float from 92.19% to 94.14% (the demo MLP: 85.80%
    vs 85.70%, within noise) but lost at 2 bits (DeiT 89.84% -> 88.28%; MLP 84.43% -> 84.10%,
    worst group 69.67% -> 67.33%)."""
    if layer_container(kind, bits, mode, tokens) != "nbits" or bits < MIN_BLOCK_SCALE_BITS:
        return None
    block = nbits_block_size(cols)
    return block if num_blocks(cols, block) > 1 else None


def weight_scale(kind: str, scale: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 block_size: int | None = None) -> torch.Tensor:
    """The step of every entry of a ``kind`` layer's weight of ``shape``, broadcastable to it:
    ``scale [out]`` on axis 0 (``[out, 1, ...]``), on axis 1 for a ConvTranspose2d
    (``[1, out, 1, 1]``); per-block ``scale [out, blocks]`` repeated over each block's
    ``block_size`` columns (the last block may be short), ``shape``. Differentiable in ``scale``."""
    if block_size is not None:
        return column_scales(scale, math.prod(shape[1:]), block_size).reshape(shape)
    axis = 1 if kind == "conv_transpose" else 0
    view = [1] * len(shape)
    view[axis] = -1
    return scale.reshape(view)


def weight_rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A ``kind`` layer's weight (or codes) as rows ``[out, cols]``, one per output channel, in
    the solver's column order: a ConvTranspose2d's are its equivalent conv's
    (:func:`~fqexport.quant.hessian.conv_transpose_rows`), the others' ``weight.reshape(out, -1)``."""
    return conv_transpose_rows(weight) if kind == "conv_transpose" else as_rows(weight)


def rows_to_weight(kind: str, rows: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`weight_rows`: rows back to the layer's weight layout ``shape``."""
    return conv_transpose_weight(rows, shape) if kind == "conv_transpose" else rows.reshape(shape)


@dataclass
class QuantizedLayer:
    """A quantized Conv/Linear layer: integer codes and per-output-channel scales.

    The dequantized weight is ``codes * scale[:, None, ...]``; ``codes`` has the weight's shape.
    A ConvTranspose2d (``kind="conv_transpose"``, weight ``[C_in, C_out, kh, kw]``) has its
    output channels on axis 1: ``codes * scale[None, :, None, None]``.
    With ``block_size`` (a Linear stored as MatMulNBits, :func:`scale_block_size`), ``scale`` is
    ``[out, blocks]``: ``codes[:, j]`` uses ``scale[:, j // block_size]``.
    """

    name: str
    kind: str
    bits: int
    qmax: int
    codes: torch.Tensor  # int8
    scale: torch.Tensor  # float32 [out], or [out, blocks] with block_size
    params: int
    macs: int = 0
    block_size: int | None = None

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * weight_scale(self.kind, self.scale, self.codes.shape, self.block_size)

    def storage(self, mode: str) -> str:
        """Container of this layer's codes under storage ``mode``.

        ``"int8"``: an int8 container for every layer. ``"auto"`` and ``"packed"``: the narrowest
        container — 2-bit codes in INT2, 3-4-bit codes in INT4, both behind a ``Cast`` to int8
        that ONNX Runtime constant-folds at load, so the weight reaches its QDQ fusion as int8
        and the layer runs the same fused integer kernel (QLinearConv / QGemm /
        MatMulIntegerToFloat) as an int8 container, bit for bit, from a 2-4x smaller file;
        3-4-bit Linears as ``"nbits"`` (ORT's MatMulNBits, per-block scales). ``"auto"`` keeps
        a Linear over tokens (``[B, T, K]`` input) out of MatMulNBits (the exporter stores it
        INT4 + Cast): MatMulNBits runs at fp32 speed there, the int8 kernel 3-8x faster.
        """
        return layer_container(self.kind, self.bits, mode, token_linear(self.kind, self.macs, self.codes.numel()))


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
        #    A layer with per-block scales goes to MatMulNBits, which adds its bias in float.
        round_biases_to_int32_grid(
            self.reference, {n: l.scale for n, l in self.layers.items() if l.block_size is None})
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
