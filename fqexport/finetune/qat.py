"""Learnable fake quantization for fine-tuning (LSQ, Esser et al. 2020), on the export's grids.

Weights, per scale c of the layer — its output channel (axis 0; axis 1 of a ConvTranspose2d),
or (row, block) for a Linear with per-block scales (``QuantizedLayer.block_size``): latent u (in
units of the PTQ step s0_c), step s_c = s0_c · r_c with a learnable ratio r_c > 0, and

    w_q = s_c · clamp(round(s0_c · u / s_c), qmin, qmax)

with straight-through rounding: d round(v)/dv := 1 inside the clamp. The codes stay inside the
layer's grid all along ([-63, 63] for x86-safe 8 bits, {-2, -1, 0, 1} with a signed step at 2
bits), so what training sees is exactly what the export stores. The step's gradient is LSQ's,
scaled by g = 1/sqrt(n · qmax) (n: weights per scale) so that steps and weights learn at a
comparable pace. Activations: the PTQ zero point z stays, the step s = s0 · r is learned,
x_q = s · clamp(round(x/s), qmin - z, qmax - z) with the quantizer's codes ([0, 255], or
[-128, 127] with z = 0 for the GPU's symmetric int8) — the math of the ``ActQuantizer`` it replaces.

Everything starts at the PTQ solution (u = codes, r = 1), so the untrained student computes
what the PTQ reference computes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Callable, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fqexport.config import ExportSpec
from fqexport.finetune.baq import clip_shrinks, interpolated_weight
from fqexport.graph.act_quant import ActQuantizer
from fqexport.model import QuantizedLayer, rows_to_weight, weight_rows, weight_scale
from fqexport.quant.grid import choose_weight_grid, layer_weight_range, quantize
from fqexport.quant.layout import layer_layout

_MIN_RATIO = 1e-3


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """``round(v)`` forward, identity backward (straight-through)."""
    return (torch.round(v) - v).detach() + v


def grad_scale(v: torch.Tensor, g: float) -> torch.Tensor:
    """``v`` forward, gradient multiplied by ``g`` backward (LSQ's step-size gradient scale)."""
    return (v - v * g).detach() + v * g


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``step · clamp(round_ste(x / step), qmin, qmax)``; ``step`` broadcasts against ``x``."""
    return torch.clamp(round_ste(x / step), qmin, qmax) * step


def _layer_op(module: nn.Module, kind: str, name: str) -> Callable[..., torch.Tensor]:
    """``op(x, weight, bias)``: what ``module`` computes with another weight and bias."""
    if kind == "embedding":
        idx, freq = module.padding_idx, module.scale_grad_by_freq
        return lambda x, w, b: F.embedding(x, w, idx, scale_grad_by_freq=freq)
    if kind == "linear":
        return F.linear
    if module.padding_mode != "zeros":
        raise ValueError(f"layer '{name}': padding_mode={module.padding_mode!r} is not supported")
    args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    if kind == "conv_transpose":
        args["output_padding"] = module.output_padding
        return lambda x, w, b: F.conv_transpose2d(x, w, b, **args)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return lambda x, w, b: conv(x, w, b, **args)


class LearnableWeight(nn.Module):
    """A quantized layer (any ``QuantizedLayer.kind``: Conv1d/Conv2d, ConvTranspose2d, Linear,
    Embedding) whose weight codes and steps are learned.

    Built from the PTQ reference's module (its bias, stride, padding, groups, ...) and the
    layer's codes and scales: one learned ratio per scale — per output channel, or per (row,
    block) for a Linear with per-block scales — broadcast onto the weight by
    :func:`fqexport.model.weight_scale`. ``s0`` is the PTQ step of every weight entry
    (broadcastable to the weight). ``codes()`` / ``scale()`` give what is written back, in the
    layer's shapes.
    """

    def __init__(self, module: nn.Module, layer: QuantizedLayer) -> None:
        super().__init__()
        self.kind, self.block_size = layer.kind, layer.block_size
        self.shape = tuple(layer.codes.shape)
        self.op = _layer_op(module, layer.kind, layer.name)
        self.qmin, self.qmax = layer.qmin, int(layer.qmax)
        self.bits = int(layer.bits)
        self.bit: nn.Parameter | None = None  # BAQ's continuous width (see learn_bits)
        scale0 = layer.scale.detach().float().clone()
        self.register_buffer("scale0", scale0)  # the layer's scales, its shape
        self.register_buffer("s0", self._broadcast(scale0))
        self.latent = nn.Parameter(layer.codes.detach().float().clone())
        self.ratio = nn.Parameter(torch.ones_like(scale0))
        self.bias: nn.Parameter | None = None
        if layer.kind != "embedding":
            out = scale0.shape[0]
            bias = module.bias.detach().clone() if module.bias is not None else torch.zeros(out)
            self.bias = nn.Parameter(bias.float())
        per_step = layer.codes.numel() // max(scale0.numel(), 1)
        self.g = 1.0 / math.sqrt(per_step * max(self.qmax, 1))

    def _broadcast(self, scale: torch.Tensor) -> torch.Tensor:
        return weight_scale(self.kind, scale, self.shape, self.block_size)

    def step(self) -> torch.Tensor:
        return self.s0 * self._broadcast(grad_scale(self.ratio, self.g).clamp_min(_MIN_RATIO))

    def _trained_step(self) -> torch.Tensor:
        return self.s0 * self._broadcast(self.ratio.clamp_min(_MIN_RATIO))

    def learn_bits(self, widths: tuple[int, ...], weight_range: str) -> nn.Parameter:
        """Switch to BAQ: a continuous width (starting at the layer's width, clamped to
        ``widths``) interpolating between neighbouring integer grids; returns the parameter.
        The other widths' grids are per output channel (the rows of :func:`weight_rows`)."""
        start = min(max(float(self.bits), min(widths)), max(widths))
        self.bit = nn.Parameter(torch.tensor(start, device=self.latent.device))
        self.widths, self.weight_range = tuple(widths), weight_range
        w0 = weight_rows(self.kind, (self.s0 * self.latent).detach())
        self.shrinks = {int(k): clip_shrinks(w0, int(k), weight_range) for k in widths if int(k) != self.bits}
        return self.bit

    def weight(self) -> torch.Tensor:
        if self.bit is not None:
            rows = interpolated_weight(weight_rows(self.kind, self.s0 * self.latent), self.bit, self.widths,
                                       self.weight_range, self.shrinks,
                                       (self.bits, lambda: weight_rows(self.kind, self._own_weight())))
            return rows_to_weight(self.kind, rows, self.shape)
        return self._own_weight()

    def _own_weight(self) -> torch.Tensor:
        return lsq_fake_quant(self.s0 * self.latent, self.step(), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight(), self.bias)

    def dampening(self) -> torch.Tensor:
        """Oscillation dampening (Nagel et al. 2022): Σ (v_c − sg(round(v_c)))² with
        v_c = clamp(w / s, qmin, qmax) — each latent weight's distance to its grid point in
        units of the step, clipped weights not counted; gradient only into the latent weights."""
        v = torch.clamp(self.s0 * self.latent / self.step().detach(), self.qmin, self.qmax)
        return (v - torch.round(v).detach()).pow(2).sum()

    @torch.no_grad()
    def trained_weight(self) -> torch.Tensor:
        """The weight the network computes with (weight shape): s · clamp(round(w / s), qmin, qmax),
        the dequantized codes, which training saw in every forward (LSQ's straight-through rounding)."""
        return (self._trained_step() * self.codes().float()).detach()

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Integer codes (int8, weight shape) of the current weight."""
        step = self._trained_step()
        return torch.clamp(torch.round(self.s0 * self.latent / step), self.qmin, self.qmax).to(torch.int8)

    @torch.no_grad()
    def scale(self) -> torch.Tensor:
        """The learned steps in the layer's scale shape (float32 ``[out]``, or ``[out, blocks]``
        with per-block scales; signed like the PTQ steps)."""
        return (self.scale0 * self.ratio.clamp_min(_MIN_RATIO)).float()


class LearnableActQuant(nn.Module):
    """Per-tensor fake quantization (the quantizer's uint8 or symmetric int8 codes) with a learned
    step and the PTQ zero point."""

    def __init__(self, quantizer: ActQuantizer, learn: bool = True) -> None:
        super().__init__()
        self.zero_point = int(quantizer.zero_point)
        self.qmin, self.qmax = quantizer.codes
        self.register_buffer("s0", torch.tensor(float(quantizer.scale), dtype=torch.float32))
        self.ratio = nn.Parameter(torch.ones(()), requires_grad=learn)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(max(x[0].numel(), 1) * self.qmax)
        return self.s0 * grad_scale(self.ratio, g).clamp_min(_MIN_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lsq_fake_quant(x, self.step(x), self.qmin - self.zero_point, self.qmax - self.zero_point)

    @torch.no_grad()
    def scale(self) -> float:
        return float(self.s0 * self.ratio.clamp_min(_MIN_RATIO))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_student(
    reference: torch.fx.GraphModule, layers: dict[str, QuantizedLayer], learn_act_scales: bool = True,
) -> tuple[torch.fx.GraphModule, dict[str, LearnableWeight], dict[str, LearnableActQuant]]:
    """A trainable copy of the PTQ reference: quantized layers become ``LearnableWeight``s and
    activation quantizers ``LearnableActQuant``s (the graph's calls resolve by module name)."""
    student = copy.deepcopy(reference)
    weights: dict[str, LearnableWeight] = {}
    acts: dict[str, LearnableActQuant] = {}
    for name, layer in layers.items():
        weights[name] = LearnableWeight(student.get_submodule(name), layer)
        _set_submodule(student, name, weights[name])
    for name, module in list(student.named_modules()):
        if isinstance(module, ActQuantizer):
            acts[name] = LearnableActQuant(module, learn=learn_act_scales)
            _set_submodule(student, name, acts[name])
    for p in student.parameters():
        p.requires_grad_(False)
    for m in weights.values():
        for p in m.parameters():
            p.requires_grad_(True)
    if learn_act_scales:
        for m in acts.values():
            m.ratio.requires_grad_(True)
    return student, weights, acts


@torch.no_grad()
def requantize(learned: LearnableWeight, layer: QuantizedLayer, bits: int, weight_range: str,
               export: ExportSpec = ExportSpec(), source: torch.Tensor | None = None) -> QuantizedLayer:
    """``layer`` with the trained weights of ``learned`` (its dequantized codes,
    :meth:`LearnableWeight.trained_weight`; or ``source``, a weight of the layer's shape) rounded
    onto a fresh ``bits``-wide grid (per output channel — per block where the layout rule gives the
    layer per-block scales for ``export``, :func:`fqexport.quant.layout.layer_layout` — clipping
    search, round to nearest; no training at that width); its container decided by the same rule.
    The trained weights, not the latent ones: the network was trained, and its hold-out measured,
    on the rounded codes; latent weights a fraction of a step away from them (a first conv's 432
    weights, 2 % off) made the 8-bit file 16 points worse than the 3-bit one it came from."""
    weight = learned.trained_weight() if source is None else source
    rows = weight_rows(layer.kind, weight.detach().cpu().float())
    layout = layer_layout(layer.kind, int(bits), export, rows.shape[1], layer.macs, layer.codes.numel())
    grid = choose_weight_grid(rows, bits, weight_range=layer_weight_range(layer.kind, weight_range), clip_search=True,
                              block=layout.block_size)
    codes = quantize(rows, grid.column_scales(rows.shape[1]), grid.qmax, grid.qmin)
    codes = rows_to_weight(layer.kind, codes, layer.codes.shape).to(torch.int8)
    return replace(layer, bits=int(bits), qmax=int(grid.qmax), codes=codes, scale=grid.scale.float(),
                   container=layout.container, block_size=grid.block)


@torch.no_grad()
def write_back(
    reference: torch.fx.GraphModule,
    layers: dict[str, QuantizedLayer],
    weights: dict[str, LearnableWeight],
    acts: dict[str, LearnableActQuant],
    bits: int | Mapping[str, int] | None = None,
    weight_range: str = "x86-safe",
    export: ExportSpec = ExportSpec(),
    sources: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.fx.GraphModule, dict[str, QuantizedLayer]]:
    """A new PTQ-style reference and layer table holding the learned codes, steps, biases and
    activation steps (the export path reads exactly these). With ``bits`` (other than a layer's
    trained width) the layer's latent weights — or its weight in ``sources`` — are re-quantized at
    that width instead."""
    new_ref = copy.deepcopy(reference)
    new_layers: dict[str, QuantizedLayer] = {}
    for name, layer in layers.items():
        learned = weights[name]
        width = bits.get(name) if isinstance(bits, Mapping) else bits
        if width is None or int(width) == layer.bits:
            new = replace(layer, codes=learned.codes().cpu(), scale=learned.scale().cpu())
        else:
            new = requantize(learned, layer, int(width), weight_range, export, (sources or {}).get(name))
        module = new_ref.get_submodule(name)
        module.weight.copy_(new.dequantized().to(module.weight.dtype))
        if learned.bias is not None:  # an Embedding has none
            bias = learned.bias.detach().cpu()
            if module.bias is None:
                module.bias = nn.Parameter(bias.to(module.weight.dtype))
            else:
                module.bias.copy_(bias.to(module.bias.dtype))
        new_layers[name] = new
    for name, act in acts.items():
        quantizer = new_ref.get_submodule(name)
        quantizer.scale = act.scale()
        quantizer.zero_point = act.zero_point
    return new_ref.eval(), new_layers
