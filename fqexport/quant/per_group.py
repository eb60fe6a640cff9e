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
