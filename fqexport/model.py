"""The result of compression: quantized layers and the compressed model that exports them."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx

from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.graph.act_quant import INT32_MAX, bias_input_scales, round_biases_to_int32_grid, rounding_jitter
from fqexport.graph.prepare import all_float_layers, count_macs, recurrent_op_layers
from fqexport.metadata import FLOAT_BITS, ExportMetadata, LayerRecord
from fqexport.quant.grid import as_rows, column_scales
from fqexport.quant.hessian import conv_transpose_rows, conv_transpose_weight
from fqexport.quant.layout import LayerLayout, container_bytes, nbits_block_size
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification

log = logging.getLogger(__name__)

MSG_WIDER_STEP = (
    "layer %r: %d output channel(s) (%s) have a bias past half of int32 on ONNX Runtime's integer grid (input scale x "
    "weight scale): their weight step is widened (up to %.3gx) so that it fits, as onnxruntime's quantizer does; "
    "their weights are then coarser (a near-dead BatchNorm channel: weights ~0, so nothing is lost)"
)

# the float layers whose multiply-accumulates count_macs knows
MAC_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.RNNBase)  # Conv/ConvTranspose 1-3 d


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
    """A quantized Conv/Linear layer: integer codes, per-output-channel scales and the
    container the file stores them in (decided once, :func:`fqexport.quant.layout.layer_layout`).

    The dequantized weight is ``codes * scale[:, None, ...]``; ``codes`` has the weight's shape.
    A ConvTranspose2d (``kind="conv_transpose"``, weight ``[C_in, C_out, kh, kw]``) has its
    output channels on axis 1: ``codes * scale[None, :, None, None]``.
    With ``block_size`` (a Linear stored as MatMulNBits), ``scale`` is ``[out, blocks]``:
    ``codes[:, j]`` uses ``scale[:, j // block_size]``.
    """

    name: str
    kind: str
    bits: int
    qmax: int
    codes: torch.Tensor  # int8
    scale: torch.Tensor  # float32 [out], or [out, blocks] with block_size
    params: int
    container: str  # int8 | int4 | int2 | nbits | int4-blocked: what the exporter writes
    macs: int = 0
    block_size: int | None = None

    def __post_init__(self) -> None:
        self.layout.check(self.name)

    @property
    def layout(self) -> LayerLayout:
        return LayerLayout(self.container, self.block_size)

    @property
    def qmin(self) -> int:
        """Smallest code of the grid: -2 at 2 bits (signed per-row step), else -qmax."""
        return -2 if self.bits == 2 else -self.qmax

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * weight_scale(self.kind, self.scale, self.codes.shape, self.block_size)


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
        task: what the model does (:mod:`fqexport.tasks`): its output, metric and export check.
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
    task: Task = field(default_factory=Classification)

    def _widen_steps_for_int32_biases(self) -> None:
        """Widen the weight step of every output channel whose bias, on ORT's int32 grid
        ``s_x·s_w``, would pass half of int32: ``|s_w| ≥ |b| / (s_x · 2³⁰)``, its codes rounded again
        onto the wider step and the reference's weight made their dequantized values (said)."""
        per_channel = {n: l for n, l in self.layers.items() if l.block_size is None}
        modules = dict(self.reference.named_modules())
        for name, (bias, s_x) in bias_input_scales(self.reference, per_channel).items():
            q = per_channel[name]
            old = q.scale.detach().float().cpu()
            # the smallest step that holds the bias in half of int32: the other half holds Σ x·w, which
            # ORT adds to it in the same int32 accumulator (a bias near 2³¹ wrapped around there)
            need = bias.abs() / (s_x * (INT32_MAX // 2)) * (1 + 1e-6)
            grow = need > old.abs()
            if not s_x > 0 or not bool(grow.any()):
                continue
            new = torch.where(grow, need * torch.where(old < 0, -1.0, 1.0), old)
            ratio = weight_scale(q.kind, old / new, q.codes.shape)
            q.codes = torch.round(q.codes.float() * ratio).clamp(q.qmin, q.qmax).to(q.codes.dtype)
            q.scale = new.to(q.scale.dtype)
            with torch.no_grad():
                modules[name].weight.copy_(q.dequantized().to(modules[name].weight.dtype))
            channels = torch.nonzero(grow).flatten().tolist()
            log.warning(MSG_WIDER_STEP, name, len(channels), ", ".join(map(str, channels[:5])) + (" ..." if len(channels) > 5 else ""),
                        float((new.abs() / old.abs().clamp_min(1e-30))[grow].max()))

    def __post_init__(self) -> None:
        # 1. Biases on ORT's int32 grid (s_x·s_w[c]): the reference then computes what the
        #    optimized session computes (ORT-NOTES: "Float conv biases become int32").
        #    A layer with per-block scales goes to MatMulNBits, which adds its bias in float.
        #    A channel whose bias would pass int32 on that grid gets a wider weight step first, as
        #    ONNX Runtime's own quantizer does (a near-dead BatchNorm channel: weights ~0, bias 0.5).
        self._widen_steps_for_int32_biases()
        round_biases_to_int32_grid(
            self.reference, {n: l.scale for n, l in self.layers.items() if l.block_size is None})
        # 2. Weight layers left in float (unsupported, or kept by keep_float), counted at 32
        #    bits beside the quantized ones.
        #    A layer both unsupported and named by keep_float is counted once, as kept by it.
        left = {f.name: f for f in all_float_layers(self.reference, tuple(self.config.keep_float))
                if f.name not in self.layers}
        macs = self._float_macs(list(left))
        floats = tuple(
            LayerRecord(f.name, f.kind, FLOAT_BITS, f.params, macs.get(f.name, 0), storage="float32", reason=f.reason)
            for f in left.values()
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
    def stored_weight_bits(self) -> float:
        """Bits per weight the written file stores, scales and zero points included, in each
        layer's container (:func:`~fqexport.quant.layout.container_bytes`), weight layers left in
        float at 32 bits: what a ``budget_bits`` budget counts (the allocation's ``stored_bits``
        leaves the float layers out)."""
        q = sum(l.params for l in self.layers.values())
        f = sum(l.params for l in self.metadata.float_layers)
        stored = sum(8 * container_bytes(l.container, l.params, l.scale.shape[0], l.kind,
                                         l.block_size or nbits_block_size(l.params // max(l.scale.shape[0], 1)))
                     for l in self.layers.values())
        return (stored + FLOAT_BITS * f) / max(q + f, 1)

    @property
    def quantized_fraction(self) -> float:
        """Fraction of the weight parameters (weight layers) that are quantized."""
        return self.quantized_fraction_of(self.metadata.float_layers)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per quantized layer (name, kind, module, bits, params, MACs, storage), then one
        per weight layer left in float (bits 32, storage ``float32``, ``reason``: unsupported or
        the ``keep_float`` pattern). ``kind`` is the solver's family of a quantized layer
        (``conv``, ``linear``, ...) and the module type of a float one; ``module`` is the module
        type of every row (``Conv2d``, ``LSTM``, ``F.linear``)."""
        modules = dict(self.float_model.named_modules())
        rows = [
            {"name": l.name, "kind": l.kind, "module": type(modules[l.name]).__name__ if l.name in modules else l.kind,
             "bits": l.bits, "params": l.params, "macs": l.macs, "storage": l.container, "reason": ""}
            for l in self.layers.values()
        ]
        return rows + [
            {"name": f.name, "kind": f.kind, "module": f.kind, "bits": f.bits, "params": f.params, "macs": f.macs,
             "storage": "float32", "reason": f.reason or "unsupported"}
            for f in self.metadata.float_layers
        ]

    def _float_macs(self, names: list[str]) -> dict[str, int]:
        """Multiply-accumulates per sample of the float layers ``names`` that are Conv/Linear/RNN
        modules of the reference or a .pt2 program's recurrent ops (``aten.gru``: no module runs
        them), on one calibration sample (others: 0, as an Embedding's)."""
        modules, ops = dict(self.reference.named_modules()), recurrent_op_layers(self.reference)
        names = [n for n in names if isinstance(modules.get(n), MAC_MODULES) or n in ops]
        if not names or self.calib is None or not len(self.calib.x):
            return {}
        with torch.no_grad():
            return count_macs(self.reference, torch.from_numpy(np.ascontiguousarray(self.calib.x[:1])), names)

    def predict(self, x: np.ndarray, batch_size: int = 256, quantized: bool = True, jitter: float = 0.0) -> np.ndarray:
        """Outputs (a classifier's logits) of the fake-quant reference (or the float model) on ``x``.
        ``jitter``: move every activation by up to ± that many quantization steps before it rounds
        (:func:`~fqexport.graph.act_quant.rounding_jitter`; the export check's near-tie test)."""
        model = self.reference if quantized else self.float_model
        outs = []
        shaken = rounding_jitter(model, jitter) if jitter else contextlib.nullcontext(model)
        with torch.no_grad(), shaken as model:
            for start in range(0, len(x), batch_size):
                outs.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)
