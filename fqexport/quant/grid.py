"""The quantization grid: pure functions from tensors to tensors (no hooks, no I/O).

Weights: per output channel, integer codes q in [qmin, qmax], w ≈ s_c · q. Symmetric
(qmin = -qmax) at 3..8 bits; at 2 bits the codes use all four levels of two's complement,
q ∈ {-2, -1, 0, 1}, and the row's scale carries a sign: s_c > 0 puts the extra level on the
negative side, s_c < 0 on the positive side (whichever side holds the row's largest |w|).
A ternary grid {-1, 0, 1} would waste a quarter of the 2-bit codes.
Activations: asymmetric uint8 per tensor, x ≈ s · (q - z), q in [0, 255], range contains 0
(what ONNX Runtime fuses into integer kernels on CPUs; see ORT-NOTES.md); or, for a GPU target,
symmetric int8, x ≈ s · q, z = 0, s = max|x| / 127, q in [-128, 127] (what TensorRT's importer
and ORT's CUDA EP accept: S8S8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqexport.metadata import ACTIVATION_BITS

# Shrink factors tried by the clipping search: s = shrink · max|w_c| / qmax.
DEFAULT_SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5

ACT_QMIN, ACT_QMAX = 0, 2**ACTIVATION_BITS - 1  # uint8: 0..255
# Symmetric int8 (zero point 0): codes -128..127 (QuantizeLinear's saturation), the calibrated
# range max|x| maps to 127.
ACT_SYM_QMIN, ACT_SYM_QMAX = -(2 ** (ACTIVATION_BITS - 1)), 2 ** (ACTIVATION_BITS - 1) - 1
_EPS = 1e-12


def weight_qmax(bits: int, weight_range: str = "x86-safe") -> int:
    """Largest code magnitude for a ``bits``-wide symmetric weight grid.

    8-bit weights in ``"x86-safe"`` range stay within |q| <= 63: u8 activations (<= 255) times
    such weights cannot saturate the 16-bit pair sums of AVX2 u8×s8 kernels (2·255·63 < 2¹⁵).
    """
    if bits == 8 and weight_range == "x86-safe":
        return 63
    return 2 ** (bits - 1) - 1


def layer_weight_range(kind: str, weight_range: str) -> str:
    """The range a layer of ``kind`` is quantized in: an Embedding's table is dequantized and looked
    up, never summed by an integer kernel, so the x86-safe range (±63, against AVX2's 16-bit pair
    sums) would only halve its 8-bit grid: ``"full"``; every other layer: ``weight_range``."""
    return "full" if kind == "embedding" else weight_range


def weight_qmin(bits: int, weight_range: str = "x86-safe") -> int:
    """Smallest code of a ``bits``-wide weight grid: ``-2`` at 2 bits (four levels with a signed
    per-row scale), ``-qmax`` otherwise."""
    return -2 if bits == 2 else -weight_qmax(bits, weight_range)


@dataclass(frozen=True)
class WeightGrid:
    """Per-output-channel grid: ``scale`` has one entry per row of the weight, codes lie in
    ``[qmin, qmax]`` (``qmin`` defaults to ``-qmax``; with ``qmin < -qmax`` a row's scale may be
    negative, which mirrors its levels).

    With ``block`` (GPTQ's groupsize; MatMulNBits' ``block_size``): ``scale`` is ``[C, blocks]``,
    one scale per row and block of ``block`` consecutive columns (the last block may be short).
    """

    scale: torch.Tensor  # [C] (or [C, blocks] with block), float32, != 0
    qmax: int
    low: int | None = None
    block: int | None = None

    @property
    def qmin(self) -> int:
        return -self.qmax if self.low is None else int(self.low)

    def column_scales(self, cols: int) -> torch.Tensor:
        """The scale of every weight entry of a ``[C, cols]`` weight, broadcastable: ``[C, 1]``
        per row, ``[C, cols]`` per block."""
        return column_scales(self.scale, cols, self.block)


def num_blocks(cols: int, block: int) -> int:
    """Blocks of ``block`` columns that cover ``cols`` columns."""
    return -(-cols // block)


def column_scales(scale: torch.Tensor, cols: int, block: int | None) -> torch.Tensor:
    """Per-row ``scale [C]`` as ``[C, 1]``; per-block ``scale [C, blocks]`` repeated over each
    block's columns, ``[C, cols]``."""
    if block is None:
        return scale.reshape(-1, 1)
    return scale.repeat_interleave(block, dim=1)[:, :cols]


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """View a Conv/Linear weight as ``[out, in·kh·kw]``."""
    return weight.reshape(weight.shape[0], -1)


def quantize(w: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s), qmin, qmax)`` (``qmin`` defaults to ``-qmax``);
    ``scale [C]`` broadcasts over rows; a ``scale`` with ``w``'s number of dimensions (e.g.
    :func:`column_scales`) is used as it is."""
    s = scale if scale.dim() == w.dim() else scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), -qmax if qmin is None else qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``s_c · q`` (per row); with ``block``, ``q [C, cols]`` and ``scale [C, blocks]``:
    ``s_{c, j // block} · q_cj``."""
    if block is not None:
        return q * column_scales(scale, q.shape[1], block)
    return q * (scale if scale.dim() == q.dim() else scale.reshape(-1, *([1] * (q.dim() - 1))))


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
    block: int | None = None,
) -> WeightGrid:
    """Per-channel scales, each chosen to minimise its row's quantization error.

    With ``block``: one scale per row and block of ``block`` columns (``[C, blocks]``), each
    block searched like a row of its own (GPTQ's groupsize; ORT MatMulNBits' blocks).

    Symmetric grids: for row c and shrink t, s = t · max_j |w_cj| / qmax. Grids with one more
    negative code (2 bits): the row's extreme value e_c (largest |w|, with its sign) maps to
    qmin, s = -t · e_c / |qmin|, and t also runs up to |qmin| / qmax so the search can fall back
    to covering the other side too. The error is ``Σ_j h_cj (w_cj - s·q_cj)²`` with
    ``h = column_weight`` (e.g. diag H): ``[cols]`` shared by every row, or ``[out, cols]`` per
    row (a grouped conv's rows see their conv group's Hessian); 1 when ``None``.
    """
    if block is not None:
        return _block_grid(as_rows(weight).float(), bits, block, weight_range=weight_range,
                           clip_search=clip_search, column_weight=column_weight, shrinks=shrinks)
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


def _block_grid(
    w: torch.Tensor, bits: int, block: int, *, weight_range: str, clip_search: bool,
    column_weight: torch.Tensor | None, shrinks: tuple[float, ...],
) -> WeightGrid:
    """Per-(row, block) grid of ``w [C, cols]``: each block of a row searched as a row of
    ``[C·blocks, block]`` (the columns padded with zeros of weight 0)."""
    c, cols = w.shape
    nb = num_blocks(cols, block)
    pad = nb * block - cols
    wb = torch.nn.functional.pad(w, (0, pad)).reshape(c * nb, block)
    h = None
    if column_weight is not None:
        h = column_weight.to(w.device, torch.float32)
        h = h.reshape(1, -1).expand(c, cols) if h.dim() == 1 else h.reshape(c, cols)
        h = torch.nn.functional.pad(h, (0, pad)).reshape(c * nb, block)
    g = choose_weight_grid(wb, bits, weight_range=weight_range, clip_search=clip_search,
                           column_weight=h, shrinks=shrinks)
    return WeightGrid(scale=g.scale.reshape(c, nb), qmax=g.qmax, low=g.low, block=block)


def act_qparams(lo: float, hi: float, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero point) for the range [lo, hi], widened to contain 0: uint8 asymmetric, or with
    ``symmetric`` int8 with zero point 0 and ``scale = max(|lo|, |hi|) / 127``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    # a range under 1e-8 (a dead ReLU, constant-zero inputs): scale 1, as ORT's quantizer gives it;
    # a tiny scale put the next layer's int32 bias (steps of s_x·s_w) beyond int32 in ORT's kernels
    if symmetric:
        top = max(-lo, hi)
        return (top / ACT_SYM_QMAX if top >= 1e-8 else 1.0), 0
    if hi - lo < 1e-8:
        return 1.0, 0
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    zero_point = int(round(ACT_QMIN - lo / scale))
    return scale, max(ACT_QMIN, min(ACT_QMAX, zero_point))


def act_code_range(symmetric: bool = False) -> tuple[int, int]:
    """The activation codes' ``(qmin, qmax)``: uint8 ``(0, 255)``, symmetric int8 ``(-128, 127)``."""
    return (ACT_SYM_QMIN, ACT_SYM_QMAX) if symmetric else (ACT_QMIN, ACT_QMAX)


def fake_quantize_act(x: torch.Tensor, scale: float, zero_point: int, symmetric: bool = False) -> torch.Tensor:
    """``s · (clamp(round(x/s) + z, qmin, qmax) - z)`` on the codes of :func:`act_code_range`, the
    math of QuantizeLinear→DequantizeLinear."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, *act_code_range(symmetric))
