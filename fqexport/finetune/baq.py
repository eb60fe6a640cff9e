"""Learnable bit widths (BAQ): a continuous width per layer, a quantizer that interpolates
between neighbouring integer widths, the budget and fairness regularisers, and the projection
onto the budget (pure tensor math + the allocator's knapsack).

For layer l with continuous width b_l in [w_min, w_max] of the candidate widths W, let
lo ≤ b_l ≤ hi be its neighbours in W and α = (b_l − lo) / (hi − lo). With the latent float
weights w and Q_k(w) = s_k · clamp(round_ste(w / s_k), qmin_k, qmax_k) (s_k: per-channel
step of a k-bit grid, the 2-bit grid signed as in ``fqexport.quant.grid``):

    w_b = (1 − α) · Q_lo(w) + α · Q_hi(w),   ∂w_b/∂b_l = (Q_hi(w) − Q_lo(w)) / (hi − lo).

s_k = t_k · (max-abs step of w), with t_k per channel the clipping search's shrink
(``clip_shrinks``), found once on the start weights — the clipping the export's re-quantization
uses, at the cost of a max-abs grid per step. At the layer's own (PTQ) width, Q is the layer's
trained quantizer (``own``: the solver's codes and the learned step), so at b_l = its start width
the student computes exactly the PTQ start, and a layer that keeps its width keeps its grid.

Regularisers: λ_bits · max(0, avg_bits − budget) with avg_bits = Σ_l b_l n_l / Σ_l n_l
(n_l: parameters), and λ_fair · (max_g L_g − mean_g L_g) over the groups in the batch.
Projection: with b'_l the learned widths shifted to average the budget, the integer widths k_l
minimising Σ_l n_l (k_l − b'_l)² subject to
Σ_l n_l k_l ≤ budget · Σ_l n_l — an exact multiple-choice knapsack (``fqexport.quant.knapsack``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from fqexport.quant.grid import as_rows, choose_weight_grid
from fqexport.quant.knapsack import solve_real


def neighbours(b: float, widths: Sequence[int]) -> tuple[int, int]:
    """Consecutive candidate widths ``lo < hi`` with ``lo <= b <= hi`` (``b`` clamped to the
    candidates' range; at a candidate, the interval above it, or below it at the widest), so
    that ``b`` always has a gradient. A single candidate gives ``(w, w)``."""
    ws = sorted({int(w) for w in widths})
    if len(ws) == 1:
        return ws[0], ws[0]
    b = min(max(float(b), ws[0]), ws[-1])
    i = min(max(j for j, w in enumerate(ws) if w <= b), len(ws) - 2)
    return ws[i], ws[i + 1]


def clip_shrinks(w: torch.Tensor, bits: int, weight_range: str = "x86-safe") -> torch.Tensor:
    """Per channel, the clipping search's step over the max-abs step of ``w`` at ``bits`` (``t_k``
    of the module docstring; 1 where no clipping helps)."""
    rows = as_rows(w.detach())
    base = choose_weight_grid(rows, bits, weight_range=weight_range, clip_search=False).scale
    best = choose_weight_grid(rows, bits, weight_range=weight_range, clip_search=True).scale
    return (best / base).abs()


def grid_fake_quant(w: torch.Tensor, bits: int, weight_range: str = "x86-safe",
                    shrink: torch.Tensor | None = None) -> torch.Tensor:
    """``Q_bits(w)`` with a per-channel max-abs step times ``shrink`` (per channel, default 1),
    straight-through."""
    grid = choose_weight_grid(as_rows(w.detach()), bits, weight_range=weight_range, clip_search=False)
    scale = grid.scale if shrink is None else grid.scale * shrink.to(grid.scale)
    step = scale.reshape(-1, *([1] * (w.dim() - 1)))
    v = w / step
    q = torch.clamp((torch.round(v) - v).detach() + v, grid.qmin, grid.qmax)
    return q * step


def interpolated_weight(w: torch.Tensor, b: torch.Tensor, widths: Sequence[int],
                        weight_range: str = "x86-safe", shrinks: Mapping[int, torch.Tensor] | None = None,
                        own: tuple[int, Callable[[], torch.Tensor]] | None = None) -> torch.Tensor:
    """``w_b`` of the module docstring; differentiable in ``w`` (straight-through) and ``b``.

    ``shrinks``: width -> per-channel ``t_k`` (``clip_shrinks``; missing widths use max-abs
    steps). ``own = (width, quantize)``: at that width ``quantize()`` replaces ``Q_width(w)``."""
    lo, hi = neighbours(float(b.detach()), widths)
    shrinks = shrinks or {}

    def q(k: int) -> torch.Tensor:
        if own is not None and k == own[0]:
            return own[1]()
        return grid_fake_quant(w, k, weight_range, shrinks.get(k))

    q_lo = q(lo)
    if hi == lo:
        return q_lo
    q_hi = q(hi)
    alpha = (b.clamp(lo, hi) - lo) / (hi - lo)
    return (1 - alpha) * q_lo + alpha * q_hi


def average_bits(bits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Σ_l b_l n_l / Σ_l n_l."""
    return (bits * params).sum() / params.sum()


def budget_penalty(bits: torch.Tensor, params: torch.Tensor, budget: float) -> torch.Tensor:
    """max(0, avg_bits − budget)."""
    return torch.relu(average_bits(bits, params) - float(budget))


def fairness_penalty(group_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """max_g L_g − mean_g L_g over the groups present."""
    lg = group_losses[present]
    return lg.max() - lg.mean() if lg.numel() else group_losses.sum() * 0.0


def project_to_budget(learned: Mapping[str, float], params: Mapping[str, int], widths: Sequence[int],
                      budget: float) -> dict[str, int]:
    """Integer widths closest to the learned ones whose parameter-weighted average is within
    ``budget``; raises ConfigError (knapsack) when nothing fits.

    The learned widths are read as preferences relative to each other: they are first shifted
    by one constant so that their average is the budget (b'_l = b_l + budget − avg_bits(b); the
    budget penalty is one-sided, so training may end below it), then
    ``min Σ_l n_l (k_l − b'_l)²  s.t.  Σ_l n_l k_l ≤ budget · Σ_l n_l``.
    """
    names = list(learned)
    ws = sorted(int(w) for w in widths)
    total = sum(float(params[n]) for n in names)
    avg = sum(float(params[n]) * float(learned[n]) for n in names) / max(total, 1e-12)
    shift = float(budget) - avg
    costs = [[float(params[n]) * (k - float(learned[n]) - shift) ** 2 for k in ws] for n in names]
    weights = [[float(params[n]) * k for k in ws] for n in names]
    capacity = float(budget) * sum(float(params[n]) for n in names)
    sol = solve_real(costs, weights, capacity)
    return {n: ws[k] for n, k in zip(names, sol.choice)}
