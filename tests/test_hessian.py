"""Tests of fqexport/hessian.py: explicit X Xᵀ references for Linear and Conv2d inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqexport.errors import ConfigError, DataError, UnsupportedLayerError
from fqexport.quant.hessian import (
    HessianAccumulator,
    conv_transpose_input,
    conv_transpose_rows,
    conv_transpose_weight,
)
from fqexport.quant.solver import choose_solver_grid, rtn_layer, solve_layer


def _explicit_conv_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patch rows by brute force: for each output position, the receptive field flattened as
    (channel, kh, kw) — checked against the conv itself below."""
    xp = F.pad(x, (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    out = conv(x)
    Ho, Wo = out.shape[2:]
    rows = []
    for b in range(x.shape[0]):
        for i in range(Ho):
            for j in range(Wo):
                patch = xp[b, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                           j * sw: j * sw + dw * (kw - 1) + 1: dw]
                rows.append(patch.reshape(-1))
    R = torch.stack(rows)  # [B·Ho·Wo, C·kh·kw]
    # the rows really are the conv's inputs: R @ Wᵀ reproduces the output (groups=1)
    if conv.groups == 1:
        ref = (R @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias).reshape(
            x.shape[0], Ho, Wo, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(ref, out, rtol=1e-4, atol=1e-4)
    return R


def test_linear_matches_explicit_xxt_with_leading_dims():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 5, 6)  # [B, T, in]: 5 rows per item
    group = torch.tensor([0, 1, 1, 0])
    acc = HessianAccumulator(lin, num_groups=2)
    acc.add(x[:3], group[:3])
    acc.add(x[3:], group[3:])  # streamed over two batches
    X0 = x[group == 0].reshape(-1, 6).double()
    X1 = x[group == 1].reshape(-1, 6).double()
    assert acc.counts.tolist() == [10, 10]
    assert acc.samples.tolist() == [2, 2]
    H0, H1 = 2 * X0.T @ X0 / 10, 2 * X1.T @ X1 / 10
    torch.testing.assert_close(acc.group_hessian(0).double(), H0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.hessian().double(), (H0 + H1) / 2, rtol=1e-5, atol=1e-6)
    Xall = x.reshape(-1, 6).double()
    torch.testing.assert_close(
        acc.hessian_sample_weighted().double(), 2 * Xall.T @ Xall / 20, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [dict(kernel_size=3, stride=1, padding=1),
     dict(kernel_size=3, stride=2, padding=1, dilation=1),
     dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1))],
)
def test_conv2d_matches_explicit_patches(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, **kw)
    x = torch.randn(2, 3, 7, 6)
    acc = HessianAccumulator(conv, num_groups=1)
    acc.add(x, torch.zeros(2, dtype=torch.long))
    R = _explicit_conv_rows(conv, x).double()
    assert acc.counts.tolist() == [R.shape[0]]
    torch.testing.assert_close(acc.hessian().double(), 2 * R.T @ R / R.shape[0],
                               rtol=1e-5, atol=1e-6)


def test_depthwise_conv_gives_one_hessian_per_conv_group():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # channel multiplier 2
    x = torch.randn(3, 4, 5, 5)
    acc = HessianAccumulator(conv, num_groups=1)
    acc.add(x, torch.zeros(3, dtype=torch.long))
    H = acc.hessian()
    assert H.shape == (4, 9, 9)
    R = _explicit_conv_rows(conv, x).double().reshape(-1, 4, 9)  # channel-major columns
    for k in range(4):
        Rk = R[:, k]
        torch.testing.assert_close(H[k].double(), 2 * Rk.T @ Rk / Rk.shape[0],
                                   rtol=1e-5, atol=1e-6)


def test_conv_same_padding_and_reflect_mode():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 2, (2, 3), padding="same", padding_mode="reflect")
    x = torch.randn(1, 2, 5, 5)
    acc = HessianAccumulator(conv, num_groups=1)
    acc.add(x, torch.zeros(1, dtype=torch.long))
    # reference: reflect-pad the way nn.Conv2d does, then a valid unfold
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode="reflect")
    R = F.unfold(xp, (2, 3))[0].T.double()
    assert R.shape[0] == 25  # "same": one row per output pixel
    ref = (R.float() @ conv.weight.reshape(2, -1).T + conv.bias).T.reshape(1, 2, 5, 5)
    torch.testing.assert_close(ref, conv(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc.hessian().double(), 2 * R.T @ R / 25, rtol=1e-5, atol=1e-6)


def test_equal_group_weighting_upweights_the_minority():
    torch.manual_seed(4)
    lin = nn.Linear(2, 1)
    # majority (90 items) lives on feature 0, minority (10 items) on feature 1
    x = torch.zeros(100, 2)
    x[:90, 0] = 1.0
    x[90:, 1] = 1.0
    group = torch.tensor([0] * 90 + [1] * 10)
    acc = HessianAccumulator(lin, num_groups=2)
    acc.add(x, group)
    eq, sw = acc.hessian(), acc.hessian_sample_weighted()
    torch.testing.assert_close(torch.diagonal(sw), torch.tensor([1.8, 0.2]))
    torch.testing.assert_close(torch.diagonal(eq), torch.tensor([1.0, 1.0]))
    # user weights: α ∝ (1, 3) → diag 2·(0.25, 0.75)
    torch.testing.assert_close(torch.diagonal(acc.hessian(torch.tensor([1.0, 3.0]))),
                               torch.tensor([0.5, 1.5]))


def test_absent_group_is_skipped_and_weights_renormalised():
    lin = nn.Linear(2, 1)
    acc = HessianAccumulator(lin, num_groups=3)
    acc.add(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2]))
    # group 1 absent: its weight 5 is dropped, α = (1, 1)/2 over groups 0 and 2
    H = acc.hessian(torch.tensor([1.0, 5.0, 1.0]))
    torch.testing.assert_close(torch.diagonal(H), torch.tensor([1.0, 4.0]))
    with pytest.raises(DataError, match="saw no calibration inputs"):
        acc.hessian(torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ConfigError, match="3 finite values >= 0"):
        acc.hessian(torch.tensor([1.0, -1.0, 1.0]))


def test_bad_inputs_raise_specific_errors():
    with pytest.raises(UnsupportedLayerError, match="'pool' is a MaxPool2d"):
        HessianAccumulator(nn.MaxPool2d(2), 2, name="pool")
    acc = HessianAccumulator(nn.Linear(4, 2), 2, name="fc")
    with pytest.raises(DataError, match=r"layer 'fc' \(Linear\) got an input of shape \(3, 5\)"):
        acc.add(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match=r"values in \[0, 2\); got shape \(3,\), range 0\.\.2"):
        acc.add(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="'fc' saw no calibration inputs"):
        acc.hessian()


# ------------------------------------------------------------------ ConvTranspose2d

# (stride, padding, output_padding, dilation, groups, kernel): padding > d·(k-1) crops the input
_CT_CASES = [
    (2, 0, 0, 1, 1, 2), (2, 1, 1, 1, 1, 3), (3, 2, 1, 2, 1, 3), (1, 0, 0, 1, 1, 3),
    (2, 3, 1, 1, 1, 3), ((2, 1), (1, 0), (1, 0), (1, 2), 1, (3, 2)), (2, 1, 0, 1, 2, 3),
]


@pytest.mark.parametrize("stride,padding,output_padding,dilation,groups,kernel", _CT_CASES)
def test_conv_transpose_is_a_conv_of_the_zero_inserted_input(stride, padding, output_padding, dilation, groups, kernel):
    torch.manual_seed(0)
    w = torch.randn(4, 6 // groups, *((kernel, kernel) if isinstance(kernel, int) else kernel))
    x = torch.randn(2, 4, 5, 7)
    want = F.conv_transpose2d(x, w, None, stride, padding, output_padding, groups, dilation)
    m = nn.ConvTranspose2d(4, 6, kernel, stride, padding, output_padding, groups, False, dilation)
    rows = conv_transpose_rows(w, groups)
    assert rows.shape == (6, 4 // groups * w.shape[2] * w.shape[3])
    # W'[co, ci, i, j] = W[ci, co, k-1-i, k-1-j], exactly invertible
    assert torch.equal(rows[1].reshape(4 // groups, *w.shape[2:])[0, 0, 0], w[0, 1, -1, -1])
    assert torch.equal(conv_transpose_weight(rows, w.shape, groups), w)
    got = F.conv2d(conv_transpose_input(x, m), rows.reshape(6, 4 // groups, *w.shape[2:]),
                   dilation=m.dilation, groups=groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,output_padding,dilation,groups,kernel", _CT_CASES[:6])
def test_conv_transpose_hessian_rows_reproduce_the_layer_output(stride, padding, output_padding, dilation, groups, kernel):
    torch.manual_seed(1)
    m = nn.ConvTranspose2d(4, 6, kernel, stride, padding, output_padding, groups, True, dilation)
    x = torch.randn(3, 4, 5, 6)
    # explicit rows: patches of the stride-1 conv over the zero-inserted, padded input
    conv = nn.Conv2d(4, 6, m.kernel_size, dilation=m.dilation)
    R = _explicit_conv_rows(conv, conv_transpose_input(x, m))
    out = m(x).detach()
    ref = (R @ conv_transpose_rows(m.weight.detach()).T + m.bias.detach()).reshape(
        3, out.shape[2], out.shape[3], 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ref, out, rtol=1e-4, atol=1e-4)
    acc = HessianAccumulator(m, 1, name="up")
    acc.add(x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(acc.hessian(), 2 * R.T @ R / R.shape[0], rtol=1e-4, atol=1e-5)
    assert int(acc.counts[0]) == 3 * out.shape[2] * out.shape[3]


def test_conv_transpose_solver_on_its_rows_beats_round_to_nearest_on_the_output():
    torch.manual_seed(2)
    m = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
    x = torch.relu(torch.randn(64, 16, 6, 6)) * torch.linspace(0.2, 3.0, 16).reshape(1, -1, 1, 1)
    acc = HessianAccumulator(m, 1)
    acc.add(x, torch.zeros(64, dtype=torch.long))
    H = acc.hessian()
    rows = conv_transpose_rows(m.weight.detach())
    grid = choose_solver_grid(rows, H, 4, clip_search=False)
    errors = {}
    for name, codes in (("rtn", rtn_layer(rows, grid).codes), ("solver", solve_layer(rows, H, grid).codes)):
        assert codes.abs().max() <= grid.qmax
        q = conv_transpose_weight(codes * grid.scale[:, None], m.weight.shape)
        errors[name] = float((F.conv_transpose2d(x, q, None, 2, 1, 1) - m(x)).detach().pow(2).mean())
    assert errors["solver"] < 0.8 * errors["rtn"]


def test_grouped_conv_transpose_gets_one_hessian_per_conv_group():
    m = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    acc = HessianAccumulator(m, 1)
    acc.add(torch.randn(2, 4, 5, 5), torch.zeros(2, dtype=torch.long))
    assert acc.hessian().shape == (2, 2 * 9, 2 * 9)


# ------------------------------------------------------------------ cross moment (float-output target)


def test_cross_moment_is_group_weighted_xf_xt():
    torch.manual_seed(3)
    lin = nn.Linear(6, 2)
    acc = HessianAccumulator(lin, 2, cross=True)
    xs, xfs, gs = [], [], []
    for _ in range(3):
        x = torch.randn(10, 6)
        xf = x + 0.1 * torch.randn(10, 6)
        g = torch.tensor([0, 1] * 5)
        acc.add(x, g, xf)
        xs.append(x), xfs.append(xf), gs.append(g)
    X, Xf, G = torch.cat(xs).double(), torch.cat(xfs).double(), torch.cat(gs)
    alpha = torch.tensor([0.25, 0.75])
    want = sum(a * 2 * Xf[G == g].T @ X[G == g] / int((G == g).sum()) for g, a in enumerate(alpha.tolist()))
    torch.testing.assert_close(acc.cross_moment(alpha).double(), want, rtol=1e-5, atol=1e-6)
    # not symmetric in general, and the Hessian is still the plain group-weighted X Xᵀ
    want_h = sum(a * 2 * X[G == g].T @ X[G == g] / int((G == g).sum()) for g, a in enumerate(alpha.tolist()))
    torch.testing.assert_close(acc.hessian(alpha).double(), want_h, rtol=1e-5, atol=1e-6)


def test_cross_moment_of_identical_inputs_is_the_hessian_for_convs():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    acc = HessianAccumulator(conv, 1, cross=True)
    x = torch.randn(3, 4, 8, 8)
    acc.add(x, torch.zeros(3, dtype=torch.long), x.clone())
    assert acc.cross_moment().shape == (2, 18, 18)
    torch.testing.assert_close(acc.cross_moment(), acc.hessian())


def test_cross_accumulator_needs_float_inputs_of_the_same_shape():
    lin = nn.Linear(4, 2)
    acc = HessianAccumulator(lin, 1, name="head", cross=True)
    with pytest.raises(DataError, match=r"layer 'head' collects the float model's inputs too .*got None"):
        acc.add(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match=r"input's shape \(2, 4\); got \(3, 4\)"):
        acc.add(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), torch.randn(3, 4))
    plain = HessianAccumulator(lin, 1, name="head")
    plain.add(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs an accumulator made with cross=True"):
        plain.cross_moment()


def test_interleaved_groups_with_cross_moment_match_explicit_patches():
    """Items of several groups interleaved in a batch (the accumulator reorders them so each
    group's rows are one slice) give each group exactly its own rows, for H and C alike."""
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x, xf = torch.randn(6, 3, 7, 6), torch.randn(6, 3, 7, 6)
    group = torch.tensor([1, 0, 2, 0, 1, 1])
    acc = HessianAccumulator(conv, num_groups=3, cross=True)
    acc.add(x, group, xf)
    per = _explicit_conv_rows(conv, x[:1]).shape[0]
    for g in range(3):
        R = _explicit_conv_rows(conv, x[group == g]).double()
        Rf = _explicit_conv_rows(conv, xf[group == g]).double()
        assert int(acc.counts[g]) == R.shape[0] == per * int((group == g).sum())
        torch.testing.assert_close(acc.group_hessian(g).double(), 2 * R.T @ R / R.shape[0],
                                   rtol=1e-5, atol=1e-6)
        w = torch.zeros(3)
        w[g] = 1.0
        torch.testing.assert_close(acc.cross_moment(w).double(), 2 * Rf.T @ R / R.shape[0],
                                   rtol=1e-5, atol=1e-6)
