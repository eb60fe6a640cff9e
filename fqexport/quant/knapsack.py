"""Exact multiple-choice knapsack: one option per layer, minimal total cost under a capacity.

Problem (MCKP): layers ``l = 1..L``, each with options ``k`` of cost ``c_lk`` and integer
weight ``w_lk >= 0``; choose ``k_l`` per layer to

    minimise  Σ_l c_{l,k_l}   subject to   Σ_l w_{l,k_l} <= C.

Dynamic programme over the capacity (exact for integer weights):

    D_0(u) = 0 for every u in 0..C,
    D_l(u) = min_k [ D_{l-1}(u - w_lk) + c_lk ]   (options with w_lk > u excluded),

``D_L(C)`` is the optimum; the arg-min of each layer at each capacity is kept to trace the
choice back. Before the DP each layer's smallest weight is moved into the capacity
(``w_lk ← w_lk − min_k w_lk``, ``C ← C − Σ_l min_k w_lk``) and all weights are divided by their
gcd: both leave the feasible set unchanged and shrink the table.

Real-valued weights (bytes, BOPs, bits·params of a large model) are discretised by
:func:`discretize`: ``w ← ceil(w / unit)``, ``C ← floor(C / unit)``. Rounding weights *up* and the
capacity *down* means every allocation the DP accepts also fits the true budget; ``unit`` is
picked so the table stays at ``max_cells`` cells or fewer (the optimum may then be slightly
conservative, never over budget).

Pure numpy: arrays in, arrays out (no logging, no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

from fqexport.errors import ConfigError

DEFAULT_MAX_CELLS = 4_000_000  # layers × capacity cells of the DP table

MSG_SHAPES = (
    "knapsack: layer {layer} has {nc} costs and {nw} weights; every layer needs one cost and "
    "one weight per option, and at least one option"
)
MSG_NEG_WEIGHT = "knapsack: layer {layer} has a negative weight {w}; weights must be >= 0"
MSG_NOT_INT = "knapsack: weights and capacity must be integers here (use discretize() for real ones)"
MSG_INFEASIBLE = (
    "knapsack: no choice fits the capacity: the lightest option of every layer together weighs "
    "{need}, the capacity is {cap}. Raise the budget (or unpin layers / allow fewer bits)"
)
MSG_NONFINITE = "knapsack: layer {layer} has a NaN cost; costs must be finite or +inf"
MSG_CELLS = "knapsack: max_cells={cells!r} must be >= the number of layers ({layers})"


@dataclass(frozen=True)
class KnapsackSolution:
    """The chosen option index per layer, its total cost and total (integer) weight."""

    choice: tuple[int, ...]
    cost: float
    weight: int


def _check(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]]) -> None:
    if len(costs) != len(weights):
        raise ConfigError(MSG_SHAPES.format(layer="count", nc=len(costs), nw=len(weights)))
    for l, (c, w) in enumerate(zip(costs, weights)):
        if len(c) != len(w) or len(c) == 0:
            raise ConfigError(MSG_SHAPES.format(layer=l, nc=len(c), nw=len(w)))
        for x in w:
            if x < 0:
                raise ConfigError(MSG_NEG_WEIGHT.format(layer=l, w=x))
        if any(math.isnan(float(x)) for x in c):
            raise ConfigError(MSG_NONFINITE.format(layer=l))


def solve(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int) -> KnapsackSolution:
    """Exact MCKP on integer weights (see the module docstring for the recursion).

    Args:
        costs: per layer, the cost of each option (``+inf`` forbids an option).
        weights: per layer, the integer weight of each option (>= 0).
        capacity: the integer capacity C.

    Raises:
        ConfigError: shapes disagree, a weight is negative or not an integer, or nothing fits.
    """
    _check(costs, weights)
    if any(int(x) != x for w in weights for x in w) or int(capacity) != capacity:
        raise ConfigError(MSG_NOT_INT)
    w_int = [np.asarray([int(x) for x in w], dtype=np.int64) for w in weights]
    c_arr = [np.asarray(c, dtype=np.float64) for c in costs]
    base = [int(w.min()) for w in w_int]
    need = sum(base)
    cap = int(capacity) - need
    if cap < 0:
        raise ConfigError(MSG_INFEASIBLE.format(need=need, cap=int(capacity)))
    rel = [w - b for w, b in zip(w_int, base)]
    g = reduce(math.gcd, (int(x) for w in rel for x in w if x > 0), 0)
    if g > 1:
        rel = [w // g for w in rel]
        cap //= g
    # Capacity beyond the heaviest possible choice is never used.
    cap = min(cap, int(sum(int(w.max()) for w in rel)))

    n = cap + 1
    dp = np.zeros(n, dtype=np.float64)  # D_0(u) = 0
    back = np.zeros((len(rel), n), dtype=np.int16)
    for l, (c, w) in enumerate(zip(c_arr, rel)):
        new = np.full(n, np.inf)
        arg = back[l]
        for k in range(len(c)):
            wk = int(w[k])
            if wk >= n:
                continue
            cand = dp[: n - wk] + c[k]  # D_{l-1}(u - w_lk) + c_lk for u >= w_lk
            better = cand < new[wk:]
            np.copyto(new[wk:], cand, where=better)
            np.copyto(arg[wk:], np.int16(k), where=better)
        dp = new
    if not np.isfinite(dp[cap]):
        raise ConfigError(MSG_INFEASIBLE.format(need=need, cap=int(capacity)))
    # Trace back from the full capacity.
    choice = [0] * len(rel)
    u = cap
    for l in range(len(rel) - 1, -1, -1):
        k = int(back[l, u])
        choice[l] = k
        u -= int(rel[l][k])
    total_w = sum(int(w_int[l][k]) for l, k in enumerate(choice))
    total_c = float(sum(float(c_arr[l][k]) for l, k in enumerate(choice)))
    return KnapsackSolution(tuple(choice), total_c, total_w)


def discretize(
    weights: Sequence[Sequence[float]], capacity: float, max_cells: int = DEFAULT_MAX_CELLS
) -> tuple[list[list[int]], int, float]:
    """Integer weights and capacity for :func:`solve` from real ones, never over the budget.

    Each layer's lightest option is moved into the capacity first (``w' = w − min_k w``,
    ``C' = C − Σ_l min_k w_lk``, exact in reals), then ``w'' = ceil(w' / unit)`` and
    ``C'' = floor(C' / unit)``, with ``unit = 1`` when the weights are integers and the table fits,
    else ``unit = span / (max_cells / L − 1)`` (span: the part of ``C'`` any choice can use).
    Rounding weights up and the capacity down means an accepted choice satisfies
    ``Σ w'_true <= unit·Σ w'' <= unit·C'' <= C'``, i.e. the true budget holds.

    Returns ``(integer weights w'', integer capacity C'', unit)``; a negative ``C''`` means
    nothing fits (``solve`` then raises).
    """
    layers = len(weights)
    if int(max_cells) < 2 * max(layers, 1):
        raise ConfigError(MSG_CELLS.format(cells=max_cells, layers=layers))
    mins = [min(float(x) for x in w) if len(w) else 0.0 for w in weights]
    rel = [[float(x) - m for x in w] for w, m in zip(weights, mins)]
    cap = float(capacity) - sum(mins)
    if cap < 0:
        return [[0 for _ in w] for w in rel], -1, 1.0
    heaviest = sum(max(w) for w in rel if w)
    span = min(cap, heaviest)
    per_layer = int(max_cells) // max(layers, 1)
    exact = all(float(x).is_integer() for w in weights for x in w)
    if exact and span + 1 <= per_layer:
        unit = 1.0
    else:
        unit = max(span / (per_layer - 1), 1e-300)
    w_int = [[int(math.ceil(x / unit)) for x in w] for w in rel]
    # Floating-point guard: every rounded weight covers its true weight.
    w_int = [[wi + 1 if wi * unit < x else wi for wi, x in zip(ws, w)] for ws, w in zip(w_int, rel)]
    c_int = int(math.floor(cap / unit))
    if c_int * unit > cap:
        c_int -= 1
    return w_int, c_int, unit


def solve_real(
    costs: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    capacity: float,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> KnapsackSolution:
    """MCKP on real (or large integer) weights via :func:`discretize`; never exceeds ``capacity``.

    The returned ``weight`` is the true (real) total weight of the choice, rounded down to an
    int only for the record; compare budgets with the true weights of the choice.
    """
    _check(costs, weights)
    w_int, cap, unit = discretize(weights, capacity, max_cells)
    if cap < 0:
        need = sum(min(float(x) for x in w) for w in weights)
        raise ConfigError(MSG_INFEASIBLE.format(need=f"{need:g}", cap=f"{float(capacity):g}"))
    sol = solve(costs, w_int, cap)
    true_w = sum(float(weights[l][k]) for l, k in enumerate(sol.choice))
    return KnapsackSolution(sol.choice, sol.cost, int(math.floor(true_w)))
