"""``fqexport sweep``: Pareto report files, table and input errors."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import run_main


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
    assert "Pareto sweep (worst-group), accuracies on" in stdout
    assert f"{100 * points[1]['worst_group_acc']:.2f}" in stdout
    assert "pareto.json" in stdout and "pareto.csv" in stdout


@pytest.mark.parametrize("budgets, message", [
    ("2.5,x", "--budgets '2.5,x': expected stored bits per weight"),
    ("3,9", "budget_bits=9.0 must be in \\[2, 8\\]"),
    (",", "--budgets ',': expected stored bits per weight"),
])
def test_sweep_rejects_bad_budgets_before_searching(tmp_path, mlp_files, tests_dir, monkeypatch, budgets, message):
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_sweep_args(mlp_files, tmp_path / "p", "--budgets", budgets))
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "p").exists()
