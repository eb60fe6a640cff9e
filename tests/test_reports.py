"""Tests of fqexport/validation/reports.py on a hand-built ValidationReport (no ONNX Runtime needed)."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from fqexport.metrics.group_metrics import group_metrics
from fqexport.validation.checks import run_checks, target_checks
from fqexport.validation.latency import LatencyResult
from fqexport.validation.reports import (
    markdown_table,
    md_text,
    percent_text,
    remove_stale_plots,
    to_markdown,
    write_json,
    write_junit,
    write_markdown,
    write_plots,
    xml_text,
)
from fqexport.validation.thresholds import Thresholds
from fqexport.validation.validation_report import ValidationReport


@pytest.fixture()
def report():
    # group a: 4/4 right, group b: 2/4 right (model); reference right everywhere
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    logits = np.eye(2)[pred] * 3.0
    m = group_metrics(logits, y, group, ("a", "b"))
    ref = group_metrics(np.eye(2)[y] * 3.0, y, group, ("a", "b"))
    lat = LatencyResult(1.0, 2.0, 1.2, 833.3, 1, 2, 5, 30)
    base = ValidationReport(
        model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, reference="f.onnx",
        reference_metrics=ref, group_drop={"a": 0.0, "b": 0.5}, agreement=0.75,
        unoptimized_metrics=m, kernel_deviation=0.0, kernel_deviation_by_group={"a": 0.0, "b": 0.0},
        kernel_agreement=1.0, fused_kernels={"QLinearConv": 2, "Conv": 0}, float_fallbacks=(),
        latency=(lat,), size_bytes=2_000_000, avg_weight_bits=8.0, bops=64.0, pepr=0.6, pepr_worst_group=0.4,
    )
    t = Thresholds(min_worst_group_acc=80, max_group_drop=10, max_latency_ms=5, max_size_mb=3)
    import dataclasses

    return dataclasses.replace(base, thresholds=t, checks=run_checks(base, t))


def test_json_holds_all_metrics(report, tmp_path):
    p = write_json(report, tmp_path / "r" / "report.json")
    d = json.loads(p.read_text())
    assert d["passed"] is False
    assert d["metrics"]["by_group"]["b"]["accuracy"] == 0.5
    assert d["reference"]["max_group_drop"] == ["b", 0.5]
    assert d["latency"][0]["p95_ms"] == 2.0 and d["size_bytes"] == 2_000_000
    assert [c["name"] for c in d["checks"] if not c["passed"]] == ["min_worst_group_acc", "max_group_drop"]
    assert list(tmp_path.joinpath("r").iterdir()) == [p]  # no temp file left behind


def test_markdown_has_percent_table_and_check_results(report, tmp_path):
    text = write_markdown(report, tmp_path / "report.md").read_text()
    assert text.startswith("# fqexport validation: FAIL")
    assert "| b | 4 | 50.00 |" in text and "| a | 4 | 100.00 |" in text
    assert "| min_worst_group_acc | 80 | 50.000 | b | **FAIL** |" in text
    assert "| max_size_mb | 3 | 2.000 |  | PASS |" in text
    assert "- FAIL: accuracy drop vs reference (group 'b') 50.00 pp exceeds --max-group-drop 10" in text


def test_junit_parses_with_one_case_per_check(report, tmp_path):
    root = ET.parse(write_junit(report, tmp_path / "junit.xml")).getroot()
    assert root.tag == "testsuite" and root.get("tests") == "4" and root.get("failures") == "2"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"min_worst_group_acc", "max_group_drop", "max_latency_ms[batch=1]", "max_size_mb"}
    fail = cases["min_worst_group_acc"].find("failure")
    assert fail is not None and "(group 'b') 50.00 % below --min-worst-group-acc 80" in fail.get("message")
    assert cases["max_size_mb"].find("failure") is None


def _named_groups_report(names):
    """The fixture's numbers with other group names (worst group second)."""
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    m = group_metrics(np.eye(2)[np.array([0, 1, 0, 1, 1, 0, 0, 1])] * 3.0, y, group, names)
    t = Thresholds(min_worst_group_acc=80)
    base = ValidationReport(model="m.onnx", data_source="t.npz", provider="cpu", metrics=m, thresholds=t)
    return dataclasses.replace(base, checks=run_checks(base, t))


def test_group_names_with_pipes_and_line_breaks_keep_the_markdown_table(tmp_path):
    r = _named_groups_report(("age|65+", "rural\nnorth"))
    text = write_markdown(r, tmp_path / "report.md").read_text()
    table = text.split("## Per group\n\n")[1].split("\n\n")[0].splitlines()  # header, rule, groups, overall
    assert len(table) == 5
    assert len({len(line.replace("\\|", "").split("|")) for line in table}) == 1  # one column count
    # a line break is written \n: a space would read as another group, "rural north" (survey 29)
    assert "| age\\|65+ | 4 | 100.00 |" in text and "| rural\\nnorth | 4 | 50.00 |" in text
    assert "- worst group: **rural\\nnorth** 50.00 %" in text
    assert "| min_worst_group_acc | 80 | 50.000 | rural\\nnorth | **FAIL** |" in text
    assert md_text("a|b\r\nc\rd") == "a\\|b\\r\\nc\\rd"


def test_group_names_are_literal_text_in_the_markdown_report():
    """Names were live Markdown/HTML: <b>&amp; rendered as "&", *x* in italics, [a](b) a link (survey 29)."""
    assert md_text("<b>&amp;") == "&lt;b&gt;&amp;amp;"
    assert md_text("*star* [link](x) `code` a_b \\") == "\\*star\\* \\[link\\](x) \\`code\\` a\\_b \\\\"
    assert markdown_table([{"group": "a|b", "n": 1}]) == "| group | n |\n|---|---|\n| a\\|b | 1 |\n"


def test_group_names_with_edge_spaces_or_control_characters_read_apart_in_report_md_and_the_console(tmp_path):
    """'trailing' and 'trailing ' were two rows both reading 'trailing' (Markdown trims cells, the
    console pads them); an ESC in a name ran in `cat report.md` (survey 52)."""
    from fqexport.cli.common import cell_text

    r = _named_groups_report(("trailing", "trailing "))
    text = write_markdown(r, tmp_path / "report.md").read_text()
    assert "| trailing | 4 |" in text and "| 'trailing ' | 4 |" in text
    assert md_text("\x1b[1mbold\x0b") == "\\x1b\\[1mbold\\x0b" and "\x1b" not in md_text("\x1b")
    assert [cell_text(v) for v in ("trailing ", " lead", "a b", "tab\t", 3.5)] == [
        "'trailing '", "' lead'", "a b", "tab\\t", "3.5"]


def test_a_group_without_a_value_is_null_in_report_json_and_named_in_report_md(report, tmp_path):
    nan = float("nan")
    by_group = {"a": dict(report.metrics.by_group["a"]), "b": {**report.metrics.by_group["b"], "accuracy": nan}}
    unmeasured = dataclasses.replace(report, metrics=dataclasses.replace(report.metrics, by_group=by_group),
                                     group_drop={"b": nan, "a": 0.0})
    d = json.loads(write_json(unmeasured, tmp_path / "report.json").read_text())
    assert d["reference"]["group_drop"] == {"b": None, "a": 0.0} and d["reference"]["max_group_drop"] == ["a", 0.0]
    text = write_markdown(unmeasured, tmp_path / "report.md").read_text()
    assert "- largest drop vs reference: 0.00 pp (group a) (without b: not measured)" in text
    none = dataclasses.replace(unmeasured, group_drop={"a": nan, "b": nan})
    assert "- largest drop vs reference: n/a (without a, b: not measured)" in to_markdown(none)


def test_group_names_with_control_characters_keep_the_junit_well_formed(tmp_path):
    r = _named_groups_report(("a", "\x1b[1mrural\x07"))
    root = ET.parse(write_junit(r, tmp_path / "junit.xml")).getroot()
    fail = root.find("testcase/failure")
    assert "(group '\\x1b[1mrural\\x07') 50.00 % below --min-worst-group-acc 80" in fail.get("message")
    assert fail.text.endswith("group \\x1b[1mrural\\x07")
    assert xml_text("tab\tnl\nok\x00\ufffe\U0001f600") == "tab\tnl\nok\\x00\\ufffe\U0001f600"


def test_plots_written_as_png(report, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    paths = write_plots(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["group_accuracy.png", "latency.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dollar_signs_in_group_names_draw_as_text_and_a_failed_figure_is_a_warning(tmp_path, monkeypatch, caplog):
    """A group 'cost $5_$10' raised matplotlib's mathtext ParseException: exit 3 after report.json
    said PASS (survey 52). Names are escaped; any figure failure is a warning, the verdict stands."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    from fqexport.validation import reports

    r = _named_groups_report(("cost $5_$10", "income $25k-$50k"))
    assert [p.name for p in write_plots(r, tmp_path / "p")] == ["group_accuracy.png"]

    def broken(*args):
        raise ValueError("a figure bug")

    monkeypatch.setattr(reports, "_draw_plots", broken)
    with caplog.at_level("WARNING", logger="fqexport.validation.reports"):
        assert write_plots(r, tmp_path / "q") == []
    assert f"the plots in {tmp_path / 'q'} were not drawn (ValueError: a figure bug)" in caplog.text


def test_stale_plots_of_an_earlier_run_are_removed_and_nothing_else(tmp_path):
    for name in ("group_accuracy.png", "latency.png", "mine.png"):
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "sub").mkdir()
    assert remove_stale_plots(tmp_path, [tmp_path / "group_accuracy.png"]) == [tmp_path / "latency.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group_accuracy.png", "mine.png", "sub"]
    assert remove_stale_plots(tmp_path, []) == [tmp_path / "group_accuracy.png"]  # --no-plots
    assert remove_stale_plots(tmp_path / "sub", []) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "sub"]


def test_plots_skipped_without_matplotlib(report, tmp_path, monkeypatch, caplog):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with caplog.at_level("INFO"):
        assert write_plots(report, tmp_path / "p") == []
    assert "matplotlib is not installed" in caplog.text


@pytest.fixture()
def target_report(report):
    """``report`` with an emulated x86-avx2 target that loses group b entirely."""
    import dataclasses

    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 1, 0])  # b: 0/4
    avx2 = group_metrics(np.eye(2)[pred] * 3.0, y, group, ("a", "b"))
    r = dataclasses.replace(report, cpu_isa="x86-avx512-vnni+amx", targets=("native", "x86-avx2"),
                            target_metrics={"x86-avx2": avx2},
                            target_kernel_deviation_by_group={"x86-avx2": {"a": 0.0, "b": 1.0}},
                            target_agreement={"x86-avx2": 0.875})
    return dataclasses.replace(r, checks=run_checks(r, r.thresholds) + target_checks(r, r.thresholds))


def test_every_report_names_the_cpu_instruction_set(target_report, tmp_path):
    d = json.loads(write_json(target_report, tmp_path / "r.json").read_text())
    assert d["cpu_isa"] == "x86-avx512-vnni+amx" and d["cpu_kernel_family"] == "x86-vnni"
    assert d["targets"]["x86-avx2"] == {
        "emulated": True, "emulated_nodes": None, "native_nodes": [], "metrics": d["targets"]["x86-avx2"]["metrics"],
        "kernel_deviation_by_group": {"a": 0.0, "b": 1.0}, "agreement_with_native": 0.875}
    assert d["targets"]["x86-avx2"]["metrics"]["by_group"]["b"]["accuracy"] == 0.0
    text = write_markdown(target_report, tmp_path / "r.md").read_text()
    assert "- provider: cpu; CPU instruction set: x86-avx512-vnni+amx (int8 kernel family x86-vnni)" in text
    assert "Measured on x86-avx512-vnni+amx (int8 kernel family x86-vnni)." in text  # latency
    assert "| native (x86-avx512-vnni+amx) | b | 50.00 | 0.00 | 100.00 |" in text
    assert "| x86-avx2 (emulated) | b | 0.00 | 100.00 | 87.50 |" in text
    props = {p.get("name"): p.get("value")
             for p in ET.parse(write_junit(target_report, tmp_path / "j.xml")).getroot().iter("property")}
    assert props["cpu_isa"] == "x86-avx512-vnni+amx" and props["targets"] == "native,x86-avx2"


def test_emulated_target_checks_gate_with_their_own_names(target_report, tmp_path):
    root = ET.parse(write_junit(target_report, tmp_path / "j.xml")).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    # latency and size are native-only; accuracy limits repeat per target
    assert set(cases) == {"min_worst_group_acc", "max_group_drop", "max_latency_ms[batch=1]", "max_size_mb",
                          "min_worst_group_acc[target=x86-avx2]", "max_group_drop[target=x86-avx2]"}
    fail = cases["max_group_drop[target=x86-avx2]"].find("failure")
    assert fail.get("message") == "x86-avx2: accuracy drop vs reference (group 'b') 100.00 pp exceeds --max-group-drop 10"


def test_group_names_with_control_characters_are_escaped_on_the_console(capsys):
    """A newline or a terminal escape in a group name would break the console table (or the
    terminal): shown with escapes, as every console table shows them (cli.common.cell_text)."""
    from fqexport.cli.validate import print_summary

    print_summary(_named_groups_report(("age 65+", "\x1b[1mrural\nnorth")))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "rural\nnorth" not in out
    rows = [line for line in out.splitlines() if line.startswith(("age 65+", "\\x1b[1mrural\\nnorth"))]
    assert len(rows) == 2 and "worst group \\x1b[1mrural\\nnorth: 50.00 %" in out


def test_percent_text_never_shows_a_negative_zero():
    # survey 62: a drop of -0.00001 printed as "-0.00" in the console and the reports
    assert percent_text(-0.00001) == "0.00" and f"{percent_text(-0.00001):>7}" == "   0.00"
    assert percent_text(-0.0123) == "-1.23" and percent_text(0.85123) == "85.12"
    assert percent_text(None) == "n/a" and f"{percent_text(float('nan')):>5}" == "  n/a"
