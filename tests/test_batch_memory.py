"""Calibration batches of large inputs stay bounded (survey 47: 24 grayscale 1024×1280 images grew
compress's memory by 9 GB: a batch of 24 whole-image layer outputs, copied to float64, channels-last
and squared at once by ChannelStats)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import fx, nn

import fqexport.pipeline.batch_memory as batch_memory
import fqexport.quant.channel_stats as channel_stats
from fqexport.config import QuantConfig
from fqexport.pipeline.batch_memory import calibration_batch_size
from fqexport.pipeline.compress import compress
from fqexport.quant.channel_stats import ChannelStats


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2)).eval()


def test_the_batch_shrinks_to_keep_the_largest_activation_under_the_cap(monkeypatch, caplog):
    gm = fx.symbolic_trace(_net())
    sample = torch.zeros(1, 1, 64, 64)
    largest = 8 * 64 * 64 * 4  # the conv's (and the ReLU's) output, bytes per sample
    monkeypatch.setattr(batch_memory, "MAX_BATCH_ACTIVATION_BYTES", 2**20)
    with caplog.at_level(logging.INFO, logger="fqexport.pipeline.batch_memory"):
        assert calibration_batch_size(gm, sample, 64) == 2**20 // largest == 8
    assert ("calibration batches of 8 samples instead of batch_size=64: one sample's largest activation (_0) is "
            "0.1 MB, and a batch keeps its activations under 1 MB") in caplog.text
    assert calibration_batch_size(gm, sample, 4) == 4  # 4 samples fit: as asked
    monkeypatch.setattr(batch_memory, "MAX_BATCH_ACTIVATION_BYTES", 1000)
    assert calibration_batch_size(gm, sample, 64) == 1  # one sample over the cap still runs


def test_a_graph_that_cannot_run_one_sample_keeps_the_batch():
    gm = fx.symbolic_trace(_net())
    assert calibration_batch_size(gm, torch.zeros(1, 3, 8, 8), 64) == 64  # wrong channels: the passes say so


def test_compress_runs_its_passes_in_the_smaller_batches(monkeypatch):
    """The same codes as batch_size=8 asked for; the recorded settings keep what the user asked."""
    rng = np.random.default_rng(0)
    data = (rng.random((48, 1, 32, 32), dtype=np.float32), rng.integers(0, 2, 48), np.arange(48) % 2)
    from fqexport.calibration.group_data import GroupData

    calib = GroupData(*data, ("a", "b"), "big")
    asked = compress(_net(), calib, QuantConfig(weight_bits=4, num_calib=48, batch_size=8), progress=False)
    monkeypatch.setattr(batch_memory, "MAX_BATCH_ACTIVATION_BYTES", 8 * 8 * 32 * 32 * 4)  # 8 samples
    capped = compress(_net(), calib, QuantConfig(weight_bits=4, num_calib=48), progress=False)
    for name, layer in asked.layers.items():
        assert torch.equal(layer.codes, capped.layers[name].codes), name
        assert torch.equal(layer.scale, capped.layers[name].scale), name
    assert capped.metadata.settings["batch_size"] == 64


@pytest.mark.parametrize("channel_dim, shape", [(1, (6, 3, 5, 7)), (-1, (6, 4, 3))])
def test_channel_stats_in_chunks_of_samples_equal_one_pass(monkeypatch, channel_dim, shape):
    torch.manual_seed(0)
    z = torch.randn(*shape) * 3 + 1
    if channel_dim == 1:
        z = z[:, :, :, ::2]  # a strided view, as hooks may give
    group = torch.tensor([0, 1, 1, 0, 1, 0])
    whole = ChannelStats(2, channel_dim)
    whole.add(z, group)
    monkeypatch.setattr(channel_stats, "_CHUNK_ELEMS", 1)  # one sample per chunk
    chunked = ChannelStats(2, channel_dim)
    chunked.add(z, group)
    alpha = torch.tensor([0.3, 0.7])
    for a, b in zip(whole.moments(alpha), chunked.moments(alpha)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # against the definition: per group, channel means over samples and positions
    zc = z.movedim(channel_dim, -1).reshape(6, -1, z.shape[channel_dim]).double()
    means = torch.stack([zc[group == g].reshape(-1, zc.shape[-1]).mean(0) for g in (0, 1)])
    torch.testing.assert_close(chunked.moments(alpha)[0], (alpha.double()[:, None] * means).sum(0).float())
