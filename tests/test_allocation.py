"""Bit allocation: budgets, pins, objectives (worst-group protects a minority-only layer)."""

from __future__ import annotations

import functools
import inspect
import itertools

import numpy as np
import pytest

from fqexport.config import QuantConfig
from fqexport.errors import ConfigError
from fqexport.search import allocation
from fqexport.search.allocation import (
    AllocationOptions,
    Budget,
    LayerCost,
    container_bits,
    first_last_pins,
    layer_resource,
    rescore,
    resolve_pins,
    resource_used,
    search_pins,
)
from fqexport.search.sensitivity import SensitivityTable

# the allocation math in nominal bits (no scales); stored sizes are tested below
candidate_allocations = functools.partial(allocation.candidate_allocations, storage="ideal")

BITS = (2, 3, 4, 8)
GROUPS = ("majority", "minority")


def table(delta: dict[str, list[list[float]]], bits=BITS) -> SensitivityTable:
    """delta[layer] = per width, [Δ_majority, Δ_minority]."""
    layers = tuple(delta)
    arr = np.array([delta[l] for l in layers], dtype=np.float64)
    return SensitivityTable(layers, tuple(bits), GROUPS, arr, "measured")


def minority_layer_case():
    """'shared' hurts both groups a little; 'minority_path' hurts only the minority, a lot.

    Same params each: the budget (3 bits average) lets one layer have 4 bits, the other 2.
    """
    t = table({
        "shared": [[0.30, 0.30], [0.10, 0.10], [0.05, 0.05], [0.0, 0.0]],
        "minority_path": [[0.0, 2.0], [0.0, 0.5], [0.0, 0.1], [0.0, 0.0]],
        "big": [[0.02, 0.02], [0.01, 0.01], [0.0, 0.0], [0.0, 0.0]],
    })
    infos = [LayerCost("shared", 1000, 1000, 10), LayerCost("minority_path", 1000, 1000, 10),
             LayerCost("big", 1000, 1000, 10)]
    return t, infos


def test_worst_group_protects_the_layer_only_the_minority_depends_on():
    t, infos = minority_layer_case()
    budget = Budget("bits", 3.0)  # 9000 bit·params: e.g. 4 + 3 + 2 or 3 + 4 + 2
    # population-weighted mean (90/10): the minority's layer is cheap to sacrifice
    mean = candidate_allocations(t, infos, budget, "mean", group_weights={"majority": 0.9, "minority": 0.1})[0]
    worst = candidate_allocations(t, infos, budget, "worst-group")[0]
    assert mean.bits["minority_path"] < worst.bits["minority_path"]
    assert worst.bits["minority_path"] >= 4
    assert worst.predicted["minority"] < mean.predicted["minority"]
    assert max(worst.predicted.values()) < max(mean.predicted.values())
    # brute force: worst-group's max_g D_g is the true minimax optimum here
    best = min(
        max(sum(t.at(l, b)[g] for l, b in zip(t.layers, c)) for g in range(2))
        for c in itertools.product(BITS, repeat=3)
        if sum(c) * 1000 <= 9000
    )
    assert max(worst.predicted.values()) == pytest.approx(best)


def test_weighted_objective_follows_the_user_weights():
    t, infos = minority_layer_case()
    budget = Budget("bits", 3.0)
    w_min = candidate_allocations(t, infos, budget, "weighted", group_weights={"minority": 1.0, "majority": 0.0})[0]
    w_maj = candidate_allocations(t, infos, budget, "weighted", group_weights={"majority": 1.0})[0]
    assert w_min.bits["minority_path"] > w_maj.bits["minority_path"]
    with pytest.raises(ConfigError, match="objective='weighted' needs group_weights"):
        candidate_allocations(t, infos, budget, "weighted")[0]
    with pytest.raises(ConfigError, match=r"group_weights \(the weighted objective's; CLI --objective-weights\) names 'nobody'"):
        candidate_allocations(t, infos, budget, "weighted", group_weights={"nobody": 1.0})[0]


def random_case(rng, layers=5):
    names = [f"l{i}" for i in range(layers)]
    # Δ decreasing in bits, random per group
    d = np.sort(rng.uniform(0, 1, (layers, len(BITS), 2)), axis=1)[:, ::-1]
    t = SensitivityTable(tuple(names), BITS, GROUPS, d.copy(), "measured")
    infos = [LayerCost(n, int(rng.integers(10, 5000)), int(rng.integers(100, 10**6)), int(rng.integers(1, 64)))
             for n in names]
    return t, infos


@pytest.mark.parametrize("kind", ["bits", "bytes", "bops"])
def test_budget_never_exceeded(kind):
    rng = np.random.default_rng({"bits": 0, "bytes": 1, "bops": 2}[kind])
    for trial in range(12):
        t, infos = random_case(rng)
        lo = resource_used({i.name: 2 for i in infos}, infos, kind, "ideal")
        hi = resource_used({i.name: 8 for i in infos}, infos, kind, "ideal")
        value = float(rng.uniform(lo, hi))
        for objective in ("worst-group", "mean"):
            cands = candidate_allocations(t, infos, Budget(kind, value), objective, steps=10)
            for a in cands:
                assert resource_used(a.bits, infos, kind, "ideal") <= value + 1e-9
                assert a.used == pytest.approx(resource_used(a.bits, infos, kind, "ideal"))


def test_mean_objective_is_the_exact_knapsack_optimum():
    rng = np.random.default_rng(5)
    for trial in range(10):
        t, infos = random_case(rng, layers=4)
        cap = 3.3
        a = candidate_allocations(t, infos, Budget("bits", cap), "mean")[0]
        total = sum(i.params for i in infos)
        best = min(
            sum(t.at(l, b).mean() for l, b in zip(t.layers, c))
            for c in itertools.product(BITS, repeat=4)
            if sum(b * i.params for b, i in zip(c, infos)) <= cap * total
        )
        assert a.score == pytest.approx(best)


def test_rescore_scores_an_allocation_like_another_objective():
    t, infos = minority_layer_case()
    mean = candidate_allocations(t, infos, Budget("bits", 3.0), "mean", group_weights={"majority": 0.9, "minority": 0.1})[0]
    d = np.array([mean.predicted[g] for g in GROUPS])
    wg = rescore(mean, "worst-group", mean_weight=0.5)
    assert wg.objective == "worst-group" and wg.bits == mean.bits and wg.predicted == mean.predicted
    assert wg.score == pytest.approx(d.max() + 0.5 * d.mean())
    assert wg.group_weights == mean.group_weights  # still says which inner problem produced it
    # on the same footing as the worst-group candidates: the mean optimum gives up the minority
    assert wg.score > candidate_allocations(t, infos, Budget("bits", 3.0), "worst-group", mean_weight=0.5)[0].score
    weighted = rescore(mean, "weighted", group_weights={"majority": 1.0, "minority": 3.0})
    assert weighted.score == pytest.approx(d @ np.array([0.25, 0.75]))


def test_pinned_layers_keep_their_width():
    t, infos = minority_layer_case()
    a = candidate_allocations(t, infos, Budget("bits", 4.0), "worst-group", pins={"shared": 8, "b*": 2})[0]
    assert a.bits["shared"] == 8
    assert a.bits["big"] == 2
    assert resource_used(a.bits, infos, "bits", "ideal") <= 4.0
    # a pinned width missing from the table uses the nearest measured width above it
    b = candidate_allocations(t, infos, Budget("bits", 5.0), "mean", pins={"minority_path": 6})[0]
    assert b.bits["minority_path"] == 6


def test_pin_errors_name_the_pattern():
    with pytest.raises(ConfigError, match=r"pin 'fc\*' matches no layer \(layers: a, b\)"):
        resolve_pins({"fc*": 8}, ["a", "b"])
    with pytest.raises(ConfigError, match=r"pins\['a'\]=8 and pins\['\*'\]=4 both match layer 'a': it is pinned twice"):
        resolve_pins({"a": 8, "*": 4}, ["a", "b"])
    with pytest.raises(ConfigError, match="pinned widths must be integers from 2 to 8"):
        resolve_pins({"a": 9}, ["a"])
    assert first_last_pins(["stem", "mid", "fc"], 8) == {"stem": 8, "fc": 8}
    assert first_last_pins(["stem", "mid", "fc"], None) == {}


def test_search_pins_merge_first_last_with_user_pins():
    layers = ["stem", "mid", "fc"]
    assert search_pins({"mid": 4}, layers, 8) == {"mid": 4, "stem": 8, "fc": 8}
    assert search_pins({"fc": 8}, layers, 8) == {"fc": 8, "stem": 8}
    assert search_pins(None, layers, None) == {}
    with pytest.raises(ConfigError, match=r"pin_first_last=8 pins layer 'fc' \(the last quantizable layer\), "
                                          r"which pins\['fc'\] pins to 6"):
        search_pins({"fc": 6}, layers, 8)
    # a pattern that matches the first layer conflicts too (not only the layer's exact name)
    with pytest.raises(ConfigError, match=r"pin_first_last=8 pins layer 'stem' \(the first quantizable layer\), "
                                          r"which pins\['s\*'\] pins to 2"):
        search_pins({"s*": 2}, layers, 8)
    assert search_pins({"s*": 8}, layers, 8) == {"s*": 8, "stem": 8, "fc": 8}


def test_infeasible_budget_says_what_is_needed():
    t, infos = minority_layer_case()
    with pytest.raises(ConfigError, match=r"budget_bits=3 cannot be met.*needs 4\b"):
        candidate_allocations(t, infos, Budget("bits", 3.0), "worst-group", pins={"shared": 8})[0]


def test_infeasible_bits_budget_counts_the_float_weights_in_its_minimum():
    """The smallest allocation's average runs over the float weights too, at 32 bits each."""
    t, infos = minority_layer_case()
    floats = 3 * sum(i.params for i in infos)  # three times the quantized weights stay float
    smallest = sum(layer_resource(i, 2, "bits", "ideal") for i in infos)  # nominal: 2 bits per weight
    need = (smallest + 32 * floats) / (sum(i.params for i in infos) + floats)  # = (2 + 96) / 4 = 24.5
    with pytest.raises(ConfigError) as info:
        candidate_allocations(t, infos, Budget("bits", 12.0, float_params=floats), "mean", storage="ideal")
    assert f"needs {need:g}. " in str(info.value) and need == 24.5
    assert f"with the {floats:,} weights of the layers that stay float, counted at 32 bits" in str(info.value)


def test_resources_bytes_and_bops():
    info = LayerCost("conv", params=1000, macs=50_000, channels=16)
    # auto: 3 bits in INT4 behind a Cast (500 B + fp32 scales), 6 bits in int8 (1000 B + fp32
    # scales); a conv's zero points (0) are not written
    assert layer_resource(info, 3, "bytes", "auto") == 500 + 64
    assert layer_resource(info, 6, "bytes", "auto") == 1000 + 64
    # packed: 3 bits in INT4 (500 B + fp32 scales), 2 bits in INT2 (250 B + fp32 scales in a Mul)
    assert layer_resource(info, 3, "bytes", "packed") == 500 + 64
    assert layer_resource(info, 2, "bytes", "packed") == 250 + 64
    assert layer_resource(info, 3, "bytes", "ideal") == 375 + 80
    # stored bits count the scales
    assert layer_resource(info, 2, "bits", "packed") == pytest.approx(8 * (250 + 64))
    assert layer_resource(info, 4, "bops") == 4 * 8 * 50_000
    assert container_bits(5, "int8") == 8
    with pytest.raises(ConfigError, match="budget kind='flops' is not one of bits, bytes, bops"):
        Budget("flops", 1.0)
    with pytest.raises(ConfigError, match="budget_bits=-1 must be a finite number > 0"):
        Budget("bits", -1)
    with pytest.raises(ConfigError, match="budget_bytes=inf must be a finite number > 0"):
        Budget("bytes", float("inf"))
    # the same check as MixedPrecisionConfig: stored bits per weight lie in [2, 32]
    with pytest.raises(ConfigError, match=r"budget_bits=33 must be in \[2, 32\]"):
        Budget("bits", 33)
    with pytest.raises(ConfigError, match="storage='int3' is not one of auto, int8, packed, ideal"):
        container_bits(4, "int3")


def test_allocation_to_dict_reports_bits_and_prediction():
    t, infos = minority_layer_case()
    a = candidate_allocations(t, infos, Budget("bits", 4.0), "worst-group")[0]
    d = a.to_dict()
    assert d["bits"] == a.bits
    assert d["budget"] == {"kind": "bits", "value": 4.0}
    assert set(d["predicted_loss_increase"]) == set(GROUPS)
    assert d["avg_bits"] <= 4.0


def test_noisy_negative_or_non_monotone_deltas_do_not_buy_fewer_bits():
    # 'noisy': the minority's Δ at 2 bits measured below zero, its 3-bit Δ below the 4-bit one
    t = table({
        "noisy": [[0.05, -0.5], [0.02, 0.01], [0.01, 0.03], [0.0, 0.0]],
        "other": [[0.2, 0.2], [0.1, 0.1], [0.05, 0.05], [0.0, 0.0]],
    })
    infos = [LayerCost("noisy", 1000, 1000, 10), LayerCost("other", 1000, 1000, 10)]
    for objective in ("worst-group", "mean"):
        # a budget that fits every layer at 8 bits: nothing is gained by fewer bits
        a = candidate_allocations(t, infos, Budget("bits", 8.0), objective)[0]
        assert a.bits == {"noisy": 8, "other": 8}, objective
    a = candidate_allocations(t, infos, Budget("bits", 3.0), "worst-group")[0]
    # the envelope max(0, max over wider widths): 2 bits -> (0.05, 0.03), 3 bits -> (0.02, 0.03)
    if a.bits["noisy"] == 2:
        assert a.predicted["minority"] >= 0.03 - 1e-12
    assert all(v >= 0 for v in a.predicted.values())


def test_stored_bits_count_containers_and_scales_and_uniform_candidates_cover_every_fitting_width():
    t, infos = minority_layer_case()
    # packed (and the default, auto, for convs): 2 bits = (250 + 40) B, 4 bits (and 3, in INT4)
    # = (500 + 40) B, 8 bits = 1040 B
    assert allocation.stored_bits(infos[0], 3, "packed") == allocation.stored_bits(infos[0], 4, "packed") == 8 * 540 / 1000
    found = allocation.uniform_allocations(t, infos, Budget("bits", 4.5))
    assert [a.uniform_width for a in found] == [4, 3, 2]  # 8 bits (8.32 stored) does not fit
    assert [a.weight_bytes for a in found] == [3 * 540, 3 * 540, 3 * 290]
    assert found[0].avg_bits == 4.0 and found[0].stored_bits == pytest.approx(4.32)
    a = allocation.candidate_allocations(t, infos, Budget("bits", 3.5))[0]
    assert a.stored_bits <= 3.5 and a.used == pytest.approx(a.stored_bits)
    with pytest.raises(ConfigError, match=r"needs 8\.32.*storage='int8' stores every width in an 8-bit container"):
        allocation.candidate_allocations(t, infos, Budget("bits", 4.0), storage="int8")


def test_the_allocator_counts_in_quant_configs_default_storage():
    default = QuantConfig().storage
    for fn in (allocation.candidate_allocations, allocation.uniform_allocations, allocation.layer_resource,
               allocation.resource_used):
        assert inspect.signature(fn).parameters["storage"].default == default, fn.__name__
    assert AllocationOptions(Budget("bits", 4.0)).storage == default
    t, infos = minority_layer_case()
    assert allocation.candidate_allocations(t, infos, Budget("bits", 4.0))[0].storage == default


def test_allocation_options_ask_the_allocator_with_their_options():
    t, infos = minority_layer_case()
    options = AllocationOptions(Budget("bits", 4.0), "worst-group", {"shared": 8}, mean_weight=0.5, steps=10,
                                storage="ideal")
    assert options.candidates(t, infos) == candidate_allocations(t, infos, Budget("bits", 4.0), "worst-group",
                                                                 {"shared": 8}, mean_weight=0.5, steps=10)
    assert options.uniforms(t, infos) == allocation.uniform_allocations(
        t, infos, Budget("bits", 4.0), "worst-group", {"shared": 8}, mean_weight=0.5, storage="ideal")
    mean = candidate_allocations(t, infos, Budget("bits", 4.0), "mean", {"shared": 8})[0]
    assert options.rescore(mean) == rescore(mean, "worst-group", mean_weight=0.5)


def test_the_gpu_target_counts_its_own_containers():
    linear = LayerCost("fc", params=192 * 24, macs=192 * 24, channels=24, kind="linear")  # K = 192: blocks of 64
    conv = LayerCost("conv", params=1000, macs=50_000, channels=16)
    # a 2-4-bit Linear: INT4 codes two per byte (unpadded) + one fp32 scale per (block, channel)
    assert allocation.layer_container(linear, 4, "auto", target="gpu") == "int4-blocked"
    assert allocation.stored_bytes(linear, 4, "auto", target="gpu") == 192 * 24 // 2 + 4 * 24 * 3
    assert allocation.stored_bytes(linear, 2, "packed", target="gpu") == 192 * 24 // 2 + 4 * 24 * 3
    assert container_bits(3, "auto", kind="linear", target="gpu") == 4
    # every other layer, and any width above 4, in int8 (no INT4/INT2 behind a Cast on the GPU)
    assert allocation.layer_container(conv, 2, "packed", target="gpu") == "int8"
    assert layer_resource(conv, 2, "bytes", "packed", target="gpu") == 1000 + 64
    assert layer_resource(linear, 8, "bytes", "auto", target="gpu") == 192 * 24 + 5 * 24
    # the CPU targets count what they did before
    for target in ("portable", "x86-avx2", "x86-vnni", "arm64"):
        assert allocation.stored_bytes(linear, 4, "auto", target=target) == allocation.stored_bytes(linear, 4, "auto")
    assert allocation.layer_container(linear, 4, "auto") == "nbits"


def test_allocation_options_count_bytes_for_their_target():
    t, infos = minority_layer_case()  # convs: INT4/INT2 behind a Cast on a CPU, int8 on the GPU
    gpu = AllocationOptions(Budget("bytes", 10_000.0), target="gpu")
    assert {a.uniform_width: a.weight_bytes for a in gpu.uniforms(t, infos)} == {w: 3 * 1040 for w in BITS}
    cpu = AllocationOptions(Budget("bytes", 10_000.0))
    assert {a.uniform_width: a.weight_bytes for a in cpu.uniforms(t, infos)} == {8: 3 * 1040, 4: 3 * 540, 3: 3 * 540,
                                                                                2: 3 * 290}
    # a budget only the CPU's narrow containers meet is infeasible for the GPU
    assert AllocationOptions(Budget("bytes", 2000.0), target="gpu").uniforms(t, infos) == []
    assert [a.uniform_width for a in AllocationOptions(Budget("bytes", 2000.0)).uniforms(t, infos)] == [4, 3, 2]


def test_a_nan_or_all_infinite_sensitivity_is_named_not_reported_as_a_budget():
    """It read "the budget bits=5 cannot be met ... needs 3.63" (survey 30)."""
    t, infos = minority_layer_case()
    t.delta[1, 2, 1] = np.nan
    with pytest.raises(ConfigError, match=r"the sensitivity of layer 'minority_path' at 4 bits for group 'minority' "
                                          r"is nan"):
        candidate_allocations(t, infos, Budget("bits", 5.0))
    t, infos = minority_layer_case()
    t.delta[0, :, 0] = np.inf
    with pytest.raises(ConfigError, match=r"the sensitivity of layer 'shared' at 2 bits for group 'majority' is inf"):
        candidate_allocations(t, infos, Budget("bits", 5.0))


def test_a_large_multiplicative_weights_step_finds_the_same_kind_of_allocation(recwarn):
    """mw_eta=1000 overflowed exp(η d) to inf: the group weights became NaN and the search called a budget
    it can meet infeasible, after an 'overflow encountered in exp' warning (survey 60)."""
    from fqexport.config import MixedPrecisionConfig

    t, infos = minority_layer_case()
    budget = Budget("bits", 5.0)
    steep = candidate_allocations(t, infos, budget, "worst-group", eta=1000.0)  # was: "cannot be met"
    assert steep and all(a.avg_bits <= 5.0 + 1e-9 for a in steep)
    assert not [w for w in recwarn if "overflow" in str(w.message)]
    with pytest.raises(ConfigError, match=r"mw_eta=inf a finite number > 0"):
        MixedPrecisionConfig(budget_bits=3.0, mw_eta=float("inf"))
