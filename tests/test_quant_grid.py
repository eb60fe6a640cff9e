"""Tests of fqexport/quant_grid.py: exact numbers of the weight and activation grids."""

from __future__ import annotations

import pytest
import torch

from fqexport.quant.grid import (
    ACT_QMAX,
    WeightGrid,
    act_qparams,
    as_rows,
    choose_weight_grid,
    dequantize,
    fake_quantize,
    fake_quantize_act,
    quantize,
    weight_qmax,
)


@pytest.mark.parametrize(
    "bits, weight_range, qmax",
    [(8, "x86-safe", 63), (8, "full", 127), (7, "x86-safe", 63), (6, "x86-safe", 31),
     (4, "x86-safe", 7), (4, "full", 7), (3, "full", 3), (2, "x86-safe", 1)],
)
def test_weight_qmax(bits, weight_range, qmax):
    assert weight_qmax(bits, weight_range) == qmax


def test_x86_safe_range_cannot_saturate_16_bit_pair_sums():
    # u8 activation (<= 255) times two weights: the pair sum must fit in int16.
    assert 2 * 255 * weight_qmax(8, "x86-safe") < 2**15
    assert 2 * 255 * weight_qmax(8, "full") >= 2**15


def test_act_qparams_exact():
    scale, zp = act_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255.0, rel=1e-12)
    assert zp == 64  # round(1 / (4/255)) = round(63.75)


def test_act_qparams_range_is_widened_to_contain_zero():
    assert act_qparams(0.5, 2.0) == (pytest.approx(2.0 / 255.0), 0)
    scale, zp = act_qparams(-2.0, -1.0)
    assert scale == pytest.approx(2.0 / 255.0) and zp == 255


def test_act_qparams_degenerate_range():
    # scale 1 (ORT's quantizer's choice): a 1e-8 scale made the next layer's int32 bias overflow in ORT (survey 30)
    assert act_qparams(0.0, 0.0) == (1.0, 0) and act_qparams(0.0, 0.0, symmetric=True) == (1.0, 0)
    assert act_qparams(0.0, 5e-9) == (1.0, 0)


def test_act_qparams_zero_is_exactly_representable():
    scale, zp = act_qparams(-0.37, 5.1)
    x = torch.tensor([0.0])
    assert fake_quantize_act(x, scale, zp).item() == 0.0


def test_quantize_rounds_and_clamps_per_row():
    w = torch.tensor([[1.0, -5.0, 0.26], [0.3, 0.1, -0.1]])
    scale = torch.tensor([0.5, 0.1])
    q = quantize(w, scale, qmax=3)
    assert q.tolist() == [[2.0, -3.0, 1.0], [3.0, 1.0, -1.0]]
    assert torch.allclose(dequantize(q, scale), torch.tensor([[1.0, -1.5, 0.5], [0.3, 0.1, -0.1]]))
    assert torch.allclose(fake_quantize(w, scale, 3), dequantize(q, scale))


def test_quantize_broadcasts_scale_over_conv_weight():
    w = torch.ones(2, 3, 2, 2)
    w[1] *= -2.0
    q = quantize(w, torch.tensor([0.25, 1.0]), qmax=7)
    assert q[0].unique().tolist() == [4.0] and q[1].unique().tolist() == [-2.0]
    assert as_rows(w).shape == (2, 12)


def test_grid_without_clip_search_is_absmax_over_qmax():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]])
    grid = choose_weight_grid(w, 4, clip_search=False)
    assert isinstance(grid, WeightGrid) and grid.qmax == 7 and grid.qmin == -7
    assert torch.allclose(grid.scale, torch.tensor([2.0 / 7, 0.3 / 7]))


def test_clip_search_error_not_above_no_clip_and_clips_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[0, 0] = 6.0  # an outlier: clipping it lowers the row error at 4 bits
    clipped = choose_weight_grid(w, 4, clip_search=True)
    plain = choose_weight_grid(w, 4, clip_search=False)
    err_c = (w - fake_quantize(w, clipped.scale, clipped.qmax)).pow(2).sum(1)
    err_p = (w - fake_quantize(w, plain.scale, plain.qmax)).pow(2).sum(1)
    assert torch.all(err_c <= err_p + 1e-7)
    assert err_c[0] < 0.9 * err_p[0]
    assert clipped.scale[0] < plain.scale[0]
    # shrink factors run 1.0 .. 0.5: the chosen scale never leaves that band
    ratio = clipped.scale / plain.scale
    assert torch.all(ratio <= 1.0 + 1e-6) and torch.all(ratio >= 0.5 - 1e-6)


def test_clip_search_uses_column_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    h = torch.ones(32)
    h[:4] = 100.0  # the first columns matter most
    weighted = choose_weight_grid(w, 3, column_weight=h)
    unweighted = choose_weight_grid(w, 3)

    def werr(grid):
        return ((w - fake_quantize(w, grid.scale, grid.qmax)).pow(2) * h).sum(1)

    assert torch.all(werr(weighted) <= werr(unweighted) + 1e-6)


def test_fake_quantize_act_matches_formula():
    x = torch.linspace(-3.0, 6.0, 101)
    scale, zp = act_qparams(-1.0, 3.0)
    want = scale * (torch.clamp(torch.round(x / scale) + zp, 0, ACT_QMAX) - zp)
    got = fake_quantize_act(x, scale, zp)
    assert torch.allclose(got, want, atol=1e-6)
    assert got.min().item() == pytest.approx(-scale * 64, abs=1e-6)  # clamped at q = 0
    assert got.max().item() == pytest.approx(scale * (255 - 64), abs=1e-6)
