"""Tests of fqexport/channel_stats.py: group-weighted moments equal numpy on hand examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.quant.channel_stats import ChannelStats


def _numpy_moments(z_by_group, alpha):
    """E = Σ_g α_g mean_g(z), Var = Σ_g α_g mean_g(z²) − E² (z: [n_g, C] rows per group)."""
    mean = sum(a * z.mean(0) for a, z in zip(alpha, z_by_group))
    second = sum(a * (z * z).mean(0) for a, z in zip(alpha, z_by_group))
    return mean, second - mean * mean


def test_conv_output_two_groups_alpha_weighted():
    # [B=3, C=2, H=1, W=2]; samples 0 and 2 in group 0, sample 1 in group 1.
    z = torch.tensor([
        [[[1.0, 3.0]], [[0.0, 2.0]]],
        [[[10.0, 14.0]], [[-4.0, 4.0]]],
        [[[5.0, 7.0]], [[2.0, 2.0]]],
    ])
    group = torch.tensor([0, 1, 0])
    s = ChannelStats(num_groups=2, channel_dim=1)
    s.add(z[:2], group[:2])  # streamed over two batches
    s.add(z[2:], group[2:])
    alpha = torch.tensor([0.25, 0.75])
    mean, var = s.moments(alpha)
    zn = z.numpy().transpose(0, 2, 3, 1).reshape(3, 2, 2)  # [B, positions, C]
    g0 = zn[[0, 2]].reshape(-1, 2)
    g1 = zn[[1]].reshape(-1, 2)
    want_m, want_v = _numpy_moments([g0, g1], [0.25, 0.75])
    # by hand, channel 0: mean_0 = 4, mean_1 = 12 -> E = 0.25·4 + 0.75·12 = 10
    assert want_m[0] == pytest.approx(10.0)
    np.testing.assert_allclose(mean.numpy(), want_m, rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), want_v, rtol=1e-6)
    assert s.count.tolist() == [4.0, 2.0]  # 2 positions per sample


def test_linear_output_channels_on_last_dim():
    z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0], [2.0, 4.0, 0.0]])
    group = torch.tensor([1, 1, 0, 0])
    s = ChannelStats(2, channel_dim=-1)
    s.add(z, group)
    mean, var = s.moments(torch.tensor([0.5, 0.5]))
    want_m, want_v = _numpy_moments([z[2:].numpy(), z[:2].numpy()], [0.5, 0.5])
    np.testing.assert_allclose(mean.numpy(), want_m, rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), want_v, rtol=1e-6)
    assert mean.tolist() == pytest.approx([1.5, 2.0, 2.5])


def test_group_without_samples_is_dropped_and_alpha_renormalised():
    z = torch.tensor([[1.0], [3.0]])
    s = ChannelStats(3, channel_dim=-1)
    s.add(z, torch.tensor([0, 2]))
    mean, var = s.moments(torch.tensor([0.2, 0.6, 0.2]))  # group 1 absent -> 0.5 / 0.5
    assert mean.item() == pytest.approx(2.0)
    assert var.item() == pytest.approx(0.5 * 1 + 0.5 * 9 - 4.0)


def test_variance_never_negative():
    s = ChannelStats(1, channel_dim=-1)
    s.add(torch.full((4, 2), 1e3), torch.zeros(4, dtype=torch.long))
    _, var = s.moments(torch.tensor([1.0]))
    assert torch.all(var >= 0) and var.max().item() < 1e-6


def test_moments_before_add_raises():
    with pytest.raises(RuntimeError, match=r"moments\(\) called before any add\(\)"):
        ChannelStats(2, 1).moments(torch.tensor([0.5, 0.5]))
