"""Mixed-precision search end to end on the tiny MLP: budget, pins, verification, export, sweep."""

from __future__ import annotations

import copy
import csv
import json
import threading
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

import fqexport.search.mixed_precision as mp_module
import fqexport.search.pareto as pareto_module
import fqexport.search.selection as selection_module
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.sampling import (
    group_balanced_indices,
    split_holdout,
    stratified_folds,
)
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.engine import make_engine
from fqexport.engine.base import SerialEngine
from fqexport.errors import ConfigError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import (
    Budget,
    candidate_allocations,
    layer_container,
    resource_used,
    stored_bytes,
)
from fqexport.search.byte_budget import file_overhead_estimate
from fqexport.search.costs import layer_costs
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.pareto import (
    PARETO_FIELDS,
    BudgetFloor,
    ParetoPoint,
    pareto_sweep,
    plot_pareto,
    write_pareto_csv,
    write_pareto_json,
)
from fqexport.search.sensitivity import DEFAULT_CACHE
from fqexport.search.verification import NO_LABELS

BASE = QuantConfig(num_calib=128, batch_size=128)


@pytest.fixture(scope="module")
def search(mlp_model, mlp_data):
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=2,
                             sensitivity_samples=128, mw_steps=20)
    return search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)


@pytest.fixture(scope="module")
def search3(mlp_model, mlp_data, search):
    """The same search with the old default: 3-fold cross-fitted verification and a refit."""
    mp = replace(search.config, verify_folds=3)
    return search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)


def unused_by_compress(data, base=BASE):
    """Positions of the samples ``compress`` does not draw (its group-balanced ``num_calib``)."""
    return np.setdiff1d(np.arange(len(data)), group_balanced_indices(data, base.num_calib, seed=base.seed))


def test_search_stays_within_budget_and_honours_pins(search):
    alloc = search.allocation
    # the budget counts stored bits (containers + scales), above the nominal average
    assert alloc.avg_bits < alloc.stored_bits <= 3.0
    assert resource_used(alloc.bits, search.layers, "bits", search.storage) == pytest.approx(alloc.stored_bits)
    assert resource_used(alloc.bits, search.layers, "bits", "ideal") == pytest.approx(alloc.avg_bits)
    assert alloc.bits["fc3"] == 8
    assert set(alloc.bits) == {"fc1", "fc2", "fc3"}
    # the compressed model really has the allocated widths
    assert {n: l.bits for n, l in search.compressed.layers.items()} == alloc.bits
    assert search.compressed.avg_weight_bits == pytest.approx(alloc.avg_bits)


def test_a_pin_on_a_float_layer_is_named_as_float_before_the_sensitivity(mlp_model, mlp_data, monkeypatch):
    """survey 73: a pin on a layer that stays float said "matches no layer", after the sensitivity."""
    def no_sensitivity(*args, **kwargs):
        raise AssertionError("the sensitivity ran before the pins were checked")

    monkeypatch.setattr(mp_module, "search_sensitivity", no_sensitivity)
    base = QuantConfig(num_calib=64, keep_float=("fc2",))
    with pytest.raises(ConfigError, match=r"^pin 'fc2' matches 'fc2' \(Linear; keep_float: fc2\), which stay\(s\) float: "
                                          r"no width to search; drop the pin \(quantizable layers: fc1, fc3\)$"):
        search_mixed_precision(mlp_model, mlp_data, MixedPrecisionConfig(budget_bits=4.0, pins={"fc1": 8, "fc2": 8}),
                               base, progress=False)
    with pytest.raises(ConfigError, match=r"^pin 'head' matches no layer \(layers: fc1, fc3\)$"):
        search_mixed_precision(mlp_model, mlp_data, MixedPrecisionConfig(budget_bits=4.0, pins={"head": 8}),
                               base, progress=False)


def test_an_npz_path_is_searched_memory_mapped_with_the_in_memory_result(mlp_model, mlp_data, search, tmp_path,
                                                                        monkeypatch):
    """The search reads an .npz path as compress and validate do (memory-mapped: only the parts it
    uses come into memory), and finds what the same data in memory gives."""
    from fqexport.calibration.stream import DataStream

    np.savez(tmp_path / "calib.npz", x=mlp_data.x, y=mlp_data.y, group=mlp_data.group,
             group_names=np.array(mlp_data.group_names))
    real, read = mp_module.verification_splits, []

    def splits(data, *args):
        read.append(type(data))
        return real(data, *args)

    monkeypatch.setattr(mp_module, "verification_splits", splits)
    got = search_mixed_precision(mlp_model, str(tmp_path / "calib.npz"), search.config, BASE, progress=False)
    assert read == [DataStream]  # not read whole into a GroupData
    assert got.allocation.bits == search.allocation.bits
    assert [c.allocation.bits for c in got.candidates] == [c.allocation.bits for c in search.candidates]
    assert [c.metrics.by_group for c in got.candidates] == [c.metrics.by_group for c in search.candidates]
    for name, layer in got.compressed.layers.items():
        assert torch.equal(layer.codes, search.compressed.layers[name].codes), name


def test_pin_first_last_pins_the_first_and_last_layer(mlp_model, mlp_data):
    # 4 average bits with fc1 (16384 weights) and fc3 (1024) held at 8: fc2 (65536) has
    # 4·82944 − 8·17408 = 192512 bit·params left, 2.94 bits per weight, so it gets 2
    mp = MixedPrecisionConfig(budget_bits=4.0, pin_first_last=8, bit_choices=(2, 3, 4, 8), num_candidates=1,
                              sensitivity_samples=128, mw_steps=5, verify_folds=1, refit=False,
                              verify_uniform=False, verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)
    assert res.allocation.bits["fc1"] == 8 and res.allocation.bits["fc3"] == 8
    assert res.allocation.bits["fc2"] == 2 and res.allocation.avg_bits <= 4.0
    with pytest.raises(ConfigError, match="pin_first_last=8 pins layer 'fc3' .* pinned twice with different widths"):
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


def test_search_without_labels_distils_the_float_model_from_a_stream(mlp_model, mlp_data):
    # labels = the float model's top-1 in memory, vs no labels streamed from a DataLoader of x alone
    with torch.no_grad():
        top1 = mlp_model(torch.from_numpy(mlp_data.x)).argmax(1).numpy()
    labeled = GroupData(mlp_data.x, top1, mlp_data.group, mlp_data.group_names, mlp_data.source)
    loader = torch.utils.data.DataLoader(torch.from_numpy(mlp_data.x), batch_size=64)
    stream = load_data(loader, groups=np.array(mlp_data.group_names)[mlp_data.group])
    assert stream.y is None
    mp = MixedPrecisionConfig(budget_bits=4.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=96)
    want = search_mixed_precision(mlp_model, labeled, mp, BASE, progress=False)
    got = search_mixed_precision(mlp_model, stream, mp, BASE, progress=False)
    np.testing.assert_allclose(got.sensitivity.delta, want.sensitivity.delta, rtol=1e-5, atol=1e-8)
    assert got.allocation.bits == want.allocation.bits
    assert [c.allocation.bits for c in got.candidates] == [c.allocation.bits for c in want.candidates]
    for a, b in zip(got.candidates, want.candidates):
        assert a.metrics.to_dict() == b.metrics.to_dict()
    assert got.float_metrics.overall["accuracy"] == 1.0  # the float model agrees with its own top-1
    assert got.verification.endswith(NO_LABELS) and not want.verification.endswith(NO_LABELS)
    for name, layer in want.compressed.layers.items():
        assert torch.equal(got.compressed.layers[name].codes, layer.codes)


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
    result = export_qdq(search.compressed, tmp_path / "mp.onnx")
    model = onnx.load(str(result.path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["fqexport"])
    assert [r["bits"] for r in meta["allocation"]["table"]] == [search.allocation.bits[n] for n in ("fc1", "fc2", "fc3")]
    # a budget search exports with the QuantConfig's storage ("auto"): what the budget paid for is
    # on disk — 2-bit layers INT2, 3-4-bit (vector) Linears MatMulNBits, 8 bits int8
    assert search.storage == "auto" and meta["allocation"]["storage"] == "auto"
    storage = {r["name"]: r["storage"] for r in meta["layers"]}
    want = {name: "int2" if bits <= 2 else "nbits" if bits <= 4 else "int8" for name, bits in search.allocation.bits.items()}
    assert storage == want
    int2 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT2 and len(t.dims) >= 2]
    nbits = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(int2) == list(want.values()).count("int2")
    assert len(nbits) == list(want.values()).count("nbits")
    assert len(int2) + len(nbits) >= 1


def test_default_verification_fit_is_the_refit_without_an_extra_fit(mlp_model, mlp_data, search):
    # default verify_folds=1 and more data than num_calib (>= 50 of each group unused): every
    # candidate is fitted once, exactly as compress fits it, and measured on the unused samples
    assert search.config.verify_folds == 1 and search.config.num_candidates == 2
    plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(search.allocation.bits)), progress=False)
    np.testing.assert_array_equal(search.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    assert search.fits == len(search.candidates) and "refit" not in search.seconds
    assert search.fit_seconds == pytest.approx(sum(c.seconds for c in search.candidates))
    assert search.compressed.metadata.allocation["refit"] is True
    # the held-out samples are exactly those compress leaves unused
    rest = unused_by_compress(mlp_data)
    m = group_metrics(plain.predict(mlp_data.x[rest]), mlp_data.y[rest], mlp_data.group[rest], mlp_data.group_names)
    assert m.by_group == search.chosen.metrics.by_group


def test_refit_quantizes_the_winner_on_all_calibration_data(mlp_model, mlp_data, search3):
    plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(search3.allocation.bits)), progress=False)
    np.testing.assert_array_equal(search3.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    assert search3.compressed.metadata.allocation["refit"] is True
    assert search3.seconds["refit"] > 0
    assert search3.fits == 3 * len(search3.candidates) + 1  # k folds per candidate + the refit


def test_verify_flags_and_no_refit(mlp_model, mlp_data, search):
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=1,
                              mw_steps=20, verify_uniform=False, verify_mean=False, refit=False,
                              verify_folds=1)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    assert len(res.candidates) == 1
    assert res.candidates[0].allocation.bits == search.candidates[0].allocation.bits
    # without refit the result is the verified fit: its metrics on the samples compress leaves
    # unused are the candidate's
    rest = unused_by_compress(mlp_data)
    m = group_metrics(res.compressed.predict(mlp_data.x[rest]), mlp_data.y[rest], mlp_data.group[rest],
                      mlp_data.group_names)
    assert m.by_group == res.chosen.metrics.by_group
    assert "refit" not in res.seconds and res.compressed.metadata.allocation["refit"] is False
    assert res.fits == 1


def test_single_split_when_compress_leaves_too_few_samples_unused(mlp_model, mlp_data, search):
    # num_calib=256 draws every sample of group 'b' (about 120): nothing of it is left to measure
    # on, so the search holds out holdout_fraction of each group, fits on the rest, and refits
    base = replace(BASE, num_calib=256)
    assert np.bincount(mlp_data.group[unused_by_compress(mlp_data, base)], minlength=2).min() < 50
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=1,
                              mw_steps=20, verify_uniform=False, verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, base, progress=False, sensitivity=search.sensitivity)
    _, held_out = split_holdout(mlp_data, mp.holdout_fraction, seed=mp.seed)
    assert {g: r["count"] for g, r in res.chosen.metrics.by_group.items()} == dict(
        zip(held_out.group_names, held_out.group_counts().tolist()))
    assert res.fits == 2 and res.seconds["refit"] > 0  # one verification fit + the refit
    plain = compress(mlp_model, mlp_data, replace(base, layer_bits=dict(res.allocation.bits)), progress=False)
    np.testing.assert_array_equal(res.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))


def test_cross_fitted_verification_holds_out_every_sample_once(mlp_model, mlp_data, search3):
    # 3 folds: every calibration sample is measured once, by a fit that did not see it
    search = search3
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
    ({"verify_folds": 2.5}, "verify_folds=2.5 must be an integer"),
    ({"refit": False, "verify_folds": 3}, "refit=False needs verify_folds=1 .got 3."),
])
def test_verify_folds_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixedPrecisionConfig(budget_bits=3.0, **kwargs)


def test_bytes_budget_is_respected(mlp_model, mlp_data, tmp_path):
    # packed storage (the search's): 8-bit layers int8, 4-bit MatMulNBits, 2-bit INT2; the budget
    # is between the all-2-bit and the all-8-bit file and counts the whole written file
    mp = MixedPrecisionConfig(budget_bytes=60_000, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)
    overhead = file_overhead_estimate(res.layers)
    for c in res.candidates:
        assert resource_used(c.allocation.bits, res.layers, "bytes", "packed") + overhead <= 60_000
    assert export_qdq(res.compressed, tmp_path / "b.onnx").size_bytes <= 60_000


@pytest.mark.parametrize("storage", ["packed", "auto", "int8"])
def test_stored_bytes_predict_the_written_initializers_per_layer(cnn_model, cnn_data, tmp_path, storage):
    """The allocator's per-layer bytes are the bytes of that layer's weight initializers in the
    written file (codes and scales; the fp32 bias is the file's overhead)."""
    bits = {"stem": 8, "conv_a": 4, "conv_b": 2, "dw": 3, "pw": 2, "fc": 4}
    cm = compress(cnn_model, cnn_data, QuantConfig(num_calib=64, batch_size=64, storage=storage, layer_bits=bits),
                  progress=False)
    model = onnx.load(str(export_qdq(cm, tmp_path / "m.onnx").path))
    written: dict[str, int] = {}
    for t in model.graph.initializer:
        layer, _, rest = t.name.partition(".weight")
        if layer in bits and t.name != f"{layer}.bias":
            assert t.raw_data, t.name
            written[layer] = written.get(layer, 0) + len(t.raw_data)
    costs = {c.name: c for c in layer_costs(cnn_model, torch.from_numpy(cnn_data.x[:1]))}
    predicted = {name: stored_bytes(costs[name], b, storage) for name, b in bits.items()}
    assert written == predicted
    if storage == "packed":  # every container appears: int8, INT4, INT2, MatMulNBits
        assert {costs[n].name: layer_container(costs[n], b, storage) for n, b in bits.items()} == {
            "stem": "int8", "conv_a": "int4", "conv_b": "int2", "dw": "int4", "pw": "int2", "fc": "nbits"}
        assert predicted["conv_b"] == 8 * 8 * 9 // 4 + 4 * 8  # 144 B of codes + fp32 scales


def _penalize_mixed(real_verify, pinned=("fc3",)):
    """A verify whose mixed candidates (free layers at different widths) measured a much larger
    held-out loss increase."""
    def verify(*args, **kwargs):
        found = real_verify(*args, **kwargs)
        for c in found.candidates:
            if len({b for n, b in c.allocation.bits.items() if n not in pinned}) > 1:
                c.measured_loss_increase = {g: v + 5.0 for g, v in c.measured_loss_increase.items()}
                c.sample_loss = c.sample_loss + 5.0
        return found
    return verify


def test_search_returns_the_uniform_candidate_when_it_measured_better(mlp_model, mlp_data, search, monkeypatch):
    # the selection keeps the predicted best (mixed) allocation; the uniform guard overrides it
    monkeypatch.setattr(mp_module, "verify", _penalize_mixed(mp_module.verify))
    monkeypatch.setattr(selection_module, "significantly_better",
                        lambda cands, best, *a, **k: min(cands, key=lambda c: c.allocation.score))
    mp = replace(search.config, verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    uniforms = [c for c in res.candidates if c.origin == "uniform"]
    assert uniforms and any(c.origin == "search" for c in res.candidates)
    assert res.chosen.origin == "uniform"
    assert res.allocation.bits == {"fc1": 2, "fc2": 2, "fc3": 8}  # fc3 pinned at 8
    assert {n: l.bits for n, l in res.compressed.layers.items()} == res.allocation.bits
    assert res.fallback.startswith("returning uniform 2-bit: it measured a held-out worst-group loss increase of")
    assert res.compressed.metadata.allocation["fallback"] == res.fallback
    # unpatched, the same search keeps its selection and says nothing
    assert search.fallback is None or search.chosen.origin == "uniform"


def test_pareto_sweep_is_monotone_and_says_which_result_it_reused(mlp_model, mlp_data, monkeypatch):
    real = pareto_module.search_mixed_precision

    def worse_at_4_bits(model, data, mp, *args, **kwargs):
        res = real(model, data, mp, *args, **kwargs)
        if mp.budget_bits == 4.0:  # the larger budget measured a worse held-out worst group
            res.chosen.measured_loss_increase = {g: v + 1.0 for g, v in res.chosen.measured_loss_increase.items()}
        return res

    monkeypatch.setattr(pareto_module, "search_mixed_precision", worse_at_4_bits)
    mp = MixedPrecisionConfig(budget_bits=4.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128)
    points = pareto_sweep(mlp_model, mlp_data, [4.0, 2.5], mp, BASE, progress=False)  # sorted by budget
    assert [p.budget for p in points] == [2.5, 4.0]
    assert points[0].reused_from is None and points[1].reused_from == 2.5
    assert points[1].bits == points[0].bits and points[1].stored_bits == points[0].stored_bits <= 2.5
    assert points[1].heldout_worst_loss_increase == points[0].heldout_worst_loss_increase
    # unpatched, more budget measured no worse: nothing reused
    monkeypatch.setattr(pareto_module, "search_mixed_precision", real)
    plain = pareto_sweep(mlp_model, mlp_data, [2.5, 4.0], mp, BASE, progress=False)
    for lo, hi in zip(plain, plain[1:]):
        assert hi.heldout_worst_loss_increase <= lo.heldout_worst_loss_increase or hi.reused_from == lo.budget


def test_a_mean_objective_sweep_keeps_what_measured_best_by_the_mean(mlp_model, mlp_data, monkeypatch):
    """The 4-bit result measured a larger worst-group loss increase but a higher overall accuracy:
    under --objective mean it stands; the sweep reused the 2.5-bit one by the worst-group rule
    whatever the objective (survey 25)."""
    real = pareto_module.search_mixed_precision

    def better_mean_worse_worst(model, data, mp, *args, **kwargs):
        res = real(model, data, mp, *args, **kwargs)
        if mp.budget_bits == 4.0:
            res.chosen.measured_loss_increase = {g: v + 1.0 for g, v in res.chosen.measured_loss_increase.items()}
            res.chosen.metrics.overall["accuracy"] = 1.0
        return res

    monkeypatch.setattr(pareto_module, "search_mixed_precision", better_mean_worse_worst)
    kw = dict(budget_bits=4.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5, sensitivity_samples=128)
    mean = pareto_sweep(mlp_model, mlp_data, [2.5, 4.0], MixedPrecisionConfig(objective="mean", **kw), BASE,
                        progress=False)
    assert mean[1].reused_from is None and mean[1].bits != mean[0].bits
    worst = pareto_sweep(mlp_model, mlp_data, [2.5, 4.0], MixedPrecisionConfig(**kw), BASE, progress=False)
    assert worst[1].reused_from == 2.5  # the worst-group objective still reuses by its own measure


def test_budget_floor_says_what_the_allocator_can_meet(mlp_model, mlp_data, search):
    # fc3 pinned at 8, fc1 and fc2 at 2 bits: the smallest allocation the allocator can return
    floor = BudgetFloor.of(mlp_model, mlp_data, search.config, BASE)
    smallest = resource_used({"fc1": 2, "fc2": 2, "fc3": 8}, search.layers, "bits", BASE.storage)
    assert floor.value == pytest.approx(smallest, abs=1e-4) and floor.value >= smallest and floor.bmin == 2
    for budget in (floor.value, floor.value + 0.1):
        assert floor.feasible(budget)
        candidate_allocations(search.sensitivity, search.layers, Budget("bits", budget), pins={"fc3": 8})
    for budget in (floor.value - 1e-4, 2.0):
        assert not floor.feasible(budget)
        with pytest.raises(ConfigError, match="budget_bits=.* cannot be met"):
            candidate_allocations(search.sensitivity, search.layers, Budget("bits", budget), pins={"fc3": 8})


def test_pareto_sweep_skips_and_reports_infeasible_budgets(mlp_model, mlp_data, search, monkeypatch):
    calls = []
    real = pareto_module.search_mixed_precision
    monkeypatch.setattr(pareto_module, "search_mixed_precision",
                        lambda model, data, mp, *a, **k: calls.append(mp.budget_bits) or real(model, data, mp, *a, **k))
    mp = replace(search.config, num_candidates=1, verify_mean=False)
    floor = BudgetFloor.of(mlp_model, mlp_data, mp, BASE)
    points = pareto_sweep(mlp_model, mlp_data, [3.0, 2.0], mp, BASE, progress=False)
    assert calls == [3.0]  # no search for the infeasible budget
    assert [(p.budget, p.status) for p in points] == [(2.0, "infeasible"), (3.0, "ok")]
    assert not points[0].feasible and points[0].bits == {} and np.isnan(points[0].avg_bits)
    assert points[0].min_feasible_budget == points[1].min_feasible_budget == floor.value
    assert points[1].stored_bits <= 3.0 and points[1].reused_from is None
    # no budget feasible: an error that names the minimum, before any search
    with pytest.raises(ConfigError, match=rf"pareto_sweep: no budget of 2, 2.1 can be met: the smallest allocation "
                                          rf"\(every free layer at 2 bits, pinned layers at their widths\) stores "
                                          rf"{floor.value:g} bits per weight, the minimum feasible budget; give budgets "
                                          rf"of at least {floor.value:g}"):
        pareto_sweep(mlp_model, mlp_data, [2.1, 2.0], mp, BASE, progress=False)
    assert calls == [3.0]


def test_bytes_budget_checks_the_written_file_and_refits(mlp_model, mlp_data, search, tmp_path, monkeypatch):
    # with no estimate of the graph's bytes the knapsack fills the budget with weights alone, so
    # the written file is larger: the search measures it and refits a smaller allocation
    import fqexport.search.verification as verification_module

    monkeypatch.setattr(mp_module, "file_overhead_estimate", lambda layers: 0.0)
    fitted = []  # the widths of every compress fit, verification or refit
    for module in (mp_module, verification_module):
        monkeypatch.setattr(module, "compress", lambda *a, real=module.compress, **k: fitted.append(
            tuple(sorted(a[2].layer_bits.items()))) or real(*a, **k))
    budget = 40_000
    mp = MixedPrecisionConfig(budget_bytes=budget, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128, verify_uniform=False, verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False)
    size = export_qdq(res.compressed, tmp_path / "b.onnx").size_bytes
    assert size <= budget
    assert res.fallback.startswith("the written file took ") and "> budget_bytes=40000: refitted" in res.fallback
    assert res.seconds["bytes_check"] > 0 and res.fits >= 2  # the first fit + the smaller allocation's
    assert {n: l.bits for n, l in res.compressed.layers.items()} == res.allocation.bits
    # each fit is compress on all the data (BASE leaves >= 50 of each group unused): the smaller
    # allocation's verification fit is its refit, fitted once and counted once
    assert len(fitted) == res.fits and fitted.count(tuple(sorted(res.allocation.bits.items()))) == 1
    assert res.chosen.origin == "bytes-refit"
    plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(res.allocation.bits)), progress=False)
    np.testing.assert_array_equal(res.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    # a budget below the smallest file the search can write: the error gives that file's measured size
    with pytest.raises(ConfigError, match=r"budget_bytes=24000 cannot be met by the allocations the search tried: "
                                          r"the one with the fewest weight bytes \([^;]+; weights \d+ \+ graph and "
                                          r"metadata \d+ bytes\) writes a file of (\d+) bytes, measured .*; raise "
                                          r"--budget-bytes \(\1 fits this one\)$"):
        search_mixed_precision(mlp_model, mlp_data, replace(mp, budget_bytes=24_000), BASE, progress=False,
                               sensitivity=res.sensitivity)


def test_pareto_weight_bytes_count_float_layers_like_stored_bits(mlp_model, mlp_data):
    # a --keep-float layer is in stored_bits at 32 bits; the row's weight bytes count it too
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                              sensitivity_samples=128)
    base = replace(BASE, keep_float=("fc3",))
    (point,) = pareto_sweep(mlp_model, mlp_data, [6.0], mp, base, progress=False)
    weights = sum(m.weight.numel() for m in mlp_model.modules() if isinstance(m, torch.nn.Linear))
    floats = mlp_model.fc3.weight.numel()
    assert point.weight_bytes == pytest.approx(point.stored_bits * weights / 8, abs=1)
    assert point.weight_bytes >= 4 * floats


def test_pareto_sweep_warns_when_the_test_data_lacks_a_calibrated_group(mlp_model, mlp_data, caplog):
    """Its worst-group column would silently cover the other groups only (survey 29)."""
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(4, 8), num_candidates=1, mw_steps=2,
                              sensitivity_samples=64)
    keep = mlp_data.group == 0
    only_a = GroupData(mlp_data.x[keep], mlp_data.y[keep], mlp_data.group[keep], ("a",), "only_a.npz")
    with caplog.at_level("WARNING"):
        (point,) = pareto_sweep(mlp_model, mlp_data, [6.0], mp, BASE, test=only_a, progress=False)
    assert point.worst_group == "a"
    assert f"no samples of group(s) 'b' of the calibration data {mlp_data.source}" in caplog.text


class _Counting(torch.nn.Module):
    """The trained MLP behind a forward that counts its calls in a buffer (monitoring code)."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.mlp(x)


def test_the_search_leaves_the_callers_model_as_it_was(mlp_model, mlp_data):
    """It ran the caller's eval-mode model (its buffers moved); compress copies first (survey 28)."""
    model = _Counting(copy.deepcopy(mlp_model)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(4, 8), num_candidates=1, mw_steps=2,
                              sensitivity_samples=64)
    search_mixed_precision(model, mlp_data, mp, BASE, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and int(model.calls) == 0


def test_a_sweep_on_unlabelled_data_says_its_figures_compare_with_the_float_model(mlp_model, mlp_data):
    """"accuracy" was top-1 agreement with the float model, unsaid (survey 31)."""
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(4, 8), num_candidates=1, mw_steps=2,
                              sensitivity_samples=64)
    unlabelled = GroupData(mlp_data.x, None, mlp_data.group, mlp_data.group_names, "nolabels.npz")
    (point,) = pareto_sweep(mlp_model, unlabelled, [6.0], mp, BASE, progress=False)
    assert point.metric == "accuracy against the float model's outputs (the data has no labels)"
    assert point.float_worst_group_acc == 1.0


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


def _same_search(a, b):
    """Two results of one search agree: allocation, every candidate's held-out metrics, the model."""
    assert a.allocation.bits == b.allocation.bits
    assert [c.allocation.bits for c in a.candidates] == [c.allocation.bits for c in b.candidates]
    assert [c.metrics.by_group for c in a.candidates] == [c.metrics.by_group for c in b.candidates]


def test_on_a_pool_the_search_refits_the_predicted_best_while_the_workers_verify(mlp_model, mlp_data, search):
    # num_calib=256 leaves too few samples unused: a split, then a refit. On 2 workers this process
    # refits the predicted best as soon as a worker has no fit left to take: the same search as
    # serial, the same model as compress, one fit more only when the guess was wrong
    base = replace(BASE, num_calib=256)
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=2,
                              mw_steps=20, verify_mean=False)
    res = {}
    for engine in (EngineConfig(engine="serial"), EngineConfig(engine="local", workers=2)):
        res[engine.engine] = search_mixed_precision(mlp_model, mlp_data, replace(mp, engine=engine), base,
                                                    progress=False, sensitivity=search.sensitivity)
    serial, pool = res["serial"], res["local"]
    _same_search(serial, pool)
    assert len(pool.candidates) >= 2 and not serial.refit_overlapped
    plain = compress(mlp_model, mlp_data, replace(base, layer_bits=dict(pool.allocation.bits)), progress=False)
    np.testing.assert_array_equal(pool.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    np.testing.assert_array_equal(serial.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    guessed = min(pool.candidates, key=lambda c: c.allocation.score)
    # the early refit starts when a worker has no fit left while another still fits; when both
    # finish in the same instant (a loaded machine) none starts and the winner is refitted after
    early = pool.refit_overlapped or "discarded_refit" in pool.seconds
    assert pool.refit_overlapped == (early and guessed is pool.chosen)
    assert ("discarded_refit" in pool.seconds) == (early and guessed is not pool.chosen)
    assert serial.fits == len(serial.candidates) + 1
    assert pool.fits == serial.fits + (1 if "discarded_refit" in pool.seconds else 0)
    assert pool.discarded_fits == (1 if "discarded_refit" in pool.seconds else 0) and serial.discarded_fits == 0
    # the file's metadata counts the fits the result was made of: the same on every engine
    assert pool.compressed.metadata.allocation == serial.compressed.metadata.allocation
    assert 0 < pool.one_compress()[0] == pool.seconds["refit"] and pool.wall_seconds > 0


def test_on_a_pool_the_search_process_fits_the_predicted_best_and_returns_it(mlp_model, mlp_data, search,
                                                                            monkeypatch):
    # default verification (each fit is compress itself): on 2 workers this process runs the
    # predicted best's fit and keeps it; when it wins it is returned without fitting it again
    import fqexport.search.verification as verification_module

    calls = []
    real = verification_module.compress
    monkeypatch.setattr(verification_module, "compress", lambda *a, **k: calls.append(
        threading.current_thread() is threading.main_thread()) or real(*a, **k))
    mp = replace(search.config, engine=EngineConfig(engine="local", workers=2))
    pool = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    _same_search(search, pool)
    assert all(calls)  # on the main thread: a helper thread's glibc arena page-faults the solver's tensors
    guessed = min(pool.candidates, key=lambda c: c.allocation.score)
    assert len(calls) == (1 if guessed is pool.chosen else 2)  # its fit here (+ the winner's, rebuilt)
    assert pool.fits == len(pool.candidates) and "refit" not in pool.seconds
    plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(pool.allocation.bits)), progress=False)
    np.testing.assert_array_equal(pool.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))


def test_a_one_fit_search_fits_here_on_all_threads_and_starts_no_worker(mlp_model, mlp_data, search, monkeypatch):
    # one candidate and no guard: a single fit, run in this process on its own threads as compress
    # runs (no worker could run anything beside it), so the local pool is never started
    import fqexport.search.verification as verification_module

    calls = []
    real = verification_module.compress
    monkeypatch.setattr(verification_module, "compress", lambda *a, **k: calls.append(
        (threading.current_thread() is threading.main_thread(), torch.get_num_threads())) or real(*a, **k))
    mp = replace(search.config, num_candidates=1, verify_uniform=False, verify_mean=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with make_engine(EngineConfig(engine="local", workers=2)) as engine:
            res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, engine=engine,
                                         sensitivity=search.sensitivity)
            assert engine._pool is None  # nothing was handed to a worker
        plain = compress(mlp_model, mlp_data, replace(BASE, layer_bits=dict(res.allocation.bits)), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert calls == [(True, 2)] and res.fits == 1  # fitted once, on both threads, and returned
    assert [c.origin for c in res.candidates] == ["search"]
    assert res.allocation.bits == search.candidates[0].allocation.bits
    np.testing.assert_array_equal(res.compressed.predict(mlp_data.x), plain.predict(mlp_data.x))
    assert res.compressed.metadata.allocation["uniform_guard"] is False
    assert "no uniform allocation was verified (verify_uniform=False; CLI --no-guard)" in res.unguarded
    assert search.unguarded is None and search.compressed.metadata.allocation["uniform_guard"] is True


def test_writers_on_given_points(tmp_path):
    p = ParetoPoint(budget=3.0, avg_bits=2.9, weight_bytes=1234.0, worst_group="b", worst_group_acc=0.8,
                    mean_acc=0.9, float_worst_group_acc=0.85, float_mean_acc=0.93, bits={"fc1": 3},
                    stored_bits=2.95, heldout_worst_loss_increase=0.05, reused_from=2.5)
    write_pareto_csv([p], tmp_path / "x.csv")
    text = (tmp_path / "x.csv").read_text().splitlines()
    assert text[0] == ",".join(PARETO_FIELDS) + ",bits"
    assert text[0].startswith("budget,avg_bits,stored_bits,weight_bytes,")
    assert text[1] == "3.0,2.9,2.95,1234.0,b,0.8,0.9,0.85,0.93,0.05,2.5,ok,,accuracy,fc1=3"
    # an infeasible budget: its figures are empty cells in the CSV, null in the JSON
    nan = float("nan")
    q = ParetoPoint(2.0, nan, nan, "", nan, nan, nan, nan, {}, status="infeasible", min_feasible_budget=2.2489)
    write_pareto_csv([q], tmp_path / "q.csv")
    assert (tmp_path / "q.csv").read_text().splitlines()[1] == "2.0,,,,,,,,,,,infeasible,2.2489,accuracy,"
    write_pareto_json([q, p], tmp_path / "q.json")
    doc = json.loads((tmp_path / "q.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert doc[0]["avg_bits"] is None and doc[0]["status"] == "infeasible" and doc[0]["min_feasible_budget"] == 2.2489
    assert doc[1]["status"] == "ok" and doc[1]["avg_bits"] == 2.9
    with pytest.raises(ConfigError, match="budgets must be a non-empty list"):
        pareto_sweep(None, None, [])
    # a bad budget anywhere in the list fails before the first (slow) search runs
    with pytest.raises(ConfigError, match=r"budget_bits=40 must be in \[2, 32\]"):
        pareto_sweep(None, None, [3, 40])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "set exactly one of budget_bits, budget_bytes, budget_bops (got none)"),
        ({"budget_bits": 3, "budget_bops": 1e6}, "(got budget_bits, budget_bops)"),
        ({"budget_bits": 33.0}, "budget_bits=33.0 must be in [2, 32] (stored bits per weight"),
        ({"budget_bytes": -5}, "budget_bytes=-5 must be a finite number > 0"),
        ({"budget_bits": 4, "objective": "max"}, "objective='max' is not one of worst-group, mean, weighted"),
        ({"budget_bits": 4, "bit_choices": (2, 9)}, "bit_choices=(2, 9) must be a non-empty set of integers from 2 to 8"),
        ({"budget_bits": 4, "bit_choices": ()}, "bit_choices=() must be a non-empty set of integers from 2 to 8"),
        ({"budget_bits": 4, "pin_first_last": 16}, "pin_first_last=16 is not supported"),
        ({"budget_bits": 4, "pins": {"fc": 1}}, "pins['fc']=1 is not supported"),
        ({"budget_bits": 4, "objective": "weighted"}, "objective='weighted' needs group_weights"),
        ({"budget_bits": 4, "group_weights": {"a": 2.0}},
         "group_weights={'a': 2.0} is only used by objective='weighted' (got objective='worst-group'); "
         "CLI: --objective weighted --objective-weights NAME=W,..."),
        ({"budget_bits": 4, "objective": "mean", "group_weights": {"a": 2.0, "b": 1.0}},
         "group_weights={'a': 2.0, 'b': 1.0} is only used by objective='weighted' (got objective='mean')"),
        ({"budget_bits": 4, "num_candidates": 0}, "num_candidates=0 must be >= 1"),
        ({"budget_bits": 4, "holdout_fraction": 1.0}, "holdout_fraction=1.0 must be in (0, 1)"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        MixedPrecisionConfig(**kwargs)
    assert message in str(err.value)


def test_a_budget_above_the_stored_bits_of_uniform_8_gets_every_layer_at_8(mlp_model, mlp_data, search):
    """budget_bits counts stored bits, scales included: uniform 8-bit stores a little over 8, and
    a budget that covers it must be able to buy it."""
    mp = replace(search.config, budget_bits=9.5, pins={})
    res = search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, sensitivity=search.sensitivity)
    (uniform8,) = [c.allocation for c in res.candidates if set(c.allocation.bits.values()) == {8}]
    assert 8.0 < uniform8.stored_bits <= 9.5  # verified beside the knapsack's, which may keep 4 bits
    assert res.allocation.stored_bits <= 9.5


def test_config_budget_views():
    assert MixedPrecisionConfig(budget_bops=2e6).budget_kind == "bops"
    assert MixedPrecisionConfig(budget_bytes=1000).budget_value == 1000.0


def test_a_pareto_template_with_another_budget_kind_is_refused(mlp_model, mlp_data):
    # its byte budgets would have been read as bits per weight: every point at 8 bits
    for template in (MixedPrecisionConfig(budget_bytes=20_000), MixedPrecisionConfig(budget_bops=1e6)):
        with pytest.raises(ConfigError, match=rf"pareto_sweep sweeps stored bits per weight, but mp_config's budget "
                                              rf"is budget_{template.budget_kind}="):
            pareto_sweep(mlp_model, mlp_data, [10_000, 30_000], template, BASE, progress=False)


def test_pareto_budgets_as_a_numpy_array_or_a_string(mlp_model, mlp_data):
    """np.array budgets: "truth value of an array is ambiguous"; "3,4" was read digit by digit (survey 32)."""
    with pytest.raises(ConfigError, match=r"budgets='3,4' must be a sequence of numbers"):
        pareto_sweep(mlp_model, mlp_data, "3,4", MixedPrecisionConfig(budget_bits=3.0), BASE, progress=False)
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(4, 8), num_candidates=1, mw_steps=2, sensitivity_samples=64)
    (point,) = pareto_sweep(mlp_model, mlp_data, np.array([6.0]), mp, BASE, progress=False)
    assert point.budget == 6.0 and type(point.budget) is float


class _SlicedPositions(torch.nn.Module):
    """Token ids → embedding + a position buffer sliced by the input's length, which torch.fx
    cannot trace (a slice by a Proxy of a buffer): fqexport traces it with torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(50, 16)
        self.register_buffer("pe", torch.randn(32, 16))
        self.fc, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)

    def forward(self, ids):
        x = self.tok(ids) + self.pe[: ids.shape[1]]
        return self.head(torch.relu(self.fc(x)).mean(1))


def sliced_positions_case(n: int = 96):
    """A :class:`_SlicedPositions` model and token ids labelled by its own top-1, 2 groups."""
    from fqexport.calibration.checks import validate_group_data

    torch.manual_seed(0)
    model = _SlicedPositions().eval()
    x = np.random.default_rng(0).integers(1, 50, (n, 8)).astype(np.int64)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, validate_group_data(x, y, np.arange(n) % 2, ["a", "b"], "ids.npz")


def test_the_search_traces_a_model_only_torch_export_traces_as_compress_does():
    """The search priced the layers on a batch of one sample, which torch.export fixes as a
    constant: compress worked, the search and the sweep were refused (survey 43)."""
    model, data = sliced_positions_case()
    res = search_mixed_precision(model, data, MixedPrecisionConfig(budget_bits=6.0, engine=EngineConfig(engine="serial")),
                                 QuantConfig(num_calib=32), progress=False)
    assert set(res.allocation.bits) == {"tok", "fc", "head"} and res.compressed.layers.keys() == {"tok", "fc", "head"}


def test_a_weighted_objective_naming_no_group_is_refused_before_the_sensitivity(mlp_model, mlp_data, monkeypatch):
    """A typo in --objective-weights was reported after the whole sensitivity pass (minutes on a large
    model), under the name of another flag, --group-weights (survey 57)."""
    def never(*args, **kwargs):
        raise AssertionError("the sensitivity ran before the weights were checked")

    monkeypatch.setattr(mp_module, "search_sensitivity", never)
    monkeypatch.setattr(pareto_module, "search_mixed_precision", never)
    mp = MixedPrecisionConfig(budget_bits=3.0, objective="weighted", group_weights={"a": 1, "bb": 3},
                              engine="serial")
    message = r"group_weights \(the weighted objective's; CLI --objective-weights\) names 'bb', which is not a group"
    with pytest.raises(ConfigError, match=message):
        mp_module.search_mixed_precision(mlp_model, mlp_data, mp, progress=False)
    with pytest.raises(ConfigError, match=message):
        pareto_module.pareto_sweep(mlp_model, mlp_data, [3.0, 4.0], mp_config=mp, progress=False)


def test_a_sweep_with_test_data_leaves_a_model_in_train_mode_untouched(mlp_data, monkeypatch):
    """pareto_sweep(..., test=...) ran the user's own model on the test data to check it, in the train mode
    the user left it in: its BatchNorm running statistics moved (survey 60)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(mlp_data.x.shape[1], 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, int(mlp_data.y.max()) + 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(pareto_module, "_sweep", lambda *args, **kwargs: [])  # the checks before the searches
    assert pareto_module.pareto_sweep(model, mlp_data, [3.0], test=mlp_data, progress=False) == []
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_file_records_the_search_that_chose_its_widths(search):
    """Survey 83: a file that said "objective: weighted" could not say the weights, the widths,
    the pins or the seed of the search."""
    settings = search.compressed.metadata.allocation["settings"]
    assert MixedPrecisionConfig(**settings) == replace(search.config, engine=MixedPrecisionConfig(budget_bits=3).engine)
    assert settings["pins"] == {"fc3": 8} and settings["bit_choices"] == [2, 3, 4, 8] and "engine" not in settings


def test_a_search_without_a_refit_warns_about_the_draw_its_returned_fit_holds(caplog):
    """Review of survey 82's fix: with refit=False the returned model is a fit on the held-in part,
    and the "few samples of a group" warning, left to a refit that never came, was not given."""
    import logging

    from fqexport.pipeline import compress as pipeline

    pipeline._warned_few.clear()
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = np.random.default_rng(0).standard_normal((120, 16)).astype(np.float32)
    group = np.zeros(120, np.int64)
    group[:6] = 1
    data = GroupData(x, model(torch.from_numpy(x)).argmax(1).numpy(), group, ("a", "b"))
    mp = MixedPrecisionConfig(budget_bits=7.0, refit=False, bit_choices=(4, 8), engine="serial")
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        search_mixed_precision(model, data, mp, QuantConfig(method="rtn", num_calib=512), progress=False)
    assert len([r for r in caplog.records if "hold few of some groups ('b' " in r.getMessage()]) == 1


def test_a_half_precision_model_is_searched_and_analyzed_as_compress_takes_it(mlp_model, mlp_data):
    """Survey 84: compress took a float32 copy of a float16/bfloat16 model, while the search and analyze
    refused it with "field 'x' ... does not fit the model (mat1 and mat2 must have the same dtype)"."""
    from fqexport.metrics.diagnostics import analyze

    half = copy.deepcopy(mlp_model).to(torch.bfloat16)
    mp = MixedPrecisionConfig(budget_bits=6.0, bit_choices=(4, 8), num_candidates=1, verify_uniform=False,
                              verify_mean=False, sensitivity="fisher", engine="serial")
    res = search_mixed_precision(half, mlp_data, mp, QuantConfig(method="rtn", num_calib=64), progress=False)
    assert set(res.allocation.bits) == set(res.compressed.layers)
    assert analyze(half, mlp_data, bits=(8,), hessian_iters=0, max_samples_per_group=16).variants[-1] == "W8A8"
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is not changed


class _RecordingEngine(SerialEngine):
    """A serial engine that records when the search starts it (``prepare``) and when the
    sensitivity is measured."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def prepare(self) -> None:
        self.events.append("prepare")


@pytest.mark.parametrize("one_fit", [False, True])
def test_the_engine_starts_before_the_sensitivity_when_the_verification_hands_out_fits(
        mlp_model, mlp_data, search, monkeypatch, one_fit):
    events: list = []
    real = mp_module.search_sensitivity
    monkeypatch.setattr(mp_module, "search_sensitivity", lambda *a, **k: events.append("sensitivity") or real(*a, **k))
    extra = {"num_candidates": 1, "verify_uniform": False, "verify_mean": False} if one_fit else {}
    mp = replace(search.config, sensitivity="output-fisher", **extra)
    search_mixed_precision(mlp_model, mlp_data, mp, BASE, progress=False, engine=_RecordingEngine(events))
    # a local engine's forkserver imports torch while the Fisher sensitivity runs, not after it;
    # a search of one fit (run in this process) never starts the workers
    assert events == (["sensitivity"] if one_fit else ["prepare", "sensitivity"])


def test_the_compressed_models_stored_bits_are_the_allocations(search):
    """CompressedModel.stored_weight_bits (compress's report.json) counts what the allocator counts: the
    codes in their containers with scales and zero points (no float layer here, which it adds at 32)."""
    cm = search.compressed
    assert not cm.metadata.float_layers
    assert cm.stored_weight_bits == pytest.approx(search.allocation.stored_bits, rel=1e-12)
    assert cm.stored_weight_bits > cm.avg_weight_bits


class _Up(torch.nn.Module):
    """A conv, a ConvTranspose2d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stored_weight_bits_are_the_written_initializers_of_each_layer(cnn_data, tmp_path, bits):
    """review 100: an int8 ConvTranspose2d keeps its weight zero point in the file (compact drops it
    before a Conv only), which the byte rule left out (216 bytes predicted, 222 written); packed INT4/INT2
    codes carry one for the Linear only."""
    torch.manual_seed(0)
    cm = compress(_Up().eval(), cnn_data, QuantConfig(weight_bits=bits, num_calib=64, method="rtn"), progress=False)
    path = export_qdq(cm, tmp_path / "m.onnx").path
    written: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        layer = t.name.partition(".weight")[0]
        if layer in cm.layers and t.name != f"{layer}.bias":
            written[layer] = written.get(layer, 0) + len(t.raw_data)
    params = sum(l.params for l in cm.layers.values())
    assert sorted(written) == ["conv", "head", "up"]
    assert cm.stored_weight_bits == pytest.approx(8 * sum(written.values()) / params, rel=1e-12)
