"""Start-up of the CLI: ``--help`` and every flag or path error come before any stage (torch,
onnx, onnxruntime) is imported, so they appear in well under a second; a subcommand imports
its stage only when it runs (``fqexport.cli.main.COMMANDS``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import onnx
import pytest
from safety_helpers import tiny_onnx

import fqexport.cli.demo as demo_cli
from fqexport.cli import main
from fqexport.cli.main import COMMANDS, command

HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "ml_dtypes")

# Run main(argv) in a fresh interpreter; print the exit code and the heavy modules it loaded.
SCRIPT = textwrap.dedent("""
    import sys
    from fqexport.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    print("EXIT", code, "LOADED", ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
""").format(heavy=HEAVY)

def _fresh(argv, cwd) -> tuple[str, str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return proc.stdout, proc.stderr

@pytest.mark.parametrize("argv, code, first_line", [
    (["--help"], 0, None),
    (["compress", "--help"], 0, None),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "missing/x.onnx"], 2,
     "error: --out missing/x.onnx: folder {cwd}/missing does not exist; create it first"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--weight-bits", "9"], 2,
     "error: --weight-bits: weight_bits=9 is not supported: weight bits must be an integer from 2 to 8"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--learn-bits"], 2,
     "error: --learn-bits is a fine-tuning option: add --finetune --train train.npz"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--objective", "mean"], 2,
     "error: --objective: options of the mixed-precision search"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--budget-bits", "3",
      "--objective-weights", "minority=2"], 2,
     "error: --objective-weights: group weights of --objective weighted, which --objective worst-group would "
     "ignore; add --objective weighted or drop them"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--budget-bits", "3",
      "--objective", "weighted", "--group-weights", "a=1,b=5"], 2,
     "error: --objective weighted needs --objective-weights NAME=W,... (one weight per group, e.g. "
     "minority=2,majority=1); --group-weights weights the Hessians, not the objective"),
    (["validate", "m.onnx", "--data", "d.npz", "--junit", "nowhere/j.xml"], 2,
     "error: --junit nowhere/j.xml: folder {cwd}/nowhere does not exist; create it first"),
    (["validate", "m.onnx", "--data", "d.npz", "--max-group-drop", "1"], 2,
     "error: --max-group-drop (max_group_drop) needs a reference model: pass --reference float.onnx"),
    (["validate", "m.onnx", "--data", "d.npz", "--max-latency-ms", "5", "--no-latency"], 2,
     "error: --max-latency-ms (max_latency_ms) needs latency measurement; do not disable it"),
    (["validate", "m.onnx", "--data", "d.npz", "--no-latency", "--repeats", "3", "--latency-batch-sizes", "1,4"], 2,
     "error: --latency-batch-sizes, --repeats: used only with latency measurement (without --no-latency), so they "
     "would be ignored here; use latency measurement (without --no-latency), or drop them"),
    (["validate", "m.onnx", "--data", "d.npz", "--warmup", "-3"], 2, None),
    (["validate", "m.onnx", "--data", "d.npz", "--latency-batch-sizes", ","], 2, None),
    (["sweep", "--model", "m:f", "--calib", "c.npz", "--out-dir", "o", "--budgets", "x"], 2,
     "error: --budgets 'x': expected stored bits per weight like 2.5,3,3.5,4"),
    (["sweep", "--model", "m:f", "--calib", "c.npz", "--out-dir", "o", "--budgets", "3", "--weight-bits", "4"], 2,
     "error: --weight-bits: a budget lets the search choose every layer's width"),  # hidden from sweep's --help
    (["analyze", "--model", "m:f", "--data", "d.npz", "--bits", "8", "9"], 2,
     "error: --bits=9 is not supported: weight bits must be an integer from 2 to 8"),
    (["demo", "--seed", "x"], 2, None),
    (["validate", "m.onnx", "--data", "d.npz", "--no-plots"], 2,
     "error: --no-plots: used only with --report-dir, so they would be ignored here; use --report-dir, or drop them"),
    (["analyze", "--model", "m:f", "--data", "d.npz", "--bits", "--method", "solver"], 2,
     "error: --method: used only with quantized variants (--bits with a width)"),
    (["analyze", "--model", "m:f", "--data", "d.npz", "--hessian-iters", "0", "--tol", "1e-6"], 2,
     "error: --tol: used only with the power iteration (--hessian-iters above 0)"),
    (["analyze", "--model", "m:f", "--data", "d.npz", "--tol", "-1"], 2, "error: --tol -1: must be a finite number > 0"),
    (["demo", "--layout", "v8"], 2, "error: --layout v8 is an option of --task detection (got --task classification)"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "x.onnx", "--layer-bits", "fc=2", "--layer-bits",
      "fc=8"], 2, "error: --layer-bits names 'fc' twice with different values (2 and 8); give it once"),
])
def test_help_and_flag_errors_load_no_stage(tmp_path, argv, code, first_line):
    _, err = _fresh(argv, tmp_path)
    status = err.strip().splitlines()[-1]
    assert status == f"EXIT {code} LOADED", err
    if first_line is not None:
        assert err.startswith(first_line.format(cwd=tmp_path)), err

def test_validate_reads_the_external_data_it_protects_without_loading_onnx(tmp_path):
    """The files an ONNX model's tensors name are inputs (docs/safety.md), read without onnx."""
    tiny_onnx(tmp_path / "m.onnx")
    onnx.save(onnx.load(str(tmp_path / "m.onnx")), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    _, err = _fresh(["validate", "m.onnx", "--data", "d.npz", "--junit", "weights.bin"], tmp_path)
    assert err.startswith("error: --junit weights.bin is the same file as model's external data weights.bin"), err
    assert err.strip().splitlines()[-1] == "EXIT 2 LOADED", err

def test_a_subcommand_imports_its_stage_when_it_runs(tmp_path):
    (tmp_path / "calib.npz").touch()
    _, err = _fresh(["compress", "--model", "nosuchpkg.models:f", "--calib", "calib.npz", "--out", "x.onnx"], tmp_path)
    assert "EXIT 2" in err and "torch" in err.strip().splitlines()[-1]

def test_commands_table_names_each_runner():
    assert set(COMMANDS) == {"compress", "validate", "analyze", "sweep", "demo"}
    for name in COMMANDS:
        assert callable(command(name)) and command(name).__name__.startswith("run_")

def test_a_runner_replaced_on_its_module_is_the_one_main_runs(monkeypatch, tmp_path):
    """The table is read when the command runs (tests and tools patch the runner's module)."""

    monkeypatch.setattr(demo_cli, "run_demo_command", lambda args: 0 if args.seed == 7 else 5)
    assert main(["demo", "--out-dir", str(tmp_path / "d"), "--seed", "7"]) == 0


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_sets_a_passive_openmp_wait_policy_before_torch_unless_the_user_chose(tmp_path, given, expected):
    """A spinning OpenMP pool starves on a shared CPU (README); the user's own setting wins."""
    (tmp_path / "calib.npz").touch()
    script = SCRIPT + textwrap.dedent("""
        import os, torch
        print("POLICY", os.environ.get("OMP_WAIT_POLICY"), file=sys.stderr)
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    proc = subprocess.run([sys.executable, "-c", script, "compress", "--model", "nosuchpkg.models:f", "--calib",
                           "calib.npz", "--out", "x.onnx"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert "EXIT 2" in proc.stderr and "torch" in proc.stderr  # torch came after the policy was set
    assert f"POLICY {expected}" in proc.stderr.splitlines()[-1]
