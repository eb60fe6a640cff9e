"""Exact multiple-choice knapsack: brute-force agreement, budgets, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fqexport.errors import ConfigError
from fqexport.quant.knapsack import discretize, solve, solve_real


def brute_force(costs, weights, capacity):
    best = (math.inf, None)
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(weights[l][k] for l, k in enumerate(choice))
        if w <= capacity:
            c = sum(costs[l][k] for l, k in enumerate(choice))
            if c < best[0]:
                best = (c, choice)
    return best


def random_instance(rng, layers, options, wmax):
    costs = [rng.uniform(0, 10, options).round(3).tolist() for _ in range(layers)]
    weights = [rng.integers(0, wmax, options).tolist() for _ in range(layers)]
    return costs, weights


def test_dp_matches_brute_force_on_random_small_cases():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        layers, options = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        costs, weights = random_instance(rng, layers, options, 12)
        lightest = sum(min(w) for w in weights)
        capacity = int(rng.integers(lightest, lightest + 25))
        best_cost, _ = brute_force(costs, weights, capacity)
        sol = solve(costs, weights, capacity)
        assert sol.cost == pytest.approx(best_cost, abs=1e-9)
        assert sol.weight <= capacity
        assert sol.weight == sum(weights[l][k] for l, k in enumerate(sol.choice))
        assert sol.cost == pytest.approx(sum(costs[l][k] for l, k in enumerate(sol.choice)))
        checked += 1
    assert checked == 200


def test_bit_allocation_shape_instance_with_gcd_and_offsets():
    # weights = bits * params: a gcd (params share factors) and a base (2 bits) to move out
    params = [432, 2304, 9216, 640]
    bits = [2, 3, 4, 8]
    weights = [[b * p for b in bits] for p in params]
    costs = [[4.0, 1.1, 0.5, 0.0], [3.0, 2.0, 0.2, 0.0], [9.0, 1.0, 0.1, 0.0], [1.3, 0.45, 0.4, 0.0]]
    capacity = int(3.0 * sum(params))
    best_cost, best_choice = brute_force(costs, weights, capacity)
    sol = solve(costs, weights, capacity)
    assert sol.choice == best_choice
    assert sol.cost == pytest.approx(best_cost)


def test_infinite_cost_forbids_an_option():
    costs = [[0.0, math.inf], [1.0, 5.0]]
    weights = [[5, 0], [0, 0]]
    sol = solve(costs, weights, 5)
    assert sol.choice == (0, 0)
    assert sol.cost == 1.0


def test_infeasible_capacity_names_the_lightest_weight():
    with pytest.raises(ConfigError, match="lightest option of every layer together weighs 7, the capacity is 6"):
        solve([[1.0, 2.0], [1.0]], [[3, 4], [4]], 6)


def test_bad_shapes_and_weights_are_config_errors():
    with pytest.raises(ConfigError, match="layer 0 has 2 costs and 1 weights"):
        solve([[1.0, 2.0]], [[1]], 3)
    with pytest.raises(ConfigError, match="negative weight -1"):
        solve([[1.0]], [[-1]], 3)
    with pytest.raises(ConfigError, match="must be integers"):
        solve([[1.0]], [[1.5]], 3)


def test_discretize_never_exceeds_the_true_budget():
    rng = np.random.default_rng(1)
    for trial in range(100):
        layers = int(rng.integers(1, 5))
        weights = [rng.uniform(0, 1000.0, 3).tolist() for _ in range(layers)]
        costs = [rng.uniform(0, 1, 3).tolist() for _ in range(layers)]
        lightest = sum(min(w) for w in weights)
        capacity = lightest + float(rng.uniform(0, 1500))
        sol = solve_real(costs, weights, capacity, max_cells=16 * layers)  # very coarse on purpose
        true_w = sum(weights[l][k] for l, k in enumerate(sol.choice))
        assert true_w <= capacity + 1e-9
        exact_cost, _ = brute_force(costs, weights, capacity)
        assert sol.cost >= exact_cost - 1e-12  # coarse grid can only be conservative


def test_discretize_is_exact_for_integer_weights_that_fit():
    w_int, cap, unit = discretize([[2, 4, 6], [1, 3]], 9, max_cells=1000)
    assert unit == 1.0
    assert w_int == [[0, 2, 4], [0, 2]]  # lightest option moved into the capacity
    assert cap == 6


def test_fine_real_grid_reaches_the_exact_optimum():
    rng = np.random.default_rng(2)
    costs, weights = random_instance(rng, 4, 4, 50)
    weights = [[w * 1.5 for w in ws] for ws in weights]  # non-integer, still exactly representable
    capacity = sum(min(w) for w in weights) + 40.0
    exact_cost, _ = brute_force(costs, weights, capacity)
    sol = solve_real(costs, weights, capacity, max_cells=400_000)
    assert sol.cost == pytest.approx(exact_cost)
