"""Tests of exporters/export_check.py: who judges an export for a target (this CPU's ORT session
only for its own kernel family, the emulation for every other), and the agreement verdict."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.errors import ConfigError, ExportError
from fqexport.exporters import cpu_isa as cpu_isa_mod
from fqexport.exporters.cpu_isa import HOST_KERNELS_ENV, host_family, runs_natively
from fqexport.exporters.export_check import (
    GRAPH,
    MAX_EMULATED_SAMPLES,
    TARGET_FAMILIES,
    Judge,
    _judge_logits,
    check_export,
    check_subset,
    kernel_judges,
)
from fqexport.tasks.classification import agreement_failed, top1_agreement

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa

AVX2, VNNI, ARM = "x86-avx2", "x86-vnni", "arm64"
# CPU instruction set -> {target: judges}, written out by hand from docs/kernel-targets.md.
PLANS = {
    "x86-avx2": {
        "portable": [Judge(AVX2, True), Judge(VNNI, False, (ARM,))],
        "x86-avx2": [Judge(AVX2, True)],
        "x86-vnni": [Judge(VNNI, False)],
        "arm64": [Judge(ARM, False)],
        "gpu": [Judge(GRAPH, False)],
    },
    "x86-avx512-vnni+amx": {
        "portable": [Judge(VNNI, True, (ARM,)), Judge(AVX2, False)],
        "x86-avx2": [Judge(AVX2, False)],
        "x86-vnni": [Judge(VNNI, True)],
        "arm64": [Judge(ARM, False)],
        "gpu": [Judge(GRAPH, False)],
    },
    "arm64": {
        "portable": [Judge(ARM, True, (VNNI,)), Judge(AVX2, False)],
        "x86-avx2": [Judge(AVX2, False)],
        "x86-vnni": [Judge(VNNI, False)],
        "arm64": [Judge(ARM, True)],
        "gpu": [Judge(GRAPH, False)],
    },
    "unknown": {
        "portable": [Judge(AVX2, False), Judge(VNNI, False, (ARM,))],
        "x86-avx2": [Judge(AVX2, False)],
        "x86-vnni": [Judge(VNNI, False)],
        "arm64": [Judge(ARM, False)],
        "gpu": [Judge(GRAPH, False)],
    },
}


@pytest.mark.parametrize("isa", list(PLANS))
@pytest.mark.parametrize("target", list(TARGET_FAMILIES))
def test_this_cpus_session_judges_only_its_own_family(monkeypatch, isa, target):
    monkeypatch.delenv(HOST_KERNELS_ENV, raising=False)
    monkeypatch.setattr(cpu_isa_mod, "cpu_isa", lambda cpuinfo=None: isa)
    assert list(kernel_judges(target)) == PLANS[isa][target]


@pytest.mark.parametrize("host", [AVX2, VNNI, ARM])
def test_a_stand_in_host_is_judged_by_emulation_only(monkeypatch, host):
    # FQEXPORT_HOST_KERNELS: CI runs the suite as if on each family; this CPU's session never judges
    monkeypatch.setenv(HOST_KERNELS_ENV, host)
    assert host_family() == host and not runs_natively(host)
    judges = kernel_judges("portable")
    assert not any(j.native for j in judges)
    assert host in judges[0].families  # the stand-in's own family first
    assert sorted(f for j in judges for f in j.families) == sorted(TARGET_FAMILIES["portable"])


def test_an_unknown_stand_in_host_is_a_config_error(monkeypatch):
    monkeypatch.setenv(HOST_KERNELS_ENV, "x86-sse")
    with pytest.raises(ConfigError, match=r"^environment variable FQEXPORT_HOST_KERNELS='x86-sse' is not one of "
                                          r"x86-avx2, x86-vnni, arm64 \(unset it to use this CPU's own kernels\)$"):
        host_family()


def test_judges_say_which_kernels_judged():
    assert Judge(AVX2, True).describe() == "this CPU's x86-avx2 int8 kernels (ONNX Runtime's optimized session)"
    assert Judge(VNNI, False, (ARM,)).describe() == "the emulated x86-vnni/arm64 int8 kernels"
    assert Judge(GRAPH, False).describe().startswith("the graph's own math")


def test_check_subset_takes_the_groups_round_robin():
    group = np.array([0] * 900 + [1] * 60 + [2] * 40)  # sorted by group, like many data files
    idx = check_subset(group, MAX_EMULATED_SAMPLES)
    assert len(idx) == MAX_EMULATED_SAMPLES and np.all(np.diff(idx) > 0)
    assert np.bincount(group[idx], minlength=3).tolist() == [156, 60, 40]  # small groups whole
    two = np.array([1, 0] * 500)
    assert np.bincount(two[check_subset(two, MAX_EMULATED_SAMPLES)]).tolist() == [128, 128]
    np.testing.assert_array_equal(check_subset(group[:100], MAX_EMULATED_SAMPLES), np.arange(100))


def test_top1_agreement_ignores_only_near_ties():

    want = np.array([[1.0, 0.99, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.5, 0.6]], np.float32)
    got = want.copy()
    got[0] = [0.99, 1.0, 0.0]  # flips a near-tie (margin 0.01)
    got[3] = [0.0, 0.6, 0.5]  # flips a decided sample (margin 0.1)
    raw, decided = top1_agreement(got, want, tie=0.05)
    assert raw == 0.5
    assert decided == 2 / 3  # samples 1, 2, 3 are decided; sample 3 disagrees
    assert top1_agreement(got, want, tie=0.0) == (0.5, 0.5)


def test_agreement_check_allows_one_flip_but_not_two_on_small_sets():

    rng = np.random.default_rng(0)
    want = rng.normal(size=(60, 4)).astype(np.float32)
    want[np.arange(60), want.argmax(1)] += 1.0  # every sample decided (margin >= 1)
    got = want.copy()

    def flip(i):
        got[i] = want[i]
        got[i, want[i].argmax()] = want[i].min() - 1.0

    assert not agreement_failed(got, want, tie=0.05)
    flip(0)
    assert not agreement_failed(got, want, tie=0.05)  # 1 of 60 (98.3%): within one sample
    flip(1)
    assert agreement_failed(got, want, tie=0.05)  # 2 of 60
    # on a large set the 99% bar rules: 2 flips of 1000 pass, 11 do not
    want = np.tile(want, (17, 1))[:1000]
    got = want.copy()
    for i in range(2):
        got[i, want[i].argmax()] = want[i].min() - 1.0
    assert not agreement_failed(got, want, tie=0.05)
    for i in range(2, 11):
        got[i, want[i].argmax()] = want[i].min() - 1.0
    assert agreement_failed(got, want, tie=0.05)


def test_a_reference_with_nan_outputs_fails_the_check_before_any_judge():
    """NaN logits agree with NaN logits under argmax: the check passed a file that outputs NaN (survey 30)."""
    import pathlib

    want = np.zeros((6, 3), np.float32)
    want[4, 0] = np.nan
    with pytest.raises(ExportError, match=r"m.onnx: the PyTorch reference outputs NaN or Inf on 1 of the 6 "
                                          r"calibration samples"):
        check_export(None, want, np.zeros((6, 2), np.float32), np.zeros(6, np.int64), target="portable",
                     full_range=False, path=pathlib.Path("m.onnx"))


def _identity_model():
    """A float ONNX graph y = x·I: what any judge returns is its input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "identity",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                          initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_the_rule_holds_within_each_group_not_only_over_all_samples(tmp_path):
    """Full-range weights on an AVX2 CPU flipped 2 of a 47-sample minority (4.3 %) and none of the
    majority: 99.61 % overall passed the check, and the file cost the minority 2.69 pt (survey 56)."""
    x = np.where((np.arange(200) % 2 == 0)[:, None], [5.0, 0.0], [0.0, 5.0]).astype(np.float32)
    group = (np.arange(200) >= 180).astype(np.int64)  # 180 majority, 20 minority
    want = x.copy()
    flipped = [181, 183]  # two decided minority samples the file gets "wrong"
    want[flipped] = want[flipped][:, ::-1]
    with pytest.raises(ExportError, match=r"m.onnx: for target='gpu', the exported model run with the graph's own math "
                                          r".* on group 'minority' agrees with the PyTorch fake-quant reference on "
                                          r"only 90.00% of the 20 calibration samples"):
        check_export(_identity_model(), want, x, group, target="gpu", full_range=False, path=tmp_path / "m.onnx",
                     group_names=("majority", "minority"))
    # one flip in the minority: within the rule there as over all
    want[flipped[1]] = x[flipped[1]]
    verdict, = check_export(_identity_model(), want, x, group, target="gpu", full_range=False,
                            path=tmp_path / "m.onnx", group_names=("majority", "minority"))
    assert verdict.passed and verdict.by_group == {"majority": 1.0, "minority": 0.95}
    assert "worst group 'minority' 95.00%" in verdict.line()
    assert verdict.to_dict()["decided_agreement_by_group"] == {"majority": 1.0, "minority": 0.95}


def test_a_family_that_computes_the_file_as_this_cpu_takes_its_verdict_on_every_sample(tmp_path):
    """Survey 69: a W8 MobileOne was refused by the emulated x86-avx2 judge at 98.08 % of a 256-sample
    subset while this CPU passed it on all 512; the file held no node whose sums depend on the
    kernels, so the two judged the same outputs on different samples."""
    x = np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32)
    group = (np.arange(300) % 3 == 0).astype(np.int64)
    verdicts = check_export(_identity_model(), x.copy(), x, group, target="portable", full_range=False,
                            path=tmp_path / "m.onnx")
    assert sorted(f for v in verdicts for f in v.judge.families) == sorted(TARGET_FAMILIES["portable"])
    # under a stand-in host (FQEXPORT_HOST_KERNELS) no judge is native: each emulation judges its subset
    samples = 300 if verdicts[0].judge.native else MAX_EMULATED_SAMPLES
    assert all(v.samples == samples and v.agreement == verdicts[0].agreement for v in verdicts)


def test_a_family_whose_kernels_compute_otherwise_is_still_judged_by_them(tmp_path):
    """A full-range Gemm whose pairs saturate on AVX2: the x86-avx2 judge (emulated, or this CPU's)
    fails it against exact sums, whichever CPU runs the test."""
    import onnx
    from fixtures_models import saturating_qdq_gemm

    data = saturating_qdq_gemm(tmp_path / "sat.onnx")
    exact = _judge_logits(Judge("x86-vnni", native=False), tmp_path / "sat.onnx", data.x)
    with pytest.raises(ExportError, match=r"x86-avx2 int8 kernels .*agrees with the PyTorch fake-quant reference on "
                                          r"only 75\.00% of the 40 calibration samples"):
        check_export(onnx.load(str(tmp_path / "sat.onnx")), exact, data.x, data.group, target="portable",
                     full_range=True, path=tmp_path / "m.onnx", group_names=data.group_names)


def test_a_check_where_no_sample_is_decided_says_it_judged_nothing():
    """Survey 84: a model whose logits are all equal had no decided sample, and the line still read
    "(100.00% of the decided ones) — passed"."""
    from fqexport.exporters.export_check import GRAPH, Judge, Verdict
    from fqexport.tasks.classification import Classification

    want = np.zeros((6, 3), np.float32)  # every prediction a tie
    c = Classification().compare(want.copy(), want)
    assert c.decided == 0 and c.passed
    judge = Judge(GRAPH, False)
    line = Verdict(judge, 6, c.agreement, c.decided_agreement, c.max_abs_diff, c.passed, decided=c.decided).line()
    assert "(no sample decided: every reference prediction is a near-tie at the export's resolution, so the " \
           "agreement cannot judge this file; the max difference below is what can)" in line
    decided = Classification().compare(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))
    assert decided.decided == 3
    assert "(100.00% of the decided ones)" in Verdict(judge, 3, 1.0, 1.0, 0.0, True, decided=3).line()
