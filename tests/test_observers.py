"""Tests of calibration/observers.py: group-aware min-max, percentile and MSE ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqexport.calibration.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    group_mse,
    group_percentile_range,
    make_observer,
)
from fqexport.errors import ConfigError, DataError
from fqexport.quant.grid import act_qparams


@pytest.fixture(scope="module")
def mix():
    """95% majority |N(0,1)|, 5% minority 10·|N(0,1)|: 1000 samples of 100 values, shuffled."""
    g = torch.Generator().manual_seed(0)
    majority = torch.randn(950, 100, generator=g).abs()
    minority = 10 * torch.randn(50, 100, generator=g).abs()
    x = torch.cat([majority, minority])
    group = torch.tensor([0] * 950 + [1] * 50)
    perm = torch.randperm(1000, generator=g)
    return x[perm], group[perm], majority, minority


def _feed(obs, x, group=None, batch=100):
    for i in range(0, x.shape[0], batch):
        obs.observe(x[i : i + batch], None if group is None else group[i : i + batch])
    return obs


def test_minmax_exact_over_groups():
    obs = MinMaxObserver(3)
    obs.observe(torch.tensor([[0.5, -2.0], [1.0, 3.0]]), torch.tensor([0, 2]))
    obs.observe(torch.tensor([[[7.5]], [[-0.25]]]).reshape(2, 1), torch.tensor([2, 2]))
    assert obs.range() == (-2.0, 7.5)
    assert obs.group_minmax() == [(-2.0, 0.5), None, (-0.25, 7.5)]
    assert obs.count.tolist() == [2, 0, 4]
    obs.observe(torch.tensor([[9.0]]), torch.tensor([1]))  # a later batch updates the range
    assert obs.range() == (-2.0, 9.0)
    obs2 = MinMaxObserver(1)
    obs2.observe(torch.tensor([[0.0, 2.55]]))
    scale, zp = obs2.qparams()
    assert scale == pytest.approx(0.01) and zp == 0


def test_percentile_group_aware_keeps_minority_tail(mix):
    x, group, majority, minority = mix
    aware = _feed(PercentileObserver(2, percentile=99.99), x, group)
    pooled = _feed(PercentileObserver(1, percentile=99.99), x)  # one group: plain percentile
    lo, hi = aware.range()
    minority_p = float(np.percentile(minority.numpy(), 99.99))
    pooled_p = float(np.percentile(x.numpy(), 99.99))
    # every value was kept (100k < 2^18 per group): the percentiles are exact
    assert hi == pytest.approx(minority_p, rel=1e-6)
    assert pooled.range()[1] == pytest.approx(pooled_p, rel=1e-6)
    # the pooled 99.99th percentile sits at the minority's ~99.8th: it clips the minority
    assert pooled_p == pytest.approx(float(np.percentile(minority.numpy(), 99.8)), rel=1e-3)
    assert pooled_p < 0.85 * minority_p  # ~30.3 vs ~37.0
    clipped_pooled = float((minority > pooled_p).float().mean())
    clipped_aware = float((minority > hi).float().mean())
    assert clipped_pooled == pytest.approx(0.002, abs=1e-4)  # 10 of 5000 minority values
    assert clipped_aware <= 0.0002
    assert lo == pytest.approx(min(np.percentile(majority.numpy(), 0.01), np.percentile(minority.numpy(), 0.01)), rel=1e-5)


def test_group_percentile_range_pure():
    a = torch.arange(101, dtype=torch.float32)  # percentiles of 0..100 are the values
    b = torch.arange(101, dtype=torch.float32) * 2 + 50
    assert group_percentile_range([a, torch.empty(0), b], 90.0) == pytest.approx((10.0, 230.0))
    assert group_percentile_range([a], 99.5) == pytest.approx((0.5, 99.5))


def test_subsample_is_bounded_uniform_and_deterministic():
    def run(seed):
        obs = PercentileObserver(1, percentile=99.0, max_samples=2000, seed=seed)
        for b in range(10):  # 10 batches of 10000 consecutive values
            obs.observe(torch.arange(b * 10000, (b + 1) * 10000, dtype=torch.float32).reshape(100, 100))
        return obs

    obs = run(0)
    kept = obs.samples(0)
    assert kept.numel() == 2000 and int(obs.count[0]) == 100_000
    assert len(torch.unique(kept)) == 2000  # without replacement
    per_batch = torch.bincount((kept // 10000).long(), minlength=10)
    assert int(per_batch.min()) > 140 and int(per_batch.max()) < 260  # ~200 from each batch
    assert obs.minmax() == (0.0, 99999.0)  # exact, not from the subsample
    lo, hi = obs.range()
    assert lo == pytest.approx(1000, abs=600) and hi == pytest.approx(99000, abs=600)
    assert torch.equal(run(0).samples(0), kept)
    assert not torch.equal(run(1).samples(0), kept)
    assert MinMaxObserver(1).keeps_samples is False


def test_mse_counts_each_group_equally(mix):
    x, group, _, minority = mix
    equal = _feed(MSEObserver(2), x, group)
    by_size = _feed(MSEObserver(2, group_weights=[950, 50]), x, group)  # = pooled MSE
    lo_e, hi_e = equal.range()
    lo_s, hi_s = by_size.range()
    assert lo_e == 0.0 and lo_s == 0.0  # range widened to contain 0
    assert hi_s < 0.92 * float(minority.max())  # pooled MSE clips the minority's tail
    assert hi_e > hi_s

    def minority_mse(hi):
        v = equal.samples(1)
        return group_mse(v, [0, v.numel()], [1.0], 0.0, hi)

    assert minority_mse(hi_e) < minority_mse(hi_s)


def test_mse_clips_a_heavy_tail_below_min_max():
    # Student-t (df=2): a heavy tail where clipping the ends lowers the 8-bit error
    g = torch.Generator().manual_seed(0)
    z, a, b = (torch.randn(200, 50, generator=g) for _ in range(3))
    x = z / torch.sqrt((a**2 + b**2) / 2)  # t = z / sqrt(chi2_2 / 2)
    mse = _feed(MSEObserver(1), x)
    mm = _feed(MinMaxObserver(1), x)
    (lo, hi), (mn, mx) = mse.range(), mm.range()
    assert mn < lo < 0 < hi < mx
    assert hi < 0.99 * mx and lo > 0.99 * mn  # here: (-128.6, 79.6) inside (-131.9, 81.6)
    v = mse.samples(0)
    cost, cost_minmax = (group_mse(v, [0, v.numel()], [1.0], *r) for r in ((lo, hi), (mn, mx)))
    assert cost < 0.98 * cost_minmax  # 0.972 here
    # no candidate of the search beats the chosen range
    for t in (1.0, 0.95, 0.9, 0.8):
        assert cost <= group_mse(v, [0, v.numel()], [1.0], t * mn, t * mx)


def test_group_mse_pure_numbers():
    # grid of [0, 2.55]: step 0.01; 0.005 → round-half-even 0 → error 0.005²; 3.0 clips to 2.55
    v = torch.tensor([0.0, 0.005, 3.0, 1.0])
    err = group_mse(v, [0, 2, 4], [0.5, 0.5], 0.0, 2.55)
    expected = 0.5 * (0.005**2 / 2) + 0.5 * (0.45**2 / 2)
    assert err == pytest.approx(expected, rel=1e-4)


def test_make_observer_kinds_and_errors():
    assert isinstance(make_observer("minmax", 2), MinMaxObserver)
    assert isinstance(make_observer("min-max", 2), MinMaxObserver)
    p = make_observer("percentile", 3, percentile=99.9)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.9 and p.num_groups == 3
    assert isinstance(make_observer("MSE", 1, max_samples=10), MSEObserver)
    with pytest.raises(ConfigError, match="observer kind='entropy' is not one of minmax, percentile, mse"):
        make_observer("entropy", 2)
    with pytest.raises(ConfigError, match=r"percentile=40 must be in \(50, 100\]"):
        make_observer("percentile", 2, percentile=40)
    with pytest.raises(ConfigError, match="num_groups=0 must be an integer >= 1"):
        make_observer("minmax", 0)
    with pytest.raises(ConfigError, match="group_weights=.* must hold 2 non-negative weights"):
        MSEObserver(2, group_weights=[1.0])


def test_observe_errors():
    obs = PercentileObserver(2, name="layer1.relu")
    with pytest.raises(DataError, match="layer1.relu: the observer has seen no values"):
        obs.range()
    with pytest.raises(DataError, match="layer1.relu: group id 2 outside 0..1"):
        obs.observe(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(DataError, match="group id -1 outside"):
        obs.observe(torch.zeros(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(DataError, match="group has 3 ids for a batch of 2 samples"):
        obs.observe(torch.zeros(2, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(DataError, match=r"activation contains NaN or Inf \(2 values\)"):
        obs.observe(torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]]), torch.tensor([0, 1]))
    assert int(obs.count.sum()) == 0  # nothing half-recorded
    obs.observe(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
    assert obs.range() == (pytest.approx(1.0001), pytest.approx(1.9999))
    assert act_qparams(*obs.range())[1] == 0
