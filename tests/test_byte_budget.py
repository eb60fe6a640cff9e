"""``budget_bytes`` on a small model: the planning floor (``file_overhead_estimate``) lets through
every budget a file can meet, and the measured file decides — shrinking, growing into unused room
(``fit_file_budget``), or a clear error with the smallest file's measured size."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

import fixtures_models as fm
import fqexport.search.mixed_precision as mp_module
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.errors import ConfigError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress
from fqexport.search import byte_budget
from fqexport.search.allocation import Allocation, Budget, stored_bytes
from fqexport.search.byte_budget import file_overhead_estimate, fit_file_budget
from fqexport.search.candidates import Candidate
from fqexport.search.costs import layer_costs

BASE = QuantConfig(num_calib=128, batch_size=128)
# the estimate before: constants tuned on the demo ResNet (5500 B + 700 B and the fp32 bias per layer)
OLD_BASE, OLD_LAYER = 5500, 700


def small_tabular() -> nn.Sequential:
    """The survey's tabular MLP (Linear, BatchNorm, ReLU, Linear, LayerNorm, GELU, Linear), 16 wide:
    its uniform 8-bit file is smaller than the old estimate's bytes outside the weights alone."""
    torch.manual_seed(0)
    h = 16
    return nn.Sequential(nn.Linear(fm.MLP_FEATURES, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h),
                         nn.LayerNorm(h), nn.GELU(), nn.Linear(h, fm.NUM_CLASSES))


@pytest.fixture(scope="module")
def tab(mlp_data):
    model = fm.train(small_tabular(), mlp_data)
    layers = layer_costs(model, torch.from_numpy(mlp_data.x[:1]))
    w2 = sum(stored_bytes(l, 2, BASE.storage) for l in layers)  # the smallest allocation's weight bytes
    old_need = w2 + OLD_BASE + sum(OLD_LAYER + 4 * l.channels for l in layers)  # what the old check asked
    return model, layers, w2, old_need


def _w8_file(model, data, tmp_path) -> int:
    return export_qdq(compress(model, data, replace(BASE, weight_bits=8), progress=False), tmp_path / "w8.onnx",
                      check=False).size_bytes


def _mp(budget: float, **kw) -> MixedPrecisionConfig:
    return MixedPrecisionConfig(budget_bytes=budget, bit_choices=(2, 4, 8), num_candidates=1, mw_steps=5,
                                sensitivity_samples=128, **kw)


def search_bytes(model, data, budget, **kw):
    return mp_module.search_mixed_precision(model, data, _mp(budget, **kw), BASE, progress=False)


@pytest.fixture
def files(monkeypatch):
    """Every (weight bytes, size) of a file the bytes check measures."""
    seen: list[tuple[int, int]] = []
    real = mp_module.written_size

    def written_size(cm):
        size = real(cm)
        seen.append((cm.metadata.allocation["weight_bytes"], size))
        return size

    monkeypatch.setattr(mp_module, "written_size", written_size)
    return seen


def test_a_budget_between_the_w8_file_and_the_old_estimate_is_met_with_the_room(tab, mlp_data, tmp_path):
    model, layers, w2, old_need = tab
    w8 = _w8_file(model, mlp_data, tmp_path)
    assert w8 < old_need  # the old estimate refused every budget below old_need ("needs ..."), this one too
    budget = (w8 + old_need) // 2
    res = search_bytes(model, mlp_data, budget)
    size = export_qdq(res.compressed, tmp_path / "b.onnx", check=False).size_bytes
    assert size <= budget
    assert res.allocation.weight_bytes > w2  # not all 2-bit: the room is used
    assert {n: l.bits for n, l in res.compressed.layers.items()} == res.allocation.bits
    # the planning figure is a floor of the file's bytes outside the weights (graph, biases, metadata)
    assert size - res.allocation.weight_bytes >= file_overhead_estimate(layers)


def test_a_file_well_under_the_budget_grows_into_the_measured_room(tab, mlp_data, tmp_path, monkeypatch, files):
    # planning with the old (demo) estimate: the first file fits with much room left; the measured
    # bytes outside the weights then buy a larger allocation — one verification more, its fit the refit
    model, _, _, old_need = tab

    def old(layers):
        return float(OLD_BASE + sum(OLD_LAYER + 4 * l.channels for l in layers))

    monkeypatch.setattr(mp_module, "file_overhead_estimate", old)
    budget = old_need + 400
    res = search_bytes(model, mlp_data, budget)
    first_weights, first_size = files[0]
    assert first_size < budget - byte_budget.GROW_FRACTION * budget
    assert res.fallback.startswith(f"the written file took {first_size} bytes, {budget - first_size} under "
                                   f"budget_bytes={budget}: refitted a larger allocation")
    assert res.allocation.weight_bytes > first_weights
    assert res.chosen.measured_worst < min(c.measured_worst for c in res.candidates
                                           if c.allocation.weight_bytes == first_weights)
    assert export_qdq(res.compressed, tmp_path / "g.onnx", check=False).size_bytes <= budget
    # every fit counted: one per verified candidate; the fits are compress itself, so the larger
    # allocation's verification fit is its refit (survey 63: it was fitted a second time)
    assert res.fits == len(res.candidates) and res.chosen.origin == "bytes-refit"
    assert res.compressed.metadata.allocation["fits"] == res.fits
    assert res.compressed.metadata.allocation["fallback"] == res.fallback


def test_an_infeasible_budget_errors_with_the_measured_smallest_file(tab, mlp_data, tmp_path):
    model, layers, w2, _ = tab
    floor_need = w2 + file_overhead_estimate(layers)
    # below the floor: no file can be that small, the allocator says so before any fit
    with pytest.raises(ConfigError, match=rf"budget_bytes={int(floor_need) - 1} cannot be met: the smallest "
                                          rf"allocation .* needs at least {floor_need:g}"):
        search_bytes(model, mlp_data, int(floor_need) - 1)
    # above the floor, below the smallest file: the measured size of that file
    budget = int(floor_need) + 1
    with pytest.raises(ConfigError) as info:
        search_bytes(model, mlp_data, budget)
    m = re.fullmatch(rf"budget_bytes={budget} cannot be met by the allocations the search tried: the one with the "
                     r"fewest weight bytes \(uniform 2-bit; weights (\d+) \+ graph and metadata (\d+) bytes\) writes a "
                     r"file of (\d+) bytes, measured \(the graph bytes change with the containers: another "
                     r"allocation's file may be smaller\); raise --budget-bytes \((\d+) fits this one\)",
                     str(info.value))
    assert m, str(info.value)
    weights, overhead, size, need = map(int, m.groups())
    assert weights == w2 and weights + overhead == size == need > budget
    # the size it names is enough
    res = search_bytes(model, mlp_data, need)
    assert export_qdq(res.compressed, tmp_path / "n.onnx", check=False).size_bytes <= need


# fit_file_budget on its own: candidates, sizes and fits made up


def _cand(bits: int, weight_bytes: int, worst: float, origin: str = "search") -> Candidate:
    alloc = Allocation({"fc": bits}, {"a": worst}, "worst-group", worst, Budget("bytes", 1e6), 0.0, float(bits),
                       weight_bytes=weight_bytes)
    return Candidate(alloc, origin, metrics=object(), measured_loss_increase={"a": worst})


class Fake:
    """Widths 2, 4, 8 with 1000, 2000, 4000 weight bytes and measured losses 0.5, 0.2, 0.1; a file
    holds its weights and ``overhead[width]`` bytes more."""

    def __init__(self, overhead: dict[int, int], menu=((2, 1000, 0.5), (4, 2000, 0.2), (8, 4000, 0.1))) -> None:
        self.overhead, self.menu = overhead, menu
        self.refits, self.verified, self.measured = [], [], []

    def propose(self, overhead: float, budget: float) -> Allocation:
        fitting = [m for m in self.menu if m[1] + overhead <= budget]
        if not fitting:
            raise ConfigError("the budget cannot be met")
        return _cand(*max(fitting, key=lambda m: m[1])).allocation

    def verify(self, alloc: Allocation) -> Candidate:
        self.verified.append(alloc.bits["fc"])
        return _cand(*next(m for m in self.menu if m[0] == alloc.bits["fc"]))

    def refit(self, alloc: Allocation):
        self.refits.append(alloc.bits["fc"])
        return f"model-{alloc.bits['fc']}"

    def measure(self, c: Candidate, model, note, refits) -> int:
        size = c.allocation.weight_bytes + self.overhead[c.allocation.bits["fc"]]
        self.measured.append((c.allocation.bits["fc"], size, refits))
        return size

    def fit(self, best: Candidate, candidates: list[Candidate], budget: float):
        mp = MixedPrecisionConfig(budget_bytes=budget)
        return fit_file_budget(best, f"model-{best.allocation.bits['fc']}", candidates, mp,
                               propose=lambda o: self.propose(o, budget), verify=self.verify, refit=self.refit,
                               measure=self.measure)


def test_fit_grows_once_and_keeps_the_last_file_that_fitted():
    small = _cand(2, 1000, 0.5, "uniform")
    # the 8-bit file (4000 + 5000) fits 10000: grown into
    fake = Fake({2: 4000, 4: 4000, 8: 5000})
    fit = fake.fit(small, [small], 10_000)
    assert (fit.candidate.allocation.bits, fit.model, fit.refits) == ({"fc": 8}, "model-8", 1)
    assert fit.note.startswith("the written file took 5000 bytes, 5000 under budget_bytes=10000: refitted a larger")
    assert fake.verified == [8] and fit.sizes == [5000, 9000]
    # its file (4000 + 6500) does not: the 2-bit one stays, and 8 bits is not tried again
    fake = Fake({2: 4000, 4: 4000, 8: 6500})
    fit = fake.fit(small, [small], 10_000)
    assert (fit.candidate, fit.model, fit.refits, fit.note) == (small, "model-2", 1, None)
    assert fit.sizes == [5000, 10_500]
    # little room left (<= 2 % of the budget): no fit
    fake = Fake({2: 4000, 4: 4000, 8: 5000})
    fit = fake.fit(small, [small], 5100)
    assert (fit.candidate, fit.refits, fake.verified) == (small, 0, [])
    # room, but no larger allocation fits it (4 bits: 2000 + 4000 > 5800): nothing verified
    fake = Fake({2: 4000, 4: 4000, 8: 5000})
    fit = fake.fit(small, [small], 5800)
    assert (fit.candidate, fit.refits, fake.verified) == (small, 0, [])
    # a larger allocation that measured no better is not taken
    worse = Fake({2: 4000, 4: 4000, 8: 5000}, menu=((2, 1000, 0.5), (4, 2000, 0.6), (8, 4000, 0.7)))
    fit = worse.fit(small, [small], 10_000)
    assert (fit.candidate, fit.refits, worse.verified) == (small, 0, [8])


def test_fit_shrinks_with_the_measured_bytes():
    big = _cand(8, 4000, 0.1)
    cands = [big, _cand(4, 2000, 0.2, "uniform"), _cand(2, 1000, 0.5, "uniform")]
    fake = Fake({2: 3000, 4: 3000, 8: 3500})
    fit = fake.fit(big, cands, 6000)  # 7500 > 6000: 4 bits (5000) fits the 2500 bytes left
    assert (fit.candidate.allocation.bits, fit.refits, fake.verified) == ({"fc": 4}, 1, [])
    assert fit.note == ("the written file took 7500 bytes > budget_bytes=6000: refitted a smaller allocation of "
                        "2000 weight bytes (file <= 5000 bytes)")  # the refitted file's size, measured
    assert fit.sizes == [7500, 5000] and [r for _, _, r in fake.measured] == [0, 1]


def test_a_note_after_several_refits_names_the_searchs_file_and_every_file_written():
    """After two shrinking refits the note named only the last trigger ("the written file took 6200
    bytes"), the size of a refit rather than of the search's choice, and not that two refits ran (survey 57)."""
    big = _cand(8, 4000, 0.1)
    cands = [big, _cand(4, 2000, 0.2, "uniform"), _cand(2, 1000, 0.5, "uniform")]
    fake = Fake({2: 3000, 4: 4200, 8: 3500})  # 7500 > 6000, then 6200 > 6000, then 4000
    fit = fake.fit(big, cands, 6000)
    assert (fit.candidate.allocation.bits, fit.refits, fit.sizes) == ({"fc": 2}, 2, [7500, 6200, 4000])
    assert fit.note == ("the written file took 7500 bytes > budget_bytes=6000: refitted a smaller allocation of "
                        "1000 weight bytes (file <= 4000 bytes); 2 refits, files of 7500, 6200, 4000 bytes in turn")


def test_written_size_does_not_depend_on_the_note_the_fits_or_the_task_reason(tab, mlp_data, tmp_path):
    """What the search writes in the metadata after the check, or differently on each path, is
    counted at a fixed length: the same allocation measures the same, never below its file."""
    model = tab[0]
    cm = compress(model, mlp_data, replace(BASE, weight_bits=4), progress=False)
    sizes = []
    for note, fits, reason, origin, budget in [
        (None, 3, "given", "mean", 900.0),
        ("x" * 120, 12, "inferred: the data holds no boxes or masks", "bytes-refit", 12345.0),
    ]:
        allocation = {"fallback": note, "fits": fits, "origin": origin, "budget": {"kind": "bytes", "value": budget}}
        cm.metadata = replace(cm.metadata, allocation=allocation, task={**cm.metadata.task, "chosen": reason})
        sizes.append(byte_budget.written_size(cm))
    assert sizes[0] == sizes[1] >= export_qdq(cm, tmp_path / "w.onnx", check=False).size_bytes  # the longer fields


def test_the_sizing_exports_are_no_outputs_of_the_run(tab, mlp_data):
    """Survey 89: after a --budget-bytes error, the CLI named the deleted sizing files as outputs."""
    from fqexport.atomic import outputs_written

    cm = compress(tab[0], mlp_data, replace(BASE, weight_bits=4), progress=False)
    before = outputs_written()
    size = byte_budget.written_size(cm)
    with pytest.raises(ConfigError):
        byte_budget.check_finetuned_size(cm, size // 2)
    assert outputs_written() == before


def test_fit_measures_the_smallest_allocation_before_giving_up():
    big = _cand(8, 4000, 0.1)
    cands = [big, _cand(2, 1000, 0.5, "uniform")]
    # by the 8-bit file's bytes (4500) nothing fits 5400; the 2-bit file (1000 + 4300) does
    fit = Fake({2: 4300, 4: 4400, 8: 4500}).fit(big, cands, 5400)
    assert fit.candidate.allocation.bits == {"fc": 2} and fit.sizes == [8500, 5300]
    # ... or does not: the error gives its measured size
    with pytest.raises(ConfigError, match=r"^budget_bytes=5200 cannot be met by the allocations the search tried: "
                                          r"the one with the fewest weight bytes \(uniform 2-bit; weights 1000 \+ "
                                          r"graph and metadata 4300 bytes\) writes a file of 5300 bytes, measured .*; "
                                          r"raise --budget-bytes \(5300 fits this one\)$"):
        Fake({2: 4300, 4: 4400, 8: 4500}).fit(big, list(cands), 5200)


def test_a_fine_tuning_record_that_breaks_the_bytes_budget_is_refused_with_the_size_it_needs(tab, mlp_data, tmp_path):
    """compress --budget-bytes N --finetune: fine-tuning adds its record to the metadata after the search
    met N; a file that no longer fits is refused (exit 2 on the CLI) naming its exact size."""
    cm = compress(tab[0], mlp_data, replace(BASE, weight_bits=4), progress=False)
    size = int(export_qdq(cm, tmp_path / "plain.onnx", check=False).size_bytes)
    assert byte_budget.check_finetuned_size(cm, size) == size
    record = {"history": [{"epoch": e, "holdout": {"a": {"accuracy": 0.5, "loss": 1.0}}} for e in range(20)]}
    tuned = replace(cm, metadata=replace(cm.metadata, finetune=record))
    grown = int(export_qdq(tuned, tmp_path / "tuned.onnx", check=False).size_bytes)
    with pytest.raises(ConfigError) as err:
        byte_budget.check_finetuned_size(tuned, size + 10)
    assert str(err.value) == byte_budget.MSG_FINETUNED_BYTES.format(
        budget=size + 10, size=grown, record=byte_budget._json_bytes(record))
    assert byte_budget.check_finetuned_size(tuned, grown) == grown
