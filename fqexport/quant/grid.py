"""The quantization grid: pure functions from tensors to tensors (no hooks, no I/O).

Weights: per output channel, integer codes q in [qmin, qmax], w ≈ s_c · q. Symmetric
(qmin = -qmax) at 3..8 bits; at 2 bits the codes use all four levels of two's complement,
q ∈ {-2, -1, 0, 1}, and the row's scale carries a sign: s_c > 0 puts the extra level on the
negative side, s_c < 0 on the positive side (whichever side holds the row's largest |w|).
A ternary grid {-1, 0, 1} would waste a quarter of the 2-bit codes.
Activations: asymmetric uint8 per tensor, x ≈ s · (q - z), q in [0, 255], range contains 0
(what ONNX Runtime fuses into integer kernels; see ORT-NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqexport.metadata import ACTIVATION_BITS

# Shrink factors tried by the clipping search: s = shrink · max|w_c| / qmax.
DEFAULT_SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5

ACT_QMIN, ACT_QMAX = 0, 2**ACTIVATION_BITS - 1  # uint8: 0..255
_EPS = 1e-12


def weight_qmax(bits: int, weight_range: str = "x86-safe") -> int:
    """Largest code magnitude for a ``bits``-wide symmetric weight grid.

    8-bit weights in ``"x86-safe"`` range stay within |q| <= 63: u8 activations (<= 255) times
    such weights cannot saturate the 16-bit pair sums of AVX2 u8×s8 kernels (2·255·63 < 2¹⁵).
    """
    if bits == 8 and weight_range == "x86-safe":
        return 63
    return 2 ** (bits - 1) - 1


def weight_qmin(bits: int, weight_range: str = "x86-safe") -> int:
    """Smallest code of a ``bits``-wide weight grid: ``-2`` at 2 bits (four levels with a signed
    per-row scale), ``-qmax`` otherwise."""
    return -2 if bits == 2 else -weight_qmax(bits, weight_range)


@dataclass(frozen=True)
class WeightGrid:
    """Per-output-channel grid: ``scale`` has one entry per row of the weight, codes lie in
    ``[qmin, qmax]`` (``qmin`` defaults to ``-qmax``; with ``qmin < -qmax`` a row's scale may be
    negative, which mirrors its levels)."""

    scale: torch.Tensor  # [C], float32, != 0
    qmax: int
    low: int | None = None

    @property
    def qmin(self) -> int:
        return -self.qmax if self.low is None else int(self.low)


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """View a Conv/Linear weight as ``[out, in·kh·kw]``."""
    return weight.reshape(weight.shape[0], -1)


def quantize(w: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s), qmin, qmax)`` (``qmin`` defaults to ``-qmax``);
    ``scale`` broadcasts over rows."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), -qmax if qmin is None else qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s_c · q``."""
    return q * scale.reshape(-1, *([1] * (q.dim() - 1)))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None) -> torch.Tensor:
    """Round trip onto the grid: ``s · clamp(round(w/s), qmin, qmax)``."""
    return dequantize(quantize(w, scale, qmax, qmin), scale)


def choose_weight_grid(
    weight: torch.Tensor,
    bits: int,
    *,
    weight_range: str = "x86-safe",
    clip_search: bool = True,
    column_weight: torch.Tensor | None = None,
    shrinks: tuple[float, ...] = DEFAULT_SHRINKS,
) -> WeightGrid:
    """Per-channel scales, each chosen to minimise its row's quantization error.

    Symmetric grids: for row c and shrink t, s = t · max_j |w_cj| / qmax. Grids with one more
    negative code (2 bits): the row's extreme value e_c (largest |w|, with its sign) maps to
    qmin, s = -t · e_c / |qmin|, and t also runs up to |qmin| / qmax so the search can fall back
    to covering the other side too. The error is ``Σ_j h_cj (w_cj - s·q_cj)²`` with
    ``h = column_weight`` (e.g. diag H): ``[cols]`` shared by every row, or ``[out, cols]`` per
    row (a grouped conv's rows see their conv group's Hessian); 1 when ``None``.
    """
    w = as_rows(weight).float()
    qmax = weight_qmax(bits, weight_range)
    qmin = weight_qmin(bits, weight_range)
    low = None if qmin == -qmax else qmin
    absmax = w.abs().amax(dim=1).clamp_min(_EPS)
    if low is None:
        base = absmax / qmax
    else:
        # s = -e / |qmin| with e the signed extreme: the extra level lands on e's side
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        sign = torch.where(extreme > 0, -1.0, 1.0)
        base = sign * absmax / -qmin
        reach = -qmin / qmax
        shrinks = tuple(shrinks) + tuple(round(1.0 + (reach - 1.0) * i / 8, 4) for i in range(1, 9))
    if not clip_search:
        return WeightGrid(scale=base, qmax=qmax, low=low)
    h = None
    if column_weight is not None:
        h = column_weight.to(w.device, torch.float32)
        h = h.reshape(1, -1) if h.dim() == 1 else h.reshape(w.shape)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = base
    for t in shrinks:
        s = t * base
        err = (w - fake_quantize(w, s, qmax, qmin)).pow(2)
        if h is not None:
            err = err * h
        err = err.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return WeightGrid(scale=best_scale, qmax=qmax, low=low)


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero point) for the range [lo, hi], widened to contain 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        return 1e-8 if hi == lo else (hi - lo) / ACT_QMAX, 0
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    zero_point = int(round(ACT_QMIN - lo / scale))
    return scale, max(ACT_QMIN, min(ACT_QMAX, zero_point))


def fake_quantize_act(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``s · (clamp(round(x/s) + z, 0, 255) - z)``, the math of QuantizeLinear→DequantizeLinear."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)
