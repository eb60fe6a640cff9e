"""Group-aware activation range observers (min-max, percentile, MSE).

An observer sees batches ``x [B, ...]`` with group ids ``group [B]`` and proposes the range
``(lo, hi)`` of a uint8 activation grid. Every group's distribution counts, not just the
majority's: a minority whose activations are larger (inverted contrast, darker skin) would be
clipped by a range fitted to the pooled values, where its few samples barely move a
percentile or an average error.

Memory stays bounded: exact min/max are tracked per group, and the percentile and MSE
observers keep a uniform random subsample of at most ``max_samples`` values per group
(bottom-k sampling: every value gets a random key, the ``max_samples`` smallest keys are kept,
which is a uniform sample without replacement of all values seen; deterministic for a seed).
"""

from __future__ import annotations

import logging
from typing import Sequence, get_args

import torch

from fqexport.config import Calibration
from fqexport.errors import ConfigError, DataError
from fqexport.quant.grid import act_qparams, fake_quantize_act

logger = logging.getLogger(__name__)

MAX_SAMPLES_PER_GROUP = 2**18
# Shrink factors t of the MSE search: candidate ranges t·[lo, hi], 1.0 .. 0.1.
MSE_SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(37))
# Values per group the MSE search evaluates (a uniform subset of the kept sample).
MSE_EVAL_SAMPLES = 2**15
KINDS: tuple[str, ...] = get_args(Calibration)
NO_DATA = "{name}: the observer has seen no values; run calibration batches through it first"


class Observer:
    """Base observer: tracks exact min/max per group and, when needed, a bounded subsample.

    Args:
        num_groups: number of group ids (ids are ``0 .. num_groups - 1``).
        max_samples: values kept per group for percentile/MSE (``>= 1``).
        seed: seed of the subsample.
        name: what the observer watches (a layer/tensor name), used in messages.
    """

    keeps_samples = False

    def __init__(
        self,
        num_groups: int,
        *,
        max_samples: int = MAX_SAMPLES_PER_GROUP,
        seed: int = 0,
        name: str = "activation",
    ) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"num_groups={num_groups!r} must be an integer >= 1")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ConfigError(f"max_samples={max_samples!r} must be an integer >= 1")
        self.num_groups = num_groups
        self.max_samples = max_samples
        self.name = name
        self.count = torch.zeros(num_groups, dtype=torch.int64)  # values seen per group
        self.group_min = torch.full((num_groups,), float("inf"), dtype=torch.float64)
        self.group_max = torch.full((num_groups,), float("-inf"), dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._values: list[torch.Tensor] = [torch.empty(0) for _ in range(num_groups)]
        self._keys: list[torch.Tensor] = [torch.empty(0) for _ in range(num_groups)]
        self._cached_range: tuple[float, float] | None = None

    # ----------------------------------------------------------------- collecting

    def observe(self, x: torch.Tensor, group: torch.Tensor | None = None) -> None:
        """Add a batch ``x [B, ...]`` whose samples belong to groups ``group [B]`` (default 0)."""
        x = x.detach()
        if x.dim() == 0:
            raise DataError(f"{self.name}: observe() needs a batch [B, ...], got a scalar")
        b = x.shape[0]
        if group is None:
            group = torch.zeros(b, dtype=torch.int64)
        group = torch.as_tensor(group).detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        if group.numel() != b:
            raise DataError(
                f"{self.name}: group has {group.numel()} ids for a batch of {b} samples"
            )
        if b == 0:
            return
        if int(group.min()) < 0 or int(group.max()) >= self.num_groups:
            bad = int(group.min()) if int(group.min()) < 0 else int(group.max())
            raise DataError(
                f"{self.name}: group id {bad} outside 0..{self.num_groups - 1} "
                f"(the observer has num_groups={self.num_groups})"
            )
        rows = x.reshape(b, -1).cpu()
        if not rows.is_floating_point() or rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        if rows.shape[1] == 0:
            return
        mins, maxs = torch.aminmax(rows, dim=1)  # per sample; NaN and ±Inf show up here
        if not (torch.isfinite(mins).all() and torch.isfinite(maxs).all()):
            bad_count = int((~torch.isfinite(rows)).sum())
            raise DataError(
                f"{self.name}: activation contains NaN or Inf ({bad_count} values); "
                "check the model and the input data"
            )
        self._cached_range = None
        for g in torch.unique(group).tolist():
            members = torch.nonzero(group == g).reshape(-1)
            self.count[g] += members.numel() * rows.shape[1]
            self.group_min[g] = min(float(self.group_min[g]), float(mins[members].min()))
            self.group_max[g] = max(float(self.group_max[g]), float(maxs[members].max()))
            if self.keeps_samples:
                self._keep(g, rows, members)

    def _keep(self, g: int, rows: torch.Tensor, members: torch.Tensor) -> None:
        """Bottom-k sample of group g's values ``rows[members]``: keep the ``max_samples``
        values with the smallest uniform random keys.

        Once the buffer is full with largest kept key τ, a new value enters only if its key is
        below τ; those values are a uniform random subset of size ~Binomial(n, τ) with keys
        uniform in [0, τ), so only they are drawn (no key per value, no copy of the batch).
        """
        d = rows.shape[1]
        n = members.numel() * d
        old_v, old_k = self._values[g], self._keys[g]
        if old_k.numel() < self.max_samples:
            values = rows[members].reshape(-1).float()
            keys = torch.rand(n, generator=self._gen)
        else:
            tau = float(old_k.max())
            m = torch.binomial(
                torch.tensor([float(n)]), torch.tensor([tau]), generator=self._gen
            )
            pos = torch.randint(0, n, (int(m.item()),), generator=self._gen)
            # Without replacement: drop collisions through a mask (O(n), far cheaper than a
            # sort-based torch.unique, which dominated calibration time).
            hit = torch.zeros(n, dtype=torch.bool)
            hit[pos] = True
            pos = torch.nonzero(hit).reshape(-1)
            values = rows[members[pos // d], pos % d].float()
            keys = torch.rand(pos.numel(), generator=self._gen) * tau
        values = torch.cat([old_v, values])
        keys = torch.cat([old_k, keys])
        if keys.numel() > self.max_samples:
            keys, idx = torch.topk(keys, self.max_samples, largest=False, sorted=False)
            values = values[idx]
        self._values[g], self._keys[g] = values, keys

    # ----------------------------------------------------------------- views

    def observed_groups(self) -> list[int]:
        """Group ids that have contributed at least one value."""
        return [g for g in range(self.num_groups) if int(self.count[g]) > 0]

    def samples(self, g: int) -> torch.Tensor:
        """The kept subsample of group ``g`` (all its values while fewer than max_samples)."""
        return self._values[g]

    def group_minmax(self) -> list[tuple[float, float] | None]:
        """Exact ``(min, max)`` per group (None for a group not seen)."""
        return [
            (float(self.group_min[g]), float(self.group_max[g])) if int(self.count[g]) else None
            for g in range(self.num_groups)
        ]

    def minmax(self) -> tuple[float, float]:
        """Exact ``(min, max)`` over every value seen."""
        groups = self.observed_groups()
        if not groups:
            raise DataError(NO_DATA.format(name=self.name))
        return float(self.group_min[groups].min()), float(self.group_max[groups].max())

    def range(self) -> tuple[float, float]:
        """The proposed activation range ``(lo, hi)`` (cached until the next observe)."""
        if self._cached_range is None:
            self._cached_range = self._compute_range()
        return self._cached_range

    def _compute_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def qparams(self) -> tuple[float, int]:
        """uint8 ``(scale, zero_point)`` of :meth:`range` (widened to contain 0)."""
        return act_qparams(*self.range())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_groups={self.num_groups}, name={self.name!r})"


class MinMaxObserver(Observer):
    """``(min, max)`` over every value of every group."""

    def _compute_range(self) -> tuple[float, float]:
        return self.minmax()


def _quantiles(v: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (like ``numpy.quantile``), no size limit."""
    s = torch.sort(v.reshape(-1).double()).values
    out = []
    for q in qs:
        pos = q * (s.numel() - 1)  # position in the sorted values
        i = min(int(pos), s.numel() - 1)
        j = min(i + 1, s.numel() - 1)
        out.append(float(s[i] + (pos - i) * (s[j] - s[i])))
    return out


def group_percentile_range(
    samples: Sequence[torch.Tensor], percentile: float
) -> tuple[float, float]:
    """``(min_g q_g(100 - p), max_g q_g(p))``: each group's own percentiles, so each counts.

    Pure: ``samples`` holds one 1-D tensor of values per group (empty ones are skipped).
    """
    lows, highs = [], []
    for v in samples:
        if v.numel() == 0:
            continue
        lo, hi = _quantiles(v, ((100.0 - percentile) / 100.0, percentile / 100.0))
        lows.append(lo)
        highs.append(hi)
    if not lows:
        raise ValueError("no samples in any group")
    return min(lows), max(highs)


class PercentileObserver(Observer):
    """Per group ``lo_g`` = (100-p)-th and ``hi_g`` = p-th percentile; range = (min lo, max hi).

    A group's percentile is taken over that group's values only, so a 5% minority with 10×
    larger activations keeps its own p-th percentile instead of being clipped at the pooled
    one (which sits inside the minority's tail).
    """

    keeps_samples = True

    def __init__(self, num_groups: int, percentile: float = 99.99, **kwargs) -> None:
        if isinstance(percentile, bool) or not (50.0 < float(percentile) <= 100.0):
            raise ConfigError(f"percentile={percentile!r} must be in (50, 100]")
        super().__init__(num_groups, **kwargs)
        self.percentile = float(percentile)

    def _compute_range(self) -> tuple[float, float]:
        if not self.observed_groups():
            raise DataError(NO_DATA.format(name=self.name))
        lo, hi = group_percentile_range(self._values, self.percentile)
        # the subsample never leaves the exact range; clamp float round-off anyway
        mn, mx = self.minmax()
        return max(lo, mn), min(hi, mx)


def group_mse(
    values: torch.Tensor,
    bounds: Sequence[int],
    weights: Sequence[float],
    lo: float,
    hi: float,
) -> float:
    """``Σ_g w_g · mean_{v in g} (fq(v) - v)²`` on the uint8 grid of ``[lo, hi]``.

    Pure: ``values`` [M] holds the groups' values one after another, group k in
    ``values[bounds[k]:bounds[k+1]]``; ``weights`` [len(bounds) - 1] should sum to 1.
    """
    scale, zero_point = act_qparams(lo, hi)
    err = (fake_quantize_act(values, scale, zero_point) - values).pow_(2)
    total = 0.0
    for k, w in enumerate(weights):
        a, b = bounds[k], bounds[k + 1]
        if b > a and w:
            total += float(w) * float(err[a:b].sum()) / (b - a)
    return total


class MSEObserver(Observer):
    """Range ``t·[lo, hi]`` of the min-max range (0 included) minimising the group-mean MSE.

    Objective: ``(1/G) Σ_g mean_{v in g} (fq(v) - v)²`` over the groups seen, so every group
    counts equally whatever its size (``group_weights`` replaces the equal weights). The
    search: a joint shrink ``t`` of both ends, then ``hi`` alone, then ``lo`` alone, each over
    :data:`MSE_SHRINKS`.
    """

    keeps_samples = True

    def __init__(
        self,
        num_groups: int,
        *,
        group_weights: Sequence[float] | None = None,
        shrinks: Sequence[float] = MSE_SHRINKS,
        eval_samples: int = MSE_EVAL_SAMPLES,
        **kwargs,
    ) -> None:
        super().__init__(num_groups, **kwargs)
        if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 1:
            raise ConfigError(f"eval_samples={eval_samples!r} must be an integer >= 1")
        self.eval_samples = eval_samples
        if group_weights is not None:
            w = torch.as_tensor(list(group_weights), dtype=torch.float64)
            if w.numel() != num_groups or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ConfigError(
                    f"group_weights={list(group_weights)!r} must hold {num_groups} "
                    "non-negative weights, not all zero"
                )
            self.group_weights: torch.Tensor | None = w
        else:
            self.group_weights = None
        if not shrinks or any(not (0.0 < float(t) <= 1.0) for t in shrinks):
            raise ConfigError(f"shrinks={shrinks!r} must be non-empty factors in (0, 1]")
        self.shrinks = tuple(float(t) for t in shrinks)

    def _eval_sample(self, g: int) -> torch.Tensor:
        """At most ``eval_samples`` of group g's kept values (those with the smallest keys)."""
        v, k = self._values[g], self._keys[g]
        if v.numel() <= self.eval_samples:
            return v
        return v[torch.topk(k, self.eval_samples, largest=False, sorted=False).indices]

    def _weights(self, groups: list[int]) -> torch.Tensor:
        w = torch.zeros(self.num_groups, dtype=torch.float64)
        if self.group_weights is None:
            w[groups] = 1.0
        else:
            w[groups] = self.group_weights[groups]
        if float(w.sum()) <= 0:  # every group seen has weight 0: fall back to equal
            w[groups] = 1.0
        return w / w.sum()

    def _compute_range(self) -> tuple[float, float]:
        groups = self.observed_groups()
        if not groups:
            raise DataError(NO_DATA.format(name=self.name))
        per_group = [self._eval_sample(g) for g in groups]
        values = torch.cat(per_group)
        bounds = [0]
        for v in per_group:
            bounds.append(bounds[-1] + v.numel())
        weights = self._weights(groups)[groups].tolist()
        mn, mx = self.minmax()
        lo0, hi0 = min(mn, 0.0), max(mx, 0.0)
        if hi0 - lo0 <= 0.0:
            return lo0, hi0

        def cost(lo: float, hi: float) -> float:
            return group_mse(values, bounds, weights, lo, hi)

        best = (lo0, hi0)
        best_cost = cost(*best)
        for t in self.shrinks:  # both ends together
            c = cost(t * lo0, t * hi0)
            if c < best_cost:
                best, best_cost = (t * lo0, t * hi0), c
        for t in self.shrinks:  # upper end alone
            if hi0 > 0 and (c := cost(best[0], t * hi0)) < best_cost:
                best, best_cost = (best[0], t * hi0), c
        lo_fixed_hi = best[1]
        for t in self.shrinks:  # lower end alone
            if lo0 < 0 and (c := cost(t * lo0, lo_fixed_hi)) < best_cost:
                best, best_cost = (t * lo0, lo_fixed_hi), c
        logger.debug("%s: MSE range %s (min-max %s), cost %.3g", self.name, best, (mn, mx), best_cost)
        return best


def make_observer(
    kind: str,
    num_groups: int,
    percentile: float = 99.99,
    **kwargs,
) -> Observer:
    """An observer by kind: ``"minmax"``, ``"percentile"`` or ``"mse"``.

    Extra keyword arguments (``max_samples``, ``seed``, ``name``; ``group_weights`` for MSE)
    go to the observer.
    """
    key = str(kind).lower().replace("-", "").replace("_", "")
    if key == "minmax":
        return MinMaxObserver(num_groups, **kwargs)
    if key == "percentile":
        return PercentileObserver(num_groups, percentile=percentile, **kwargs)
    if key == "mse":
        return MSEObserver(num_groups, **kwargs)
    raise ConfigError(f"observer kind={kind!r} is not one of {', '.join(KINDS)}")
