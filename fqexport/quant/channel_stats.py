"""Per-group, per-channel output statistics of a layer, streamed over batches.

Used by bias correction (match the float mean) and BatchNorm re-estimation (match the float
mean and variance) after a layer's weights are quantized.
"""

from __future__ import annotations

import torch

from fqexport.quant.per_group import per_sample, row_groups

# float64 elements of one chunk of samples in ChannelStats.add (32 MB; a larger sample is one chunk)
_CHUNK_ELEMS = 2**22


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
        z = per_sample(z.detach(), group.numel())  # a batch-independent output: every sample's
        z = z.movedim(self.channel_dim, -1)  # [B, ..., C], a view
        rows, channels = z.shape[0], z.shape[-1]
        positions = z[0].numel() // max(channels, 1) if rows else 0
        # Σ_p z and Σ_p z² per sample in float64, a few samples at a time: the float64 copy, its
        # square and a conv output's channels-last copy are then bounded (a whole batch of large
        # images made each of them several GB)
        step = max(1, _CHUNK_ELEMS // max(1, positions * channels))
        per_sample_sum = torch.empty(rows, channels, dtype=torch.float64)
        per_sample_sq = torch.empty(rows, channels, dtype=torch.float64)
        for s in range(0, rows, step):
            chunk = z[s:s + step].reshape(-1, positions, channels).double()  # [b, positions, C]
            per_sample_sum[s:s + step] = chunk.sum(dim=1).cpu()
            per_sample_sq[s:s + step] = chunk.square_().sum(dim=1).cpu()
        if self.sum is None:
            self.sum = torch.zeros(self.num_groups, channels, dtype=torch.float64)
            self.sumsq = torch.zeros(self.num_groups, channels, dtype=torch.float64)
        group = row_groups(group.to(torch.long).cpu(), rows)  # k rows per sample folded in the batch
        self.sum.index_add_(0, group, per_sample_sum)
        self.sumsq.index_add_(0, group, per_sample_sq)
        self.count.index_add_(0, group, torch.full((rows,), float(positions), dtype=torch.float64))

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
