"""Per-group, per-channel output statistics of a layer, streamed over batches.

Used by bias correction (match the float mean) and BatchNorm re-estimation (match the float
mean and variance) after a layer's weights are quantized.
"""

from __future__ import annotations

import torch

from fqexport.quant.per_group import per_sample, row_groups


class ChannelStats:
    """Σ z, Σ z² and counts per (group, channel) of a layer output ``z``.

    Conv outputs ``[B, C, H, W]`` have channels on dim 1; Linear outputs ``[B, ..., C]`` on the
    last dim. Each sample's elements count toward the group of that sample.
    """

    def __init__(self, num_groups: int, channel_dim: int) -> None:
        self.num_groups = num_groups
        self.channel_dim = channel_dim
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = torch.zeros(num_groups, dtype=torch.float64)

    def add(self, z: torch.Tensor, group: torch.Tensor) -> None:
        z = per_sample(z.detach(), group.numel()).double()  # a batch-independent output: every sample's
        z = z.movedim(self.channel_dim, -1)
        z = z.reshape(z.shape[0], -1, z.shape[-1])  # [B, positions, C]
        per_sample_sum = z.sum(dim=1)
        per_sample_sq = (z * z).sum(dim=1)
        if self.sum is None:
            c = z.shape[-1]
            self.sum = torch.zeros(self.num_groups, c, dtype=torch.float64)
            self.sumsq = torch.zeros(self.num_groups, c, dtype=torch.float64)
        group = row_groups(group.to(torch.long).cpu(), z.shape[0])  # k rows per sample folded in the batch
        self.sum.index_add_(0, group, per_sample_sum.cpu())
        self.sumsq.index_add_(0, group, per_sample_sq.cpu())
        self.count.index_add_(0, group, torch.full((z.shape[0],), float(z.shape[1]), dtype=torch.float64))

    def moments(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-weighted mean and variance per channel: E = Σ_g α_g E_g, Var = E[z²] − E².

        Groups with no samples are dropped and α renormalised over the rest.
        """
        if self.sum is None:
            raise RuntimeError("ChannelStats.moments() called before any add()")
        present = self.count > 0
        a = alpha.double() * present
        a = a / a.sum()
        cnt = self.count.clamp_min(1.0).unsqueeze(1)
        mean = (a.unsqueeze(1) * self.sum / cnt).sum(0)
        second = (a.unsqueeze(1) * self.sumsq / cnt).sum(0)
        return mean.float(), (second - mean * mean).clamp_min(0.0).float()
