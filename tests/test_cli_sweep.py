"""``fqexport sweep``: Pareto report files, table and input errors."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import run_main
from fqexport.cli.flags.shared import MSG_ONLY_WITH
from fqexport.cli.main import build_parser
from fqexport.errors import ConfigError


def _sweep_args(files, out_dir, *extra):
    return ["-q", "sweep", "--model", "fixtures_models:tiny_mlp", "--weights", files / "mlp.pt",
            "--calib", files / "calib.npz", "--out-dir", out_dir, "--num-calib", "200",
            "--bit-choices", "2,4,8", "--candidates", "1", "--method", "rtn", *extra]


def test_sweep_writes_the_pareto_report(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", "2.5,6",
                                         "--test", mlp_files / "calib.npz"))
    assert code == 0, err
    points = json.loads((tmp_path / "p" / "pareto.json").read_text())
    assert [p["budget"] for p in points] == [2.5, 6.0]
    assert points[0]["avg_bits"] <= 2.5 and points[1]["avg_bits"] <= 6.0
    assert all(0.0 <= p["worst_group_acc"] <= p["float_worst_group_acc"] + 0.2 for p in points)
    rows = list(csv.DictReader((tmp_path / "p" / "pareto.csv").open()))
    assert [float(r["budget"]) for r in rows] == [2.5, 6.0]
    assert "Pareto sweep (worst-group), accuracies on" in stdout and points[0]["metric"] == "accuracy"
    assert f"{100 * points[1]['worst_group_acc']:.2f}" in stdout
    assert "pareto.json" in stdout and "pareto.csv" in stdout


@pytest.mark.parametrize("budgets, message", [
    ("2.5,x", "--budgets '2.5,x': expected stored bits per weight"),
    ("3,40", "--budgets '3,40': budget_bits=40.0 must be in \\[2, 32\\]"),  # named by its flag (survey 57)
    ("1.5,3", "--budgets '1.5,3': budget_bits=1.5 must be in \\[2, 32\\]"),
    (",", "--budgets ',': expected stored bits per weight"),
])
def test_sweep_rejects_bad_budgets_before_searching(tmp_path, mlp_files, tests_dir, monkeypatch, budgets, message):
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", budgets))
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "p").exists()


def test_each_budget_is_searched_once(caplog):
    """``--budgets 3,3`` searched budget 3 twice and wrote two identical rows (survey 57)."""
    from fqexport.cli.flags.sweep import parse_budgets

    with caplog.at_level("WARNING"):
        assert parse_budgets("3,2.5,3,3.0") == [3.0, 2.5]
    assert "--budgets '3,2.5,3,3.0': each budget is searched once (3,2.5)" in caplog.text
    assert parse_budgets("3,4,") == [3.0, 4.0]  # a trailing comma
    # survey 99: an empty entry (an unset variable: `--budgets 3,$B,4`) was dropped silently
    with pytest.raises(ConfigError, match=r"an empty entry between commas"):
        parse_budgets("3,,4")


def test_sweep_skips_an_infeasible_budget_and_reports_it(tmp_path, mlp_files, tests_dir, monkeypatch):
    # 2 stored bits per weight is below the smallest allocation (every layer at 2 bits + its scales):
    # that budget is reported as infeasible with the minimum, the feasible one runs
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", "2.5,2"))
    assert code == 0, err
    points = json.loads((tmp_path / "p" / "pareto.json").read_text(), parse_constant=pytest.fail)
    assert [(p["budget"], p["status"]) for p in points] == [(2.0, "infeasible"), (2.5, "ok")]
    minimum = points[0]["min_feasible_budget"]
    assert 2.0 < minimum <= points[1]["stored_bits"] + 1e-4 <= 2.5 + 1e-4
    assert points[0]["avg_bits"] is None and points[0]["worst_group_acc"] is None and points[0]["bits"] == {}
    assert points[1]["min_feasible_budget"] == minimum and points[1]["worst_group_acc"] is not None
    rows = list(csv.DictReader((tmp_path / "p" / "pareto.csv").open()))
    assert [(r["budget"], r["status"], r["min_feasible_budget"]) for r in rows] == [
        ("2.0", "infeasible", str(minimum)), ("2.5", "ok", str(minimum))]
    assert rows[0]["avg_bits"] == rows[0]["worst_group_acc"] == rows[0]["bits"] == ""
    assert re.search(rf"^2 +infeasible +- +needs a budget >= {minimum:g} ", stdout, re.MULTILINE), stdout
    assert re.search(r"^2\.5 +\d\.\d{3} ", stdout, re.MULTILINE), stdout
    assert (f"note: budget 2 skipped: below the minimum feasible budget {minimum:g} stored bits per weight"
            in stdout)
    assert "pareto.json" in stdout and "pareto.csv" in stdout


def test_sweep_with_no_feasible_budget_exits_2_naming_the_minimum(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    code, _, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", "2,2.1"))
    assert code == 2
    m = re.search(r"no budget of 2, 2\.1 can be met: the smallest allocation \(every free layer at 2 bits, pinned "
                  r"layers at their widths\) stores ([\d.]+) bits per weight, the minimum feasible budget; give "
                  r"budgets of at least ([\d.]+)", err)
    assert m and m.group(1) == m.group(2) and float(m.group(1)) > 2.1, err
    assert not (tmp_path / "p").exists()


WORKERS_NEED = "--engine local or auto, or --engine ray without --ray-address (a running cluster has its own CPUs)"


@pytest.mark.parametrize("extra, flags, needs", [
    (("--engine", "serial", "--workers", "2"), "--workers", WORKERS_NEED),
    (("--engine", "ray", "--ray-address", "auto", "--workers", "2"), "--workers", WORKERS_NEED),
    (("--engine", "local", "--task-cpus", "2"), "--task-cpus", "--engine ray"),
    (("--task-gpus", "1"), "--task-gpus", "--engine ray"),
    (("--percentile", "90"), "--percentile", "--calibration percentile"),
])
def test_sweep_refuses_flags_that_would_be_ignored_before_searching(tmp_path, mlp_files, extra, flags, needs):
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", "3,4", *extra))
    assert code == 2 and stdout == "" and not (tmp_path / "p").exists()
    assert err.strip() == f"error: {MSG_ONLY_WITH.format(flags=flags, needs=needs)}"


@pytest.mark.parametrize("extra", [
    ("--workers", "2"), ("--engine", "local", "--workers", "2"), ("--engine", "ray", "--task-cpus", "2"),
    ("--calibration", "percentile", "--percentile", "99.9"),
])
def test_sweep_flags_that_count_pass_the_checks(tmp_path, extra):
    args = build_parser().parse_args(["sweep", "--model", "m:f", "--calib", "c.npz", "--out-dir", str(tmp_path / "p"),
                                      "--budgets", "3,4", *extra])
    args.check(args)  # no ConfigError


def test_test_data_that_does_not_fit_the_model_is_refused_before_searching(tmp_path, mlp_files, tests_dir, monkeypatch):
    """--test with 5 features for a model of more: "internal error", exit 3, after every search (survey 25)."""
    import numpy as np

    monkeypatch.chdir(tests_dir)
    calib = np.load(mlp_files / "calib.npz")
    np.savez(tmp_path / "narrow.npz", x=calib["x"][:, :5], y=calib["y"], group=calib["group"])
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", "3,4", "--test",
                                             tmp_path / "narrow.npz"))
    assert code == 2 and not (tmp_path / "p").exists() and "mixed precision" not in stdout
    assert err.startswith(f"error: {tmp_path / 'narrow.npz'}: field 'x' with sample shape (5,) does not fit the model")


def test_a_point_reusing_a_smaller_budgets_result_is_marked_in_the_table(tmp_path, monkeypatch, capsys):
    """survey 99: the sweep's 4.5 row was budget 3's result (it measured better on the held-out samples),
    while `compress --budget-bits 4.5` wrote another allocation; only pareto.json said so."""
    import argparse

    import fqexport.cli.sweep as sweep_cli
    from fqexport.search.pareto import ParetoPoint

    points = [ParetoPoint(3.0, 2.0, 1000, "b", 0.5, 0.7, 0.6, 0.8, {"fc": 2}, 2.2, 0.01),
              ParetoPoint(4.5, 2.0, 1000, "b", 0.5, 0.7, 0.6, 0.8, {"fc": 2}, 2.2, 0.01, 3.0)]
    assert sweep_cli._row(points[1])["budget"] == "4.5 (= 3)" and sweep_cli._row(points[0])["budget"] == "3"
    monkeypatch.setattr(sweep_cli, "pareto_sweep", lambda *a, **k: points)
    monkeypatch.setattr(sweep_cli, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(sweep_cli, "quant_config", lambda args: None)
    monkeypatch.setattr(sweep_cli, "search_config", lambda args, budget_bits: argparse.Namespace(objective="worst-group"))
    monkeypatch.setattr(sweep_cli, "task_of", lambda args: None)
    args = argparse.Namespace(budgets="3,4.5", test=None, model="m", weights=None, trust_pickle=False, decode=None,
                              calib="c.npz", quiet=True, out_dir=str(tmp_path))
    assert sweep_cli.run_sweep(args) == 0
    out = capsys.readouterr().out
    assert "note: budget 4.5 repeats budget 3's result (it measured better by the objective on the held-out " in out
