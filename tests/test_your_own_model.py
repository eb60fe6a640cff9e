"""docs/your-own-model.md, run: every ``python`` block in order in one namespace, in a fresh
folder, then the ``$ fqexport`` line of its ``console`` block through the CLI — the page and the
code cannot drift."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-own-model.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text(encoding="utf-8")) if lang == kind]


def test_the_page_has_the_walkthrough_blocks():
    assert len(_blocks("python")) == 6
    assert [line for b in _blocks("console") for line in b.splitlines() if line.startswith("$ ")] == [
        "$ fqexport validate own-data/model_w8.onnx --data own-data/test.npz --reference own-data/float.onnx "
        "--max-group-drop 5 --no-latency"]


def test_the_walkthrough_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("PIL")
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    namespace: dict = {"__name__": "your_own_model"}
    for k, block in enumerate(_blocks("python")):
        exec(compile(block, f"{DOC.name} python block {k + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    report, calib = namespace["report"], namespace["calib"]
    assert repr(calib) in printed and "| group | n | accuracy % |" in printed
    assert calib.group_names == ("dark", "light") and len(calib) == 240 and calib.y is not None
    assert set(report.metrics.by_group) == {"dark", "light"} and report.metrics.by_group["dark"]["count"] == 40
    assert report.passed and report.reference_metrics.group_min("accuracy")[1] >= 0.9
    for line in [l for b in _blocks("console") for l in b.splitlines() if l.startswith("$ fqexport ")]:
        args = shlex.split(line)[2:]
        res = subprocess.run([sys.executable, "-m", "fqexport.cli", *args], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "unopt %" in res.stdout and "k.dev" in res.stdout and "dark" in res.stdout
        # the page shows what validate prints of the kernels (the first line is this CPU's family's)
        kernels = next(l for l in res.stdout.splitlines() if l.startswith("kernels: "))
        if "on x86-avx2)" in kernels:
            assert kernels in _blocks("text")[-1]
        assert ("float Conv/Gemm/MatMul" in res.stdout) == ("float Conv/Gemm/MatMul" in _blocks("text")[-1])
    assert time.perf_counter() - t0 < 120  # the page promises well under a minute on an idle machine
