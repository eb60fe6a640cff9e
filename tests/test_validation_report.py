"""Tests of fqexport/validation/validation_report.py: the quantities the report defines."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fqexport.errors import ValidationFailed
from fqexport.metrics.group_metrics import group_metrics
from fqexport.validation.checks import run_checks
from fqexport.validation.latency import LatencyResult
from fqexport.validation.thresholds import Thresholds
from fqexport.validation.validation_report import (
    MSG_FAILED,
    MSG_NOT_COMPARED,
    ValidationReport,
    group_drop,
    kernel_deviation,
    measured_max,
    not_measured,
    pepr_score,
)

Y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
GROUP = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def _metrics(pred):
    return group_metrics(np.eye(2)[np.asarray(pred)] * 3.0, Y, GROUP, ("a", "b"))


def test_pepr_score():
    assert pepr_score(0.9, 4) == pytest.approx(0.9 / 1.125)
    assert pepr_score(1.0, 32) == 0.5


def test_group_drop_and_kernel_deviation_per_group():
    ref = _metrics(Y)  # right everywhere
    model = _metrics([0, 1, 0, 1, 1, 0, 0, 1])  # a 4/4, b 2/4
    other = _metrics([1, 1, 0, 1, 0, 1, 0, 1])  # a 3/4, b 4/4
    assert group_drop(ref, model) == {"a": 0.0, "b": 0.5}
    assert group_drop(model, ref) == {"a": 0.0, "b": -0.5}  # the model better than its reference: negative
    assert kernel_deviation(model, other) == {"a": 0.25, "b": 0.5}
    assert kernel_deviation(other, model) == kernel_deviation(model, other)


def test_report_views():
    m = _metrics([0, 1, 0, 1, 1, 0, 0, 1])
    r = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m,
                         group_drop={"a": -0.25, "b": 0.5})
    assert r.passed and r.failures() == [] and r.max_group_drop == ("b", 0.5)
    d = r.to_dict()
    assert d["worst_group"] == "b" and d["worst_group_accuracy"] == 0.5 and d["accuracy_gap"] == 0.5
    assert d["reference"]["group_drop"] == {"a": -0.25, "b": 0.5} and d["kernel"]["fused_kernels"] is None
    assert d["targets"] == {"native": {"emulated": False, "emulated_nodes": None, "native_nodes": None,
                                       "metrics": m.to_dict(),
                                       "kernel_deviation_by_group": None,
                                       "agreement_with_native": 1.0}}


def test_raise_for_failures_is_the_gate():
    m = _metrics([0, 1, 0, 1, 1, 0, 0, 1])  # a 100 %, b 50 %
    passing = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m)
    passing.raise_for_failures()  # no limit: nothing raised
    checks = run_checks(passing, Thresholds(min_worst_group_acc=60, max_acc_gap=60))
    report = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, checks=checks)
    with pytest.raises(ValidationFailed) as info:
        report.raise_for_failures()
    (broken,) = report.failures()
    assert broken.name == "min_worst_group_acc"
    assert info.value.failures == [f"min_worst_group_acc: {broken.message}"]
    assert str(info.value) == MSG_FAILED.format(model="m.onnx", count=1, checks=f"min_worst_group_acc: {broken.message}")


def test_a_group_without_a_value_fails_the_worst_group_and_drop_checks():
    """A group with samples but a NaN metric (a detector's images without boxes) is left out of
    group_min and the drops: the gate must not pass on the other groups alone."""
    m = _metrics(Y)
    by_group = {"a": dict(m.by_group["a"]), "b": {**m.by_group["b"], "accuracy": float("nan")}}
    m = dataclasses.replace(m, by_group=by_group)
    assert m.group_min() == ("a", 1.0)
    report = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m,
                              group_drop={"a": 0.0, "b": float("nan")})
    checks = {c.name: c for c in run_checks(report, Thresholds(min_worst_group_acc=10, max_group_drop=5, max_acc_gap=5))}
    for name in ("min_worst_group_acc", "max_group_drop", "max_acc_gap"):
        assert not checks[name].passed and checks[name].group == "b"
        assert "group 'b' cannot be measured (its 4 sample(s) give no value" in checks[name].message
    # survey 90: the gap's line named the one measured group twice ("gap of group 'a' to the best group 'a'")
    assert checks["max_acc_gap"].message.startswith("accuracy gap: group 'b' cannot be measured")
    ok = run_checks(dataclasses.replace(report, metrics=_metrics(Y), group_drop={"a": 0.0, "b": 0.0}),
                    Thresholds(min_worst_group_acc=10, max_group_drop=5))
    assert all(c.passed for c in ok)


def test_a_group_without_a_value_is_null_in_the_json_and_left_out_of_the_largest_drop():
    """docs/validation.md: report.json has NaN -> null; the largest drop is over the measured groups,
    whatever order the groups come in."""
    m = _metrics(Y)
    m = dataclasses.replace(m, by_group={"a": dict(m.by_group["a"]), "b": {**m.by_group["b"], "accuracy": float("nan")}})
    nan = float("nan")
    for drops in ({"a": 0.1, "b": nan}, {"b": nan, "a": 0.1}):
        report = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, reference_metrics=m,
                                  group_drop=drops, kernel_deviation_by_group={"b": nan, "a": 0.0},
                                  kernel_deviation=nan, agreement=1.0)
        assert report.max_group_drop == ("a", 0.1)
        d = report.to_dict()
        json.dumps(d, allow_nan=False)  # raised "Out of range float values are not JSON compliant: nan"
        assert d["reference"]["group_drop"] == {"a": 0.1, "b": None} and d["reference"]["max_group_drop"] == ["a", 0.1]
        assert d["kernel"]["kernel_deviation_by_group"] == {"b": None, "a": 0.0} and d["kernel"]["kernel_deviation"] is None
        assert d["targets"]["native"]["kernel_deviation_by_group"] == {"b": None, "a": 0.0}
    assert measured_max({"b": nan, "a": 0.1, "c": -0.2}) == ("a", 0.1) == measured_max({"a": 0.1, "b": nan})
    assert measured_max({"b": nan}) is None and not_measured({"a": 0.1, "b": nan}) == ["b"]
    everything_unmeasured = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m,
                                             group_drop={"b": nan})
    assert everything_unmeasured.max_group_drop is None and everything_unmeasured.to_dict()["reference"][
        "max_group_drop"] is None
    # the gate: the drop and kernel-deviation checks fail naming the group, in any order
    for dev in ({"b": nan, "a": 0.0}, {"a": 0.0, "b": nan}):
        view = dataclasses.replace(report, kernel_deviation_by_group=dev)
        checks = {c.name: c for c in run_checks(view, Thresholds(max_group_drop=50, max_kernel_deviation=50))}
        for name in ("max_group_drop", "max_kernel_deviation"):
            assert not checks[name].passed and checks[name].group == "b", name


def _lat(bs, p50):
    return LatencyResult(p50_ms=p50, p95_ms=p50, mean_ms=p50, throughput_per_s=bs / p50 * 1e3, batch_size=bs,
                         threads=2, warmup=1, repeats=5)


def test_speed_verdict_says_whether_the_file_buys_speed_or_only_size():
    m = _metrics([0, 1, 0, 1, 0, 1, 0, 1])
    base = dict(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, cpu_isa="x86-avx2",
                size_bytes=1000, reference_size_bytes=4000)
    assert ValidationReport(**base, latency=(_lat(1, 1.0),)).speed_verdict() is None  # no reference timed
    r = ValidationReport(**base, latency=(_lat(1, 0.126), _lat(32, 2.0)), reference_latency=(_lat(1, 0.120), _lat(32, 3.5)))
    assert r.speedups() == pytest.approx({1: 0.120 / 0.126, 32: 1.75})
    assert r.speed_verdict() == ("on this CPU (x86-avx2) the file buys speed and size at batch 32: batch 1: 0.95x the "
                                 "reference's speed (same speed); batch 32: 1.75x the reference's speed (faster)")
    slow = ValidationReport(**base, latency=(_lat(1, 1.5),), reference_latency=(_lat(1, 1.0),))
    assert slow.speed_verdict() == ("on this CPU (x86-avx2) the file buys size only, no speed: batch 1: 0.67x the "
                                    "reference's speed (slower)")
    assert slow.to_dict()["speedup_vs_reference"] == {"1": pytest.approx(1 / 1.5)}
    # a reference with a fixed batch of 1: the model's batch 8 is not compared, and the verdict says so
    part = ValidationReport(**base, latency=(_lat(8, 2.0), _lat(1, 0.5)), reference_latency=(_lat(1, 1.0),))
    assert part.speedups() == {1: 2.0}
    assert part.speed_verdict() == ("on this CPU (x86-avx2) the file buys speed and size at batch 1: batch 1: 2.00x "
                                    "the reference's speed (faster); " + MSG_NOT_COMPARED.format(
                                        batches="8", noun="the reference", theirs="1"))
    assert MSG_NOT_COMPARED.format(batches="8", noun="the reference", theirs="1") == (
        "batch 8: not compared (the reference runs batch 1 only: a fixed batch)")


def test_report_md_latency_table_shows_the_verdicts_speed_up():
    """survey 77: the table's speed-up was the p50 ratio (2.00x here) beside a verdict of the median
    of paired ratios (1.50x): two figures for one thing, on either side of 1.10x under load."""
    from fqexport.validation.reports import to_markdown

    m = _metrics([0, 1, 0, 1, 0, 1, 0, 1])
    mine = dataclasses.replace(_lat(1, 1.0), speedup=1.5)
    r = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, cpu_isa="x86-avx2",
                         latency=(mine,), reference_latency=(_lat(1, 2.0),))
    row = next(line for line in to_markdown(r).splitlines() if line.startswith("| 1 | 1.000 |"))
    assert row.endswith("| 2.000 | 1.50x |")
    assert "batch 1: 1.50x the reference's speed (faster)" in to_markdown(r)
