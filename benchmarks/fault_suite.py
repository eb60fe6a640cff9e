"""Fault suite of issue 14: hostile inputs and bad output paths against the real CLI.

Runs every case through ``fqexport.cli.main`` in this process (one import) and counts: clear
errors (exit 2, one ``error:`` line), tracebacks, wrong exit codes, partial/new files left,
unsafe behaviours (a payload marker file created). Then times one output-path error of
``fqexport demo`` in a fresh subprocess (import included).

    python benchmarks/fault_suite.py
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fixtures_models as fm  # noqa: E402
import safety_helpers as sh  # noqa: E402
import torch  # noqa: E402

from fqexport.cli import main  # noqa: E402


def run(argv, cwd):
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    import os
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.chdir(old)
    return code, err.getvalue()


def cases(d: Path):
    marker = d / "PWNED"
    sh.save_clean_pt2(fm.tiny_mlp(), torch.randn(2, fm.MLP_FEATURES), d / "clean.pt2")
    sh.pickled_weight_pt2(d / "clean.pt2", d / "evil.pt2", marker)
    sh.rewrite_pt2(d / "clean.pt2", d / "evil_inputs.pt2",
                   lambda rel, data: sh.pickled_payload(marker) if rel and rel.startswith("data/sample_inputs/") else (
                       {} if rel is None else data))
    (d / "evil.pt").write_bytes(sh.pickled_payload(marker))
    sh.huge_header_npz(d / "huge.npz")
    sh.tiny_onnx(d / "scalar.onnx", scalar_output=True)
    (d / "bad.pt2").write_bytes(b"not a zip")
    (d / "text.npz").write_text("hello")
    c = sh.compress_args
    v = ["validate", "model.onnx", "--data", "calib.npz", "--no-latency", "--no-kernel-check"]
    return [
        ("pt2 pickled weight", ["compress", "--model", "evil.pt2", "--calib", "calib.npz", "--out", "o.onnx"]),
        ("pt2 pickled sample inputs", ["analyze", "--model", "evil_inputs.pt2", "--data", "calib.npz"]),
        ("pt2 not a zip", ["analyze", "--model", "bad.pt2", "--data", "calib.npz"]),
        ("pickled state_dict", ["compress", "--model", "fixtures_models:tiny_mlp", "--weights", "evil.pt",
                                "--calib", "calib.npz", "--out", "o.onnx"]),
        ("pickled module w/o trust", ["analyze", "--model", "evil.pt", "--data", "calib.npz"]),
        ("npz 10^12 rows", c("--out", "o.onnx", "--calib", "huge.npz")),
        ("npz not a zip", c("--out", "o.onnx", "--calib", "text.npz")),
        ("scalar-output onnx", ["validate", "scalar.onnx", "--data", "calib.npz", "--no-latency", "--no-kernel-check"]),
        ("--out = --calib", c("--out", "calib.npz")),
        ("--out = --weights", c("--out", "mlp.pt")),
        ("--report = --out", c("--out", "o.onnx", "--report", "o.onnx")),
        ("--junit = model", [*v, "--junit", "model.onnx"]),
        ("analyze --json = --data", ["analyze", "--model", "fixtures_models:tiny_mlp", "--data", "calib.npz",
                                     "--json", "calib.npz"]),
        ("sweep --out-dir under file", ["sweep", "--model", "fixtures_models:tiny_mlp", "--calib", "calib.npz",
                                        "--budgets", "4", "--out-dir", "calib.npz/p"]),
        ("--out /proc", c("--out", "/proc/o.onnx")),
        ("--out /dev/null", c("--out", "/dev/null")),
        ("--out existing dir", c("--out", ".")),
        ("--out missing folder", c("--out", "nope/o.onnx")),
        ("--out under a file", c("--out", "calib.npz/o.onnx")),
        ("--json under a file", ["analyze", "--model", "fixtures_models:tiny_mlp", "--data", "calib.npz",
                                 "--json", "mlp.pt/a.json"]),
        ("--report-dir under a file", [*v, "--report-dir", "mlp.pt/r"]),
        ("unknown flag", ["validate", "model.onnx", "--data", "calib.npz", "--nope"]),
    ], marker


def main_suite() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = sh.make_inputs(Path(tmp))
        todo, marker = cases(d)
        before = sh.snapshot(d)
        tally = {"tried": 0, "clear exit 2": 0, "tracebacks": 0, "wrong exit code": 0, "files left/changed": 0,
                 "unsafe": 0}
        for name, argv in todo:
            code, err = run(argv, d)
            tally["tried"] += 1
            first = sh.first_line(err)
            ok = code == 2 and (first.startswith("error:") or first.startswith("usage:"))
            tally["clear exit 2"] += ok
            tally["tracebacks"] += "Traceback" in err
            tally["wrong exit code"] += code != 2
            after = sh.snapshot(d)
            changed = after != before
            tally["files left/changed"] += changed
            tally["unsafe"] += marker.exists()
            print(f"{'ok ' if ok and not changed else 'BAD'} {code} {name:28s} {first[:110]}")
            marker.unlink(missing_ok=True)
            for extra in set(after) - set(before):
                (d / extra).unlink()
        print(json.dumps(tally))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fqexport.cli", "demo", "--out-dir", "calib.npz"], cwd=d,
                              env=sh.cli_env(), capture_output=True, text=True)
        print(f"demo output-path error: exit {proc.returncode} after {time.perf_counter() - start:.1f} s: "
              f"{sh.first_line(proc.stderr)}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fqexport.cli.main"], env=sh.cli_env(), check=True)
        print(f"(of which importing the CLI: {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main_suite()
