"""Per-group means of per-sample values (pure tensor math).

For values v_i with group ids g_i ∈ {0, …, G−1}:

    N_g = |{i : g_i = g}|,    m_g = (1/N_g) Σ_{i: g_i = g} v_i    (m_g = 0 when N_g = 0).
"""

from __future__ import annotations

import torch


def group_means(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m [G], N [G])`` of the module docstring, in the dtype and on the device of ``values``
    (pass ``values.double()`` for float64 means)."""
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)
    return sums / counts.clamp_min(1), counts


def row_groups(group: torch.Tensor, rows: int) -> torch.Tensor:
    """The group id of each of ``rows`` leading-dim rows of a layer's input or output in a batch
    of ``len(group)`` samples: ``group`` itself, or, for a model that folds k rows per sample into
    the batch (windows or patches as a batch, ``[B·k, N, C]``: Swin, MobileViT), each sample's
    id repeated k times, sample-major as ``reshape(B·k, …)`` of ``[B, k, …]`` lays them out.
    Unchanged when ``rows`` is not a multiple of the batch (the caller's check names it)."""
    n = group.numel()
    if n == 0 or rows == n or rows % n:
        return group
    return group.reshape(-1).repeat_interleave(rows // n)


def per_sample(t: torch.Tensor, samples: int) -> torch.Tensor:
    """A layer's batch-independent tensor (leading dim 1 in a batch of ``samples``: XCiT's
    positional projection of a fixed grid, later repeated over the batch) seen by every sample:
    expanded to ``samples`` rows, so that it counts once for each sample's group; else ``t``."""
    if t.dim() > 0 and t.shape[0] == 1 and samples > 1:
        return t.expand(samples, *t.shape[1:])
    return t
