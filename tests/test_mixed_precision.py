"""Mixed-precision search end to end on the tiny MLP: budget, pins, verification, export, sweep."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

import fqexport.search.pareto as pareto_module
from fqexport.calibration.sampling import split_holdout, stratified_folds
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.errors import ConfigError
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import (
    Allocation,
    Budget,
    candidate_allocations,
    resource_used,
)
from fqexport.search.mixed_precision import (
    Candidate,
    _selection_key,
    search_mixed_precision,
)
from fqexport.search.pareto import (
    PARETO_FIELDS,
    ParetoPoint,
    pareto_sweep,
    plot_pareto,
    write_pareto_csv,
    write_pareto_json,
)
from fqexport.search.sensitivity import DEFAULT_CACHE

BASE = QuantConfig(num_calib=128, batch_size=128)


@pytest.fixture(scope="module")
def search(mlp_model, mlp_data):
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=2,
                             sensitivity_samples=128, mw_steps=20)
    return search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)


def test_search_stays_within_budget_and_honours_pins(search):
    alloc = search.allocation
    assert alloc.avg_bits <= 3.0
    assert resource_used(alloc.bits, search.layers, "bits") == pytest.approx(alloc.avg_bits)
    assert alloc.bits["fc3"] == 8
    assert set(alloc.bits) == {"fc1", "fc2", "fc3"}
    # the compressed model really has the allocated widths
    assert {n: l.bits for n, l in search.compressed.layers.items()} == alloc.bits
    assert search.compressed.avg_weight_bits == pytest.approx(alloc.avg_bits)


def test_pin_first_last_pins_the_first_and_last_layer(mlp_model, mlp_data):
    # 4 average bits with fc1 (16384 weights) and fc3 (1024) held at 8: fc2 (65536) has
    # 4·82944 − 8·17408 = 192512 bit·params left, 2.94 bits per weight, so it gets 2
    mp = MixedPrecisionConfig(budget_bits=4.0, pin_first_last=8, bit_choices=(2, 3, 4, 8), num_candidates=1,
                              sensitivity_samples=128, mw_steps=5, verify_folds=1, refit=False,
                              verify_uniform=False, verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)
    assert res.allocation.bits["fc1"] == 8 and res.allocation.bits["fc3"] == 8
    assert res.allocation.bits["fc2"] == 2 and res.allocation.avg_bits <= 4.0
    with pytest.raises(ConfigError, match="layer 'fc3' is pinned twice with different widths"):
        search_mixed_precision(mlp_model, mlp_data, replace(mp, pins={"fc3": 4}), BASE, progress=False)


def test_candidates_report_predicted_and_measured(search, mlp_data):
    groups = {"a", "b"}
    assert 2 <= len(search.candidates) <= 4
    assert len({tuple(sorted(c.allocation.bits.items())) for c in search.candidates}) == len(search.candidates)
    for c in search.candidates:
        d = c.to_dict()
        assert set(d["predicted_loss_increase"]) == groups
        assert set(d["measured_loss_increase"]) == groups
        acc = d["measured"]["accuracy"]
        assert d["measured"]["worst_group_acc"] == min(acc.values())
        assert d["avg_bits"] <= 3.0
    # the uniform allocation (free layers at 2 bits: 3 bits would exceed the budget with fc3 at 8)
    uniform = [c for c in search.candidates if c.allocation.bits == {"fc1": 2, "fc2": 2, "fc3": 8}]
    assert len(uniform) == 1
    # the mean-objective (population-weighted) optimum is verified too
    pop = {g: float(n) / len(mlp_data) for g, n in zip(mlp_data.group_names, mlp_data.group_counts())}
    mean = candidate_allocations(search.sensitivity, search.layers, Budget("bits", 3.0), "mean", {"fc3": 8},
                                 group_weights=pop)[0]
    assert [c.allocation.bits for c in search.candidates].count(mean.bits) == 1
    # every candidate is scored like the objective: J = max_g D_g + λ mean_g D_g (λ = 0.1)
    for c in search.candidates:
        d = np.array(list(c.allocation.predicted.values()))
        assert c.allocation.score == pytest.approx(d.max() + 0.1 * d.mean())
    # the winner has the lowest measured J (held-out loss increases) of all verified candidates,
    # or is the predicted best (lowest knapsack score) when that J is not significantly lower
    def measured_j(c):
        inc = np.array(list(c.measured_loss_increase.values()))
        return inc.max() + 0.1 * inc.mean()
    predicted = min(search.candidates, key=lambda c: c.allocation.score)
    assert search.chosen in (predicted, min(search.candidates, key=measured_j))
    assert all(c.sample_loss is not None and c.sample_loss.shape == (c.metrics.overall["count"],)
               for c in search.candidates)
    assert search.chosen.measured_worst == max(search.chosen.measured_loss_increase.values())
    # measured loss increase = quantized held-out loss − float held-out loss
    c = search.chosen
    for g in groups:
        want = c.metrics.by_group[g]["loss"] - search.float_metrics.by_group[g]["loss"]
        assert c.measured_loss_increase[g] == pytest.approx(want)


def test_table_and_metadata(search):
    rows = search.table()
    assert [r["name"] for r in rows] == ["fc1", "fc2", "fc3"]
    assert [r["params"] for r in rows] == [l.params for l in search.layers]
    for r in rows:
        assert r["bits"] == search.allocation.bits[r["name"]]
        assert r["sensitivity"] == pytest.approx(search.sensitivity.at(r["name"], r["bits"]).max())
    info = search.compressed.metadata.allocation
    assert info["objective"] == "worst-group"
    assert info["budget"] == {"kind": "bits", "value": 3.0}
    assert [r["bits"] for r in info["table"]] == [r["bits"] for r in rows]
    d = json.loads(json.dumps(search.to_dict()))
    assert d["allocation"]["avg_bits"] <= 3.0
    assert len(d["candidates"]) == len(search.candidates)


def test_export_stores_the_allocation_and_int4_for_narrow_layers(search, tmp_path):
    result = search.compressed.export(tmp_path / "mp.onnx")
    model = onnx.load(str(result.path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["fqexport"])
    assert [r["bits"] for r in meta["allocation"]["table"]] == [search.allocation.bits[n] for n in ("fc1", "fc2", "fc3")]
    storage = {r["name"]: r["storage"] for r in meta["layers"]}
    for name, bits in search.allocation.bits.items():
        assert storage[name] == ("int4" if bits <= 4 else "int8")
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4 and len(t.dims) >= 2]
    assert len(int4) == sum(1 for b in search.allocation.bits.values() if b <= 4) >= 1


def _candidate(correct: list[int], confidence: float, float_loss: float, groups=("a", "b")) -> Candidate:
    """A verified candidate on 2 classes: per sample of group 'b' (ten of them) right with
    probability ``confidence`` on the label or wrong with 0.4 on it; group 'a' (ten samples)
    always right with 0.9."""
    y = np.zeros(20, dtype=np.int64)
    group = np.repeat([0, 1], 10)
    p = np.concatenate([np.full(10, 0.9), np.where(np.array(correct) == 1, confidence, 0.4)])
    logits = np.stack([np.log(p), np.log(1 - p)], axis=1)
    m = group_metrics(logits, y, group, groups)
    inc = {g: m.by_group[g]["loss"] - float_loss for g in groups}
    alloc = Allocation({"fc1": 2}, {g: 0.0 for g in groups}, "worst-group", 0.0, Budget("bits", 2.0), 2.0, 2.0)
    return Candidate(alloc, m, inc)


def test_worst_group_selection_key_uses_the_measured_loss_increase():
    groups = ("a", "b")
    # A: one more sample right in the worst group, but far less confident on the others
    a = _candidate([1] * 8 + [0] * 2, 0.55, 0.3)
    b = _candidate([1] * 7 + [0] * 3, 0.95, 0.3)
    assert a.worst_group_acc > b.worst_group_acc
    assert a.measured_worst > b.measured_worst
    key = lambda c: _selection_key(c, "worst-group", None, groups, 0.1)  # noqa: E731
    assert max([a, b], key=key) is b
    # equal loss increases: the worst-group accuracy decides
    c = _candidate([1] * 7 + [0] * 3, 0.8, 0.3)
    c.measured_loss_increase = dict(a.measured_loss_increase)
    assert max([a, c], key=key) is a and max([c, a], key=key) is a
    # the largest increase of any group counts (not only the lowest-accuracy group's) ...
    d = _candidate([1] * 7 + [0] * 3, 0.95, 0.3)
    d.measured_loss_increase = {"a": b.measured_loss_increase["b"] + 0.5, "b": b.measured_loss_increase["b"]}
    assert max([d, b], key=key) is b
    # ... and so does λ × the mean increase, at an equal largest one
    e = _candidate([1] * 7 + [0] * 3, 0.95, 0.3)
    e.measured_loss_increase = {"a": b.measured_loss_increase["a"] - 0.1, "b": b.measured_loss_increase["b"]}
    assert max([b, e], key=key) is e
    # mean objective: still the overall accuracy
    assert max([a, b], key=lambda c: _selection_key(c, "mean", None, groups)) is a


def _with_losses(c: Candidate, losses: np.ndarray, score: float) -> Candidate:
    c.sample_loss = losses
    c.allocation = replace(c.allocation, score=score)
    return c


def test_measured_best_must_beat_the_predicted_best_beyond_noise():
    from fqexport.search.mixed_precision import _significantly_better

    groups = ("a", "b")
    group = np.repeat([0, 1], 10)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 1.0, 20)
    pred = _with_losses(_candidate([1] * 7 + [0] * 3, 0.9, 0.3), base.copy(), score=0.1)
    pred.measured_loss_increase = {"a": 0.0, "b": 0.2}
    # measured J lower by 0.01, with per-sample differences of ±0.3 in group b: noise
    noisy = _with_losses(_candidate([1] * 7 + [0] * 3, 0.9, 0.3),
                         base - np.where(group == 1, 0.01 + 0.3 * rng.choice([-1, 1], 20), 0.0), score=0.2)
    noisy.measured_loss_increase = {"a": 0.0, "b": 0.19}
    assert _significantly_better([pred, noisy], noisy, group, groups, 0.1) is pred
    # lower by 0.15 on every sample of group b: a real improvement
    clear = _with_losses(_candidate([1] * 7 + [0] * 3, 0.9, 0.3), base - np.where(group == 1, 0.15, 0.0), score=0.2)
    clear.measured_loss_increase = {"a": 0.0, "b": 0.05}
    assert _significantly_better([pred, clear], clear, group, groups, 0.1) is clear
    # the predicted best measured best: nothing to decide
    assert _significantly_better([pred, clear], pred, group, groups, 0.1) is pred


def test_refit_quantizes_the_winner_on_all_calibration_data(mlp_model, mlp_data, search):
    plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(search.allocation.bits)), progress=False)
    np.testing.assert_array_equal(search.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    assert search.compressed.metadata.allocation["refit"] is True
    assert search.seconds["refit"] > 0


def test_verify_flags_and_no_refit(mlp_model, mlp_data, search):
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=1,
                              mw_steps=20, verify_uniform=False, verify_mean=False, refit=False,
                              verify_folds=1)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    assert len(res.candidates) == 1
    assert res.candidates[0].allocation.bits == search.candidates[0].allocation.bits
    # without refit the result is the verified held-in fit: its held-out metrics are the candidate's
    _, held_out = split_holdout(mlp_data, mp.holdout_fraction, seed=mp.seed)
    m = group_metrics(res.compressed.predict(held_out.x), held_out.y, held_out.group, held_out.group_names)
    assert m.by_group == res.chosen.metrics.by_group
    assert "refit" not in res.seconds and res.compressed.metadata.allocation["refit"] is False


def test_cross_fitted_verification_holds_out_every_sample_once(mlp_model, mlp_data, search):
    # default: 3 folds; every calibration sample is measured once, by a fit that did not see it
    assert search.config.verify_folds == 3
    counts = dict(zip(mlp_data.group_names, mlp_data.group_counts().tolist()))
    c = search.candidates[0]
    assert c.sample_loss.shape == (len(mlp_data),)
    for g, n in counts.items():
        assert search.float_metrics.by_group[g]["count"] == n and c.metrics.by_group[g]["count"] == n
    # fold 1's out-of-fold losses are those of the candidate quantized on the other two folds
    fold = stratified_folds(mlp_data, 3, seed=search.config.seed)[1]
    rest = np.setdiff1d(np.arange(len(mlp_data)), fold)
    fit = compress(mlp_model, mlp_data.subset(rest), replace(BASE, layer_bits=dict(c.allocation.bits)), progress=False)
    z = fit.predict(mlp_data.x[fold]).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    expected = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(fold)), mlp_data.y[fold]]  # −log softmax_y
    np.testing.assert_allclose(c.sample_loss[fold], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"verify_folds": 0}, "verify_folds=0 must be an integer >= 1"),
    ({"verify_folds": 2.5}, "verify_folds=2.5 must be an integer >= 1"),
    ({"refit": False}, "refit=False needs verify_folds=1 .got 3."),
])
def test_verify_folds_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixedPrecisionConfig(budget_bits=3.0, **kwargs)


def test_bytes_budget_is_respected(mlp_model, mlp_data):
    # auto storage: 8-bit layers int8, <=4-bit layers int4; budget between all-int4 and all-int8
    mp = MixedPrecisionConfig(budget_bytes=60_000, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)
    for c in res.candidates:
        assert resource_used(c.allocation.bits, res.layers, "bytes", "auto") <= 60_000


def test_mean_objective_selects_by_overall_accuracy(mlp_model, mlp_data, search):
    mp = MixedPrecisionConfig(budget_bits=3.0, objective="mean", pins={"fc3": 8}, bit_choices=(2, 3, 4, 8))
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    assert res.chosen.mean_acc == max(c.mean_acc for c in res.candidates)
    # mean: the population's group shares (30% 'b' in this data), not equal weights
    counts = mlp_data.group_counts() / len(mlp_data)
    assert res.allocation.group_weights["b"] == pytest.approx(counts[1])


def test_pareto_sweep_and_writers(mlp_model, mlp_data, tmp_path):
    mp = MixedPrecisionConfig(budget_bits=4.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128)
    points = pareto_sweep(mlp_model, mlp_data, [2.5, 6.0], mp, BASE, progress=False)
    assert [p.budget for p in points] == [2.5, 6.0]
    assert points[0].avg_bits <= 2.5 and points[1].avg_bits <= 6.0
    assert points[1].avg_bits > points[0].avg_bits
    assert points[1].weight_bytes >= points[0].weight_bytes  # 2 and 4 bits share the int4 container
    write_pareto_json(points, tmp_path / "p.json")
    write_pareto_csv(points, tmp_path / "p.csv")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc[1]["budget"] == 6.0 and set(PARETO_FIELDS) <= set(doc[1])
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 2 and float(rows[0]["avg_bits"]) == pytest.approx(points[0].avg_bits)
    assert "fc1=" in rows[0]["bits"]
    png = plot_pareto(points, tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401  (optional extra)
    except ImportError:
        assert png is None and not (tmp_path / "p.png").exists()  # skipped, nothing written
    else:
        assert png is not None and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_pareto_sweep_is_the_same_on_one_local_pool_as_serial(mlp_model, mlp_data, monkeypatch):
    """The sweep runs every budget's tasks on one engine (its workers start once), and the
    points do not depend on the engine."""
    made = []
    real = pareto_module.make_engine
    monkeypatch.setattr(pareto_module, "make_engine", lambda *a, **k: made.append(a) or real(*a, **k))
    mp = MixedPrecisionConfig(budget_bits=4.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128, verify_folds=2)
    points = {}
    for engine in (EngineConfig(engine="serial"), EngineConfig(engine="local", workers=2)):
        DEFAULT_CACHE.clear()
        points[engine.engine] = pareto_sweep(mlp_model, mlp_data, [2.5, 4.0], replace(mp, engine=engine), BASE,
                                             progress=False)
    assert len(made) == 2  # one engine per sweep, not per budget
    assert points["serial"] == points["local"]


def test_writers_on_given_points(tmp_path):
    p = ParetoPoint(3.0, 2.9, 1234.0, "b", 0.8, 0.9, 0.85, 0.93, {"fc1": 3})
    write_pareto_csv([p], tmp_path / "x.csv")
    text = (tmp_path / "x.csv").read_text().splitlines()
    assert text[0] == ",".join(PARETO_FIELDS) + ",bits"
    assert text[1] == "3.0,2.9,1234.0,b,0.8,0.9,0.85,0.93,fc1=3"
    with pytest.raises(ConfigError, match="budgets must be a non-empty list"):
        pareto_sweep(None, None, [])
    # a bad budget anywhere in the list fails before the first (slow) search runs
    with pytest.raises(ConfigError, match=r"budget_bits=9 must be in \[2, 8\]"):
        pareto_sweep(None, None, [3, 9])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "set exactly one of budget_bits, budget_bytes, budget_bops (got none)"),
        ({"budget_bits": 3, "budget_bops": 1e6}, "(got budget_bits, budget_bops)"),
        ({"budget_bits": 9.0}, "budget_bits=9.0 must be in [2, 8]"),
        ({"budget_bytes": -5}, "budget_bytes=-5 must be a finite number > 0"),
        ({"budget_bits": 4, "objective": "max"}, "objective='max' is not one of worst-group, mean, weighted"),
        ({"budget_bits": 4, "bit_choices": (2, 9)}, "bit_choices=(2, 9) must be a non-empty set of integers from 2 to 8"),
        ({"budget_bits": 4, "bit_choices": ()}, "bit_choices=() must be a non-empty set of integers from 2 to 8"),
        ({"budget_bits": 4, "pin_first_last": 16}, "pin_first_last=16 is not supported"),
        ({"budget_bits": 4, "pins": {"fc": 1}}, "pins['fc']=1 is not supported"),
        ({"budget_bits": 4, "objective": "weighted"}, "objective='weighted' needs group_weights"),
        ({"budget_bits": 4, "num_candidates": 0}, "num_candidates=0 must be >= 1"),
        ({"budget_bits": 4, "holdout_fraction": 1.0}, "holdout_fraction=1.0 must be in (0, 1)"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        MixedPrecisionConfig(**kwargs)
    assert message in str(err.value)


def test_config_budget_views():
    assert MixedPrecisionConfig(budget_bops=2e6).budget_kind == "bops"
    assert MixedPrecisionConfig(budget_bytes=1000).budget_value == 1000.0
