"""The allocations a search verifies: the allocator's options, fixed once from the configs, and
the pool of candidates built with them."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence


from fqexport.calibration.group_data import GroupData, GroupWeights
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.search.allocation import (
    Allocation,
    AllocationOptions,
    Budget,
    LayerCost,
    search_pins,
)
from fqexport.search.sensitivity import SensitivityTable


def population_weights(data: GroupData) -> dict[str, float]:
    """The calibration data's group proportions (``GroupWeights("samples")``)."""
    alpha = GroupWeights("samples").vector(data.group_names, data.group_counts())
    return {g: float(a) for g, a in zip(data.group_names, alpha)}


def search_group_weights(mp: MixedPrecisionConfig, data: GroupData) -> dict[str, float] | None:
    """Group weights of the inner problem: the user's for 'weighted'; population shares for
    'mean' (the calibration data's group proportions, as HAWQ weights samples); None otherwise."""
    if mp.group_weights:
        return {str(k): float(v) for k, v in mp.group_weights.items()}
    if mp.objective == "mean":
        return population_weights(data)
    return None


def allocation_options(mp: MixedPrecisionConfig, base: QuantConfig, data: GroupData, layers: Sequence[str],
                       overhead: float = 0.0, float_params: int = 0) -> AllocationOptions:
    """The allocator's options for a search: ``mp``'s budget (a bits budget also covers the
    ``float_params`` weights that stay float, at 32 bits), objective, pins (the first/last
    pins resolved on ``layers``), λ and multiplicative-weights steps, the group weights
    (:func:`search_group_weights`), ``base``'s storage and target, and the file's estimated bytes
    outside the weights (``overhead``, bytes budgets)."""
    return AllocationOptions(
        budget=Budget(mp.budget_kind, mp.budget_value, float_params),
        objective=mp.objective,
        pins=search_pins(mp.pins, layers, mp.pin_first_last),
        group_weights=search_group_weights(mp, data),
        mean_weight=mp.mean_weight,
        steps=mp.mw_steps,
        eta=mp.mw_eta,
        storage=base.storage,
        overhead=overhead,
        target=base.target,
    )


def candidate_pool(table: SensitivityTable, layers: Sequence[LayerCost], options: AllocationOptions,
                   mp: MixedPrecisionConfig, data: GroupData) -> list[tuple[Allocation, str]]:
    """The allocations to verify with their origin, each once: the best ``num_candidates``
    knapsack allocations ("search"), the uniform allocation at every width that fits the budget
    ("uniform", ``verify_uniform``) and the mean-objective optimum ("mean", ``verify_mean``),
    scored like the objective."""
    pool = [(a, "search") for a in options.candidates(table, layers)[: mp.num_candidates]]
    if mp.verify_uniform:
        pool += [(a, "uniform") for a in options.uniforms(table, layers)]
    if mp.verify_mean and mp.objective != "mean":
        mean = replace(options, objective="mean", group_weights=population_weights(data))
        pool.append((options.rescore(mean.candidates(table, layers)[0]), "mean"))
    out: list[tuple[Allocation, str]] = []
    for a, origin in pool:  # a candidate identical to an earlier one is fitted once
        if all(a.bits != b.bits for b, _ in out):
            out.append((a, origin))
    return out
