"""Per-row OBQ reference (greedy Optimal Brain Quantization), for comparison only.

Each row ``w`` of ``W`` is quantized on its own, greedily, with exact OBS updates
(Frantar & Alistarh, "Optimal Brain Compression", 2022):

    repeat until every column is quantized:
        q   = argmin_j (w_j - Q(w_j))² / [H⁻¹]_jj          over the remaining columns
        w  -= (w_q - Q(w_q)) / [H⁻¹]_qq · H⁻¹[:, q]          (w_q becomes exactly Q(w_q))
        H⁻¹ -= H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq                (drop row/col q: rank-1 downdate)

Every row has its own order and its own shrinking ``H⁻¹`` — O(cols³) per row, which is what
the shared-order solver in ``fqexport/solver.py`` avoids. Rows are independent, so they are
batched here with a ``[rows, m, m]`` stack of inverses, and the stack is compacted to the
``m`` still-unquantized columns every ``compact_every`` steps (cost ≈ cols³/3 per row).
"""

from __future__ import annotations

import torch

from fqexport.quant.grid import WeightGrid, dequantize, quantize


def _damped_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def obq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: WeightGrid,
    *,
    damp: float = 0.01,
    row_batch: int = 16,
    compact_every: int = 32,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integer codes ``[out, cols]`` of greedy per-row OBQ on the fixed per-row ``grid``."""
    out, cols = W.shape
    Hinv0 = _damped_inverse(H.to(dtype), damp)
    W = W.to(dtype).clone()
    W[:, torch.diagonal(H) == 0] = 0
    scale_all = grid.scale.to(dtype).reshape(-1)
    codes = torch.zeros(out, cols, dtype=torch.float32)
    for r0 in range(0, out, row_batch):
        r1 = min(r0 + row_batch, out)
        R = r1 - r0
        ar = torch.arange(R)
        s = scale_all[r0:r1]
        w = W[r0:r1].clone()                                   # [R, m] remaining weights
        Hinv = Hinv0.expand(R, cols, cols).clone()             # [R, m, m] per-row inverses
        idx = torch.arange(cols).expand(R, cols).clone()       # original column of each slot
        done = torch.zeros(R, cols, dtype=torch.bool)          # slot already quantized
        for t in range(cols):
            d = torch.diagonal(Hinv, dim1=1, dim2=2)           # [H⁻¹]_jj per row
            q = quantize(w, s, grid.qmax, grid.qmin)
            cost = (w - q * s[:, None]).pow(2) / d.clamp_min(1e-30)
            cost[done] = float("inf")
            j = torch.argmin(cost, dim=1)                      # greedy pick per row
            wj, qj, dj = w[ar, j], q[ar, j], d[ar, j]
            col = Hinv[ar, :, j]                               # H⁻¹[:, q]  [R, m]
            w -= ((wj - qj * s) / dj)[:, None] * col           # OBS weight update
            Hinv.baddbmm_(col[:, :, None], (col / dj[:, None])[:, None, :], alpha=-1.0)
            done[ar, j] = True
            codes[r0 + ar, idx[ar, j]] = qj.float()
            left = cols - t - 1
            if left and (t + 1) % compact_every == 0:          # shrink to the remaining slots
                keep = torch.argsort(done.to(torch.int8), dim=1, stable=True)[:, :left]
                w = torch.gather(w, 1, keep)
                idx = torch.gather(idx, 1, keep)
                Hinv = Hinv[ar[:, None, None], keep[:, :, None], keep[:, None, :]]
                done = torch.zeros(R, left, dtype=torch.bool)
    return codes


def obq_layer(W: torch.Tensor, H: torch.Tensor, grid: WeightGrid, **kw) -> torch.Tensor:
    """Dequantized OBQ weight ``s_c · codes``."""
    return dequantize(obq_quantize(W, H, grid, **kw), grid.scale.float())
