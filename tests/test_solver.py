"""Tests of fqexport/quant/solver.py on small layers with correlated Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch

from fqexport.errors import ConfigError
from fqexport.quant.grid import WeightGrid, choose_weight_grid, weight_qmax
from fqexport.quant.solver import (
    _NUMPY_OPS,
    _TORCH_OPS,
    DampingIncreasedWarning,
    HessianNotPositiveDefinite,
    _quantize_columns,
    choose_solver_grid,
    column_sensitivity,
    compensate_input_error,
    factor_conv_groups,
    factor_layer,
    layer_error,
    rtn_layer,
    solve_conv_groups,
    solve_layer,
)


def _layer(out=32, cols=96, n=512, seed=0):
    """W and a correlated H = 2 XᵀX/N with X = relu(Z A) (what real conv inputs look like)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols // 2, cols, generator=g) / (cols // 2) ** 0.5
    X = torch.relu(torch.randn(n, cols // 2, generator=g) @ A)
    H = 2 * X.T @ X / n
    W = torch.randn(out, cols, generator=g) * 0.1
    return W, H


@pytest.mark.parametrize("bits", [3, 4])
def test_solver_beats_rtn_on_correlated_hessian(bits):
    W, H = _layer()
    grid = choose_solver_grid(W, H, bits)
    rtn = rtn_layer(W, grid, H)
    res = solve_layer(W, H, grid)
    assert res.loss < 0.7 * rtn.loss, (res.loss, rtn.loss)
    assert res.loss == pytest.approx(layer_error(W, res.qweight, H), rel=1e-6)
    assert res.retries == 0 and res.damp_used == 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_integers_on_the_grid(bits):
    W, H = _layer(seed=bits)
    grid = choose_weight_grid(W, bits)
    res = solve_layer(W, H, grid, block_size=16)
    qmax = weight_qmax(bits)
    assert (grid.qmin, grid.qmax) == ((-2, 1) if bits == 2 else (-qmax, qmax))
    assert res.codes.dtype == torch.float32
    assert torch.equal(res.codes, torch.round(res.codes))
    assert int(res.codes.min()) >= grid.qmin and int(res.codes.max()) <= grid.qmax
    if bits == 2:  # four levels in use, and both mirror images of the grid
        assert set(res.codes.unique().tolist()) == {-2, -1, 0, 1}
        assert bool((grid.scale > 0).any()) and bool((grid.scale < 0).any())
    torch.testing.assert_close(res.qweight, res.codes * grid.scale[:, None], rtol=0, atol=0)
    assert sorted(res.order.tolist()) == list(range(W.shape[1]))


@pytest.mark.parametrize("order", ["natural", "sensitivity", "hessian-diag", "obs"])
def test_diagonal_hessian_gives_rtn(order):
    W, _ = _layer()
    H = torch.diag(torch.rand(W.shape[1]) + 0.5)  # no correlation: nothing to compensate
    grid = choose_weight_grid(W, 3)
    res = solve_layer(W, H, grid, order=order)
    assert torch.equal(res.codes, rtn_layer(W, grid).codes)


def test_codes_come_back_in_original_column_order():
    W, H = _layer(cols=64)
    grid = choose_weight_grid(W, 3)
    res = solve_layer(W, H, grid)
    p = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    res_p = solve_layer(W[:, p], H[p][:, p], grid)  # same problem, columns shuffled
    agree = (res_p.codes == res.codes[:, p]).float().mean()
    assert agree > 0.995
    # the order used is the sensitivity ranking, most sensitive first
    score = column_sensitivity(W, H, "sensitivity")
    assert torch.equal(res.order, torch.argsort(score, descending=True, stable=True))
    assert score[res.order[0]] == score.max()


def test_block_size_does_not_change_the_result():
    W, H = _layer(cols=80)
    grid = choose_weight_grid(W, 4)
    a = solve_layer(W, H, grid, block_size=128)
    b = solve_layer(W, H, grid, block_size=7)
    c = solve_layer(W, H, grid, block_size=1)
    assert (a.codes == b.codes).float().mean() > 0.995
    assert (a.codes == c.codes).float().mean() > 0.995
    assert b.loss == pytest.approx(a.loss, rel=1e-2)


def test_column_sensitivity_kinds():
    W = torch.tensor([[1.0, 0.5, 0.0], [1.0, -0.5, 0.25]])
    H = torch.diag(torch.tensor([1.0, 4.0, 2.0]))
    torch.testing.assert_close(column_sensitivity(W, H), torch.tensor([2.0, 2.0, 0.125]))
    torch.testing.assert_close(column_sensitivity(W, H, "hessian-diag"), torch.diagonal(H))
    grid = WeightGrid(scale=torch.tensor([1.0, 1.0]), qmax=1)
    # errors (w - round(w))²: col0 0, col1 0.25+0.25, col2 0.0625; / [H⁻¹]_jj = H_jj (damp 0)
    torch.testing.assert_close(column_sensitivity(W, H, "obs", grid=grid, damp=0.0),
                               torch.tensor([0.0, 2.0, 0.125]))
    with pytest.raises(ConfigError, match="kind='obs' needs the weight grid"):
        column_sensitivity(W, H, "obs")
    with pytest.raises(ConfigError, match="kind='foo' is not one of"):
        column_sensitivity(W, H, "foo")


def test_singular_hessian_retries_with_more_damping_and_warns():
    W, _ = _layer(cols=16)
    X = torch.randn(4, 16)  # rank 4 < 16 columns: singular
    H = 2 * X.T @ X / 4
    grid = choose_weight_grid(W, 4)
    with pytest.warns(DampingIncreasedWarning, match="Cholesky failed with damp=0"):
        res = solve_layer(W, H, grid, damp=0.0)
    assert res.retries >= 1 and res.damp_used >= 1e-3
    assert torch.isfinite(res.qweight).all()


def test_indefinite_hessian_needs_several_retries():
    W = torch.randn(3, 2)
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4, -2; mean diag 1
    grid = choose_weight_grid(W, 4)
    with pytest.warns(DampingIncreasedWarning) as rec:
        res = solve_layer(W, H, grid, damp=0.01)
    # 0.01, 0.1 and 1 fail (eigenvalue -2 + λ < 0), 10 works
    assert res.damp_used == pytest.approx(10.0) and res.retries == 3 and len(rec) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DampingIncreasedWarning)
        with pytest.raises(HessianNotPositiveDefinite, match="not positive definite even with "
                           "damping 1·mean"):
            solve_layer(W, H, grid, damp=0.01, max_retries=2)
        with pytest.raises(ConfigError, match="raise damp"):  # negative diagonal: hopeless
            solve_layer(W, -torch.eye(2), grid)


def test_dead_columns_are_zeroed_and_finite():
    W, H = _layer(cols=24)
    H[5, :] = 0
    H[:, 5] = 0
    H[11, :] = 0
    H[:, 11] = 0
    grid = choose_weight_grid(W, 3)
    res = solve_layer(W, H, grid)
    assert torch.isfinite(res.qweight).all()
    assert torch.all(res.codes[:, [5, 11]] == 0)
    assert res.loss < rtn_layer(W, grid, H).loss
    assert set(res.order[-2:].tolist()) == {5, 11}  # score 0: quantized last


def test_bad_arguments_name_the_problem():
    W, H = _layer(cols=16)
    grid = choose_weight_grid(W, 4)
    with pytest.raises(ConfigError, match="order='random' is not one of"):
        solve_layer(W, H, grid, order="random")
    with pytest.raises(ConfigError, match=r"weight has shape \(32, 16\) and Hessian \(15, 15\)"):
        solve_layer(W, H[:15, :15], grid)
    with pytest.raises(ConfigError, match="grid.scale has 31 entries but the weight has 32 rows"):
        solve_layer(W, H, WeightGrid(grid.scale[:31], grid.qmax))
    Hn = H.clone()
    Hn[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="Hessian holds NaN or Inf"):
        solve_layer(W, Hn, grid)


def test_hessian_aware_grid_uses_diag_h():
    W, H = _layer(cols=32)
    g = choose_solver_grid(W, H, 3)
    ref = choose_weight_grid(W, 3, column_weight=torch.diagonal(H))
    torch.testing.assert_close(g.scale, ref.scale, rtol=0, atol=0)
    plain = choose_solver_grid(W, H, 3, hessian_aware=False)
    torch.testing.assert_close(plain.scale, choose_weight_grid(W, 3).scale, rtol=0, atol=0)


def test_hessian_aware_grid_of_a_grouped_conv_weights_each_row_by_its_conv_group():
    # a grouped conv's Hessian is [conv groups, cols, cols]: rows 0-3 see H1, rows 4-7 see H2
    W, H1 = _layer(out=8, cols=18, seed=3)
    _, H2 = _layer(out=8, cols=18, seed=4)
    g = choose_solver_grid(W, torch.stack([H1, H2]), 2)
    top = choose_weight_grid(W[:4], 2, column_weight=torch.diagonal(H1))
    bot = choose_weight_grid(W[4:], 2, column_weight=torch.diagonal(H2))
    torch.testing.assert_close(g.scale, torch.cat([top.scale, bot.scale]), rtol=0, atol=0)
    assert (g.qmax, g.qmin) == (top.qmax, top.qmin)
    # the weighting matters: with H1 for every row the bottom rows get other scales
    assert not torch.equal(g.scale[4:], choose_weight_grid(W[4:], 2, column_weight=torch.diagonal(H1)).scale)
    with pytest.raises(ConfigError, match=r"weight has shape \(8, 18\) and Hessian \(3, 18, 18\)"):
        choose_solver_grid(W, torch.stack([H1, H2, H1]), 2)
    with pytest.raises(ConfigError, match=r"weight has shape \(8, 18\) and Hessian \(9, 9\)"):
        choose_solver_grid(W, H1[:9, :9], 2)


def test_rtn_layer_rounds_each_weight_to_the_nearest_code():
    W, H = _layer(out=6, cols=10)
    grid = choose_weight_grid(W, 4, clip_search=False)
    res = rtn_layer(W, grid)
    s = grid.scale.reshape(-1, 1)
    # every code is the nearest grid point: |w − s·q| <= s/2 (no clipping: s = max|w|/qmax)
    assert bool(((W - s * res.codes).abs() <= s / 2 + 1e-7).all())
    assert res.codes.abs().max() == grid.qmax
    assert res.loss == pytest.approx(float((W - res.qweight).pow(2).sum()))


def test_solve_conv_groups_matches_per_group_solves():
    W, H1 = _layer(out=8, cols=18, seed=3)
    _, H2 = _layer(out=8, cols=18, seed=4)
    H = torch.stack([H1, H2])
    grid = choose_weight_grid(W, 3)
    res = solve_conv_groups(W, H, grid, block_size=4)
    top = solve_layer(W[:4], H1, WeightGrid(grid.scale[:4], 3), block_size=4)
    bot = solve_layer(W[4:], H2, WeightGrid(grid.scale[4:], 3), block_size=4)
    assert torch.equal(res.codes, torch.cat([top.codes, bot.codes]))
    assert res.order.shape == (2, 18)
    assert res.loss == pytest.approx(top.loss + bot.loss)
    with pytest.raises(ConfigError, match="out_channels divisible by G"):
        solve_conv_groups(W, torch.stack([H1, H2, H1]), grid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda unavailable)")
def test_solver_runs_on_cuda_like_cpu():
    W, H = _layer(out=64, cols=128)
    grid = choose_solver_grid(W, H, 4)
    cpu = solve_layer(W, H, grid)
    gpu_grid = WeightGrid(grid.scale.cuda(), grid.qmax)
    gpu = solve_layer(W.cuda(), H.cuda(), gpu_grid)
    assert gpu.codes.is_cuda and gpu.order.is_cuda
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.99
    assert gpu.loss == pytest.approx(cpu.loss, rel=2e-2)


def test_equal_group_weighting_protects_the_minority_group():
    """End to end with the accumulator: a 90/10 split with different input directions; equal
    group weights give the minority a lower layer error than plain sample weighting."""
    from torch import nn

    from fqexport.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(7)
    cols = 48
    A_maj = torch.randn(cols // 2, cols, generator=g)
    A_min = torch.randn(cols // 2, cols, generator=g)
    x_maj = torch.relu(torch.randn(900, cols // 2, generator=g) @ A_maj)
    x_min = torch.relu(torch.randn(100, cols // 2, generator=g) @ A_min)
    acc = HessianAccumulator(nn.Linear(cols, 16), num_groups=2)
    acc.add(torch.cat([x_maj, x_min]), torch.tensor([0] * 900 + [1] * 100))
    W = torch.randn(16, cols, generator=g) * 0.1
    grid = choose_weight_grid(W, 3)
    H_min = acc.group_hessian(1)
    eq = solve_layer(W, acc.hessian(), grid)
    sw = solve_layer(W, acc.hessian_sample_weighted(), grid)
    err_eq, err_sw = layer_error(W, eq.qweight, H_min), layer_error(W, sw.qweight, H_min)
    assert err_eq < 0.9 * err_sw, (err_eq, err_sw)


# ------------------------------------------------------------------ float-output target


def _noisy_inputs(cols=48, n=2000, seed=1):
    """Float inputs X_f and the quantized prefix's X: a systematic distortion of X_f (what an
    upstream quantized layer leaves) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g) / cols ** 0.5
    Xf = torch.relu(torch.randn(n, cols, generator=g) @ A)
    M = torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = Xf @ M + 0.01 * torch.randn(n, cols, generator=g)
    return X, Xf


def test_float_output_target_is_the_least_squares_weight():
    X, Xf = _noisy_inputs()
    W = torch.randn(8, X.shape[1], generator=torch.Generator().manual_seed(2))
    n = X.shape[0]
    H, C = 2 * X.T @ X / n, 2 * Xf.T @ X / n
    target = compensate_input_error(W, H, C, damp=0.0)
    # W* = argmin ||W X_f − W* X||²  (ordinary least squares, rows of X as samples)
    lstsq = torch.linalg.lstsq(X.double(), (Xf @ W.T).double()).solution.T.float()
    torch.testing.assert_close(target, lstsq, rtol=2e-3, atol=2e-3)
    # identical inputs: nothing to correct, the weight is returned unchanged (any damping)
    torch.testing.assert_close(compensate_input_error(W, H, H, damp=0.01), W)


def test_solving_toward_the_float_output_lowers_the_error_against_float():
    X, Xf = _noisy_inputs()
    W = torch.randn(16, X.shape[1], generator=torch.Generator().manual_seed(3)) * 0.2
    n = X.shape[0]
    H, C = 2 * X.T @ X / n, 2 * Xf.T @ X / n
    grid = choose_weight_grid(W, 4, weight_range="full", clip_search=False)
    plain = solve_layer(W, H, grid).qweight
    target = compensate_input_error(W, H, C, damp=0.01)
    retargeted = solve_layer(target, H, choose_weight_grid(target, 4, weight_range="full", clip_search=False)).qweight
    err = lambda Q: float(((Xf @ W.T - X @ Q.T) ** 2).sum())  # noqa: E731
    assert err(retargeted) < 0.5 * err(plain), (err(retargeted), err(plain))


def test_float_output_target_per_conv_group_and_bad_shapes():
    X, Xf = _noisy_inputs(cols=12)
    W = torch.randn(4, 12)
    n = X.shape[0]
    H, C = 2 * X.T @ X / n, 2 * Xf.T @ X / n
    both = compensate_input_error(W, torch.stack([H, H * 2]), torch.stack([C, C * 2]))
    torch.testing.assert_close(both[:2], compensate_input_error(W[:2], H, C))
    torch.testing.assert_close(both[2:], compensate_input_error(W[2:], 2 * H, 2 * C))
    with pytest.raises(ConfigError, match=r"weight \(4, 12\), Hessian \(12, 12\) and cross moment \(11, 11\)"):
        compensate_input_error(W, H, C[:11, :11])


# ------------------------------------------------------------------ one factorisation


def _spd_with_dead_columns(cols=40, seed=5, dead=(3, 17)):
    """A correlated SPD-but-for-dead-columns H (as _layer) with rows/columns ``dead`` zeroed."""
    W, H = _layer(out=12, cols=cols, seed=seed)
    for j in dead:
        H[j, :] = 0
        H[:, j] = 0
    return W, H


def _old_factor(H, perm, damp=0.01):
    """GPTQ's construction, as the solver did before: dead columns, damping, H⁻¹ (float64), then
    the upper Cholesky U of P H⁻¹ Pᵀ."""
    Hd = H.double().clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, :] = 0
    Hd[:, dead] = 0
    Hd[dead, dead] = 1
    Hd += damp * torch.diagonal(Hd).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    return torch.linalg.cholesky(Hinv[perm][:, perm], upper=True), Hd, Hinv


def _old_gptq(W, H, grid, order):
    """The old solver's two-factorisation algorithm in float64, column by column (no blocks):
    U from the Cholesky of P H⁻¹ Pᵀ, ``w_k -= r_j U_jk / U_jj`` with ``r_j = w'_j - s q_j``."""
    Hf = H.clone()
    dead = torch.diagonal(Hf) == 0
    Wd = W.double().clone()
    Wd[:, dead] = 0
    Hf[dead, :] = 0
    Hf[:, dead] = 0
    Hf[dead, dead] = 1
    _, _, Hinv = _old_factor(H, torch.arange(H.shape[0]))
    if order == "natural":
        perm = torch.arange(H.shape[0])
    else:
        score = column_sensitivity(Wd.float(), Hf, order, grid=grid, hinv_diag=torch.diagonal(Hinv).float())
        perm = torch.argsort(score, descending=True, stable=True)
    U, _, _ = _old_factor(H, perm)
    s = grid.scale.double().reshape(-1)
    Wp = Wd[:, perm].clone()
    Q = torch.empty_like(Wp)
    for j in range(Wp.shape[1]):
        Q[:, j] = torch.clamp(torch.round(Wp[:, j] / s), grid.qmin, grid.qmax)
        r = Wp[:, j] - s * Q[:, j]
        Wp[:, j + 1:] -= torch.outer(r, U[j, j + 1:] / U[j, j])
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.float(), perm


def test_one_factor_is_gptq_factor_of_the_inverse():
    """R from ONE Cholesky (of the reversed, permuted, damped H) gives GPTQ's U = R⁻¹ and the
    update matrix N + I = R D_R⁻¹ = V⁻¹ (V = U / diag U), dead columns included."""
    from fqexport.quant.solver import _reversed_factor

    W, H = _spd_with_dead_columns()
    perm = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(0))
    U_old, Hd, _ = _old_factor(H, perm)       # Hd: dead columns fixed, damped (float64)
    Hk = H.clone()                              # dead columns fixed as the solver does, undamped
    dead = torch.diagonal(H) == 0
    Hk[dead, dead] = 1
    R = _reversed_factor(Hk, perm, 0.01, torch.diagonal(Hk).mean())
    assert torch.equal(R, torch.triu(R))                                   # upper triangular
    torch.testing.assert_close(R.double() @ R.double().T, Hd[perm][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.linalg.inv(R.double()), U_old, rtol=1e-4, atol=1e-4)
    V = U_old / torch.diagonal(U_old).unsqueeze(1)
    torch.testing.assert_close((R / torch.diagonal(R)).double(), torch.linalg.inv(V), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cols, seed", [(48, 11), (37, 12)])
@pytest.mark.parametrize("order", ["natural", "sensitivity", "hessian-diag", "obs"])
def test_solver_equals_the_two_factorisation_algorithm(order, cols, seed):
    """The one-factorisation solver (float32, blocks) quantizes like the old construction (U from
    the Cholesky of H⁻¹, float64, column by column): the same order, the same codes."""
    W, H = _spd_with_dead_columns(cols=cols, seed=seed)
    grid = choose_solver_grid(W, H, 3)
    ref, perm = _old_gptq(W, H, grid, order)
    res = solve_layer(W, H, grid, order=order, block_size=16)
    assert torch.equal(res.order, perm)
    assert torch.equal(res.codes, ref)
    assert torch.all(res.codes[:, [3, 17]] == 0)


def test_solve_without_the_loss_gives_the_same_codes():
    W, H = _layer(cols=40)
    grid = choose_solver_grid(W, H, 4)
    full = solve_layer(W, H, grid)
    fast = solve_layer(W, H, grid, compute_loss=False)
    assert torch.equal(fast.codes, full.codes) and torch.equal(fast.order, full.order)
    assert fast.loss != fast.loss and full.loss == pytest.approx(layer_error(W, full.qweight, H))  # NaN


def test_obs_order_retries_with_more_damping_like_the_others():
    W, _ = _layer(cols=16)
    X = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))  # rank 4 < 16: singular
    H = 2 * X.T @ X / 4
    grid = choose_weight_grid(W, 4)
    with pytest.warns(DampingIncreasedWarning, match="Cholesky failed with damp=0"):
        res = solve_layer(W, H, grid, damp=0.0, order="obs")
    assert res.retries >= 1 and res.damp_used >= 1e-3
    assert torch.isfinite(res.qweight).all()


# ------------------------------------------------------------------ one factor for retarget and solve


@pytest.mark.parametrize("order", ["natural", "sensitivity", "hessian-diag", "obs"])
def test_a_given_factor_solves_like_the_solver_own(order):
    W, H = _spd_with_dead_columns(cols=44, seed=21)
    grid = choose_solver_grid(W, H, 3)
    own = solve_layer(W, H, grid, order=order, block_size=16)
    factor = factor_layer(W, H, order=order, grid=grid)
    given = solve_layer(W, H, grid, order="natural", damp=5.0, block_size=16, factor=factor)  # not read
    assert torch.equal(given.order, own.order) and torch.equal(given.codes, own.codes)
    assert given.damp_used == own.damp_used == 0.01
    with pytest.raises(ConfigError, match="the factor is \\(44, 44\\) but the weight has 40 columns"):
        solve_layer(W[:, :40], H[:40, :40], choose_solver_grid(W[:, :40], H[:40, :40], 3), factor=factor)
    with pytest.raises(ConfigError, match="kind='obs' needs the weight grid"):
        factor_layer(W, H, order="obs")


def test_the_retarget_from_the_solver_factor_equals_its_own_cholesky():
    """W* = W + W (C − H) A⁻¹ through the solver's permuted factor (two triangular solves) is the
    Cholesky solve of the unpermuted A, per conv group too."""
    X, Xf = _noisy_inputs(cols=40)
    W = torch.randn(10, 40, generator=torch.Generator().manual_seed(4)) * 0.2
    n = X.shape[0]
    H, C = 2 * X.T @ X / n, 2 * Xf.T @ X / n
    own = compensate_input_error(W, H, C, damp=0.01)
    factor = factor_layer(W, H, damp=0.01)
    assert not torch.equal(factor.perm, torch.arange(40))  # a real permutation is undone
    shared = compensate_input_error(W, H, C, factors=[factor])
    torch.testing.assert_close(shared, own, rtol=1e-4, atol=1e-5)
    assert float((own - W).norm()) > 0.05 * float(W.norm())  # the retarget moves the weight
    H2, C2 = torch.stack([H, 2 * H]), torch.stack([C, 2 * C])
    factors = factor_conv_groups(W, H2, damp=0.01)
    torch.testing.assert_close(compensate_input_error(W, H2, C2, factors=factors),
                               compensate_input_error(W, H2, C2), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="1 factors for 2 conv groups"):
        compensate_input_error(W, H2, C2, factors=[factor])


def test_the_retarget_leaves_a_dead_column_to_the_solver():
    X, Xf = _noisy_inputs(cols=24)
    X[:, 5] = 0  # the quantized prefix never reaches input 5; the float model does
    n = X.shape[0]
    H, C = 2 * X.T @ X / n, 2 * Xf.T @ X / n
    W = torch.randn(6, 24, generator=torch.Generator().manual_seed(8))
    target = compensate_input_error(W, H, C, factors=factor_conv_groups(W, H))
    assert torch.isfinite(target).all()
    torch.testing.assert_close(target[:, 5], W[:, 5])  # Δ[:, 5] = 0: column 5 of C − H is 0


@pytest.mark.parametrize("per_block", [False, True])
def test_column_loop_numpy_and_torch_ops_agree(per_block):
    """The CPU loop (numpy's vector ops) and the loop other devices run (torch's) give the
    same codes; checked here on CPU since the torch ops are device-agnostic."""
    W, H = _layer(out=24, cols=70, seed=9)
    factor = factor_layer(W, H)
    N = factor.R / torch.diagonal(factor.R).unsqueeze(0)
    grid = choose_solver_grid(W, H, 3, block=32 if per_block else None)
    Wt = W[:, factor.perm].t().contiguous()
    if per_block:
        from fqexport.quant.grid import column_scales
        St = column_scales(grid.scale, 70, 32)[:, factor.perm].t().contiguous()
    else:
        St, Wt = None, Wt / grid.scale.reshape(1, -1)
    a = _quantize_columns(Wt.clone(), N, St, grid.qmin, grid.qmax, 16, _NUMPY_OPS)
    b = _quantize_columns(Wt.clone(), N, St, grid.qmin, grid.qmax, 16, _TORCH_OPS)
    assert torch.equal(a, b)
    assert int(a.abs().max()) == grid.qmax and len(a.unique()) > 4


def test_nan_or_inf_anywhere_in_the_hessian_is_named():
    W, H = _layer(cols=16)
    grid = choose_weight_grid(W, 4)
    for bad in (float("nan"), float("inf")):
        Hb = H.clone()
        Hb[3, 7] = bad
        with pytest.raises(ConfigError, match="Hessian holds NaN or Inf"):
            solve_layer(W, Hb, grid)
        with pytest.raises(ConfigError, match="Hessian holds NaN or Inf"):
            factor_layer(W, Hb)
    # a sum that overflows float32 is not an Inf entry: the entries are checked one by one
    from fqexport.quant.solver import _all_finite

    huge = H / float(H.max()) * 3e38
    assert not torch.isfinite(huge.sum()) and _all_finite(huge)
    huge[0, 0] = float("inf")
    assert not _all_finite(huge)


@pytest.mark.parametrize("n", [1024, 1536])
def test_padded_cholesky_of_a_power_of_two_size_is_the_factor(n):
    """A size that is a multiple of 512 is factored inside [[A, 0], [0, I]] (a faster leading
    dimension for MKL): the result is A's lower factor, and a failure still says where."""
    from fqexport.quant.solver import _cholesky

    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, n + 8, generator=g)
    A = X @ X.T / n + 0.1 * torch.eye(n)
    L, info = _cholesky(A)
    assert int(info) == 0 and L.shape == (n, n)
    assert torch.equal(L, torch.tril(L))
    torch.testing.assert_close(L @ L.T, A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=1e-4, atol=1e-4)
    A[7, 7] = -1.0  # not positive definite: the first failing minor is reported, as unpadded
    _, info = _cholesky(A)
    assert int(info) == int(torch.linalg.cholesky_ex(A)[1]) == 8
