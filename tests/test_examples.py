"""The examples run (tiny sizes), and the CI workflow and CLI script cannot drift from the CLI:
every ``fqexport …`` command in them is parsed by the real ``fqexport.cli.build_parser``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import fqexport.cli as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable)
    env.update(extra)
    return env


# ------------------------------------------------------------------ a tiny structural YAML reader


def workflow_steps(text: str) -> list[dict[str, str]]:
    """Steps of a GitHub Actions job as flat dicts (keys: name, uses, run, if, with.<key>).

    Only what the workflow here uses: ``- name:`` items under ``steps:``, ``key: value`` and
    ``key: |`` block scalars, one ``with:`` level.
    """
    lines = text.splitlines()
    steps: list[dict[str, str]] = []
    in_steps, i = False, 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        if stripped == "steps:":
            in_steps, steps_indent = True, len(line) - len(line.lstrip())
            continue
        if not in_steps:
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= steps_indent:
            in_steps = False
            continue
        if stripped.startswith("- "):
            steps.append({})
            stripped = stripped[2:]
            indent += 2
        key, _, value = stripped.partition(":")
        value = value.strip()
        prefix = ""
        if key == "with" and not value:
            continue
        if indent > key_indent_of(steps[-1]):
            prefix = "with."
        if value in ("|", ">"):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # a quoted scalar
        steps[-1][prefix + key] = value
        steps[-1].setdefault("_indent", str(indent))
    for s in steps:
        s.pop("_indent", None)
    return steps


def key_indent_of(step: dict[str, str]) -> int:
    return int(step.get("_indent", "1000"))


def fqexport_commands(script: str, variables: dict[str, str]) -> list[list[str]]:
    """``fqexport`` invocations of a shell script (continuations joined, ``$VAR`` expanded)."""
    joined = script.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        for name, value in variables.items():
            line = line.replace(f'"${name}"', value).replace(f"${name}", value)
        line = line.split(" || ")[0]
        words = shlex.split(line, comments=True) if line else []
        if words and words[0] == "fqexport":
            commands.append(words[1:])
    return commands


# ------------------------------------------------------------------ the API example


@pytest.fixture(scope="module")
def api_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("api_example")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "api_example.py"), "--quick", "--out-dir", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_api_example_compresses_exports_and_validates(api_out):
    out, stdout = api_out
    for name in ("model.pt", "calib.npz", "test.npz", "float.onnx", "model_w8.onnx", "report.json"):
        assert (out / name).is_file(), name
    header = next(line for line in stdout.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "n", "float", "acc", "%", "W8A8", "acc", "%", "drop", "pp"]
    assert "top-1 agreement" in stdout and "worst group" in stdout
    report = json.loads((out / "report.json").read_text())
    groups = report["metrics"]["by_group"]
    assert set(groups) == {"majority", "inverted-contrast"}
    assert groups["majority"]["count"] + groups["inverted-contrast"]["count"] == 200


@pytest.mark.slow
def test_cli_example_runs_compress_and_the_gate(api_out):
    out, _ = api_out
    proc = subprocess.run(["bash", str(EXAMPLES / "cli_example.sh"), str(out)], cwd=ROOT,
                          env=_env(NUM_CALIB="64", ANALYZE="0"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "W8A8 gate: PASS" in proc.stdout
    assert re.search(r"W4A8 gate exit code: [01] ", proc.stdout)
    assert (out / "cli_w8.onnx").is_file() and (out / "cli_w4.onnx").is_file()
    cases = ET.parse(out / "cli_junit.xml").getroot().iter("testcase")
    assert {c.get("name") for c in cases} >= {"min_worst_group_acc", "max_acc_gap", "max_group_drop"}
    assert json.loads((out / "cli_report" / "report.json").read_text())["metrics"]["by_group"]


@pytest.mark.slow
def test_workflow_gate_command_passes_then_fails_on_a_stricter_limit(api_out, capsys):
    """The workflow's own validate command, on real files: exit 0, and 1 with a limit it breaks."""
    out, _ = api_out
    (out / "model_w8a8.onnx").write_bytes((out / "model_w8.onnx").read_bytes())
    steps = workflow_steps((EXAMPLES / "ci_workflow.yml").read_text())
    gate = next(s for s in steps if "fqexport validate" in s.get("run", ""))
    (argv,) = fqexport_commands(gate["run"], {"OUT": str(out)})
    assert cli.main(argv + ["--no-latency"]) == 0
    strict = [("99" if a == "5" and argv[i - 1] == "--min-worst-group-acc" else a) for i, a in enumerate(argv)]
    assert strict != argv
    assert cli.main(strict + ["--no-latency"]) == 1
    assert "FAIL min_worst_group_acc" in capsys.readouterr().out


# ------------------------------------------------------------------ the files stay in step with the CLI


def test_workflow_structure_and_commands_parse_with_the_real_cli():
    text = (EXAMPLES / "ci_workflow.yml").read_text()
    steps = workflow_steps(text)
    uses = [s.get("uses", "") for s in steps]
    assert uses[0].startswith("actions/checkout@") and uses[1].startswith("actions/setup-python@")
    assert steps[1]["with.python-version"] == "3.11"
    # the install step installs fqexport itself, pinned to this version, not the user's repository ("pip install .")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    install = steps[2]["run"]
    assert f'pip install --extra-index-url https://download.pytorch.org/whl/cpu "fqexport=={version}"' in install
    assert not re.search(r"pip install[^\n]* \.$", install, re.MULTILINE) and "constraints.txt" not in install
    assert (ROOT / "constraints.txt").is_file()  # README's install and test commands use it
    upload = steps[-1]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    assert "junit.xml" in upload["with.path"] and "report/" in upload["with.path"]

    runs = [s.get("run", "") for s in steps]
    commands = [c for r in runs for c in fqexport_commands(r, {"OUT": "build/fqexport"})]
    names = [c[1] if c[0] == "--quiet" else c[0] for c in commands]
    assert names == ["compress", "validate"]  # compress first, then the gate
    parser = cli.build_parser()
    compress_args = parser.parse_args(commands[0])
    validate_args = parser.parse_args(commands[1])
    assert compress_args.out == "build/fqexport/model_w8a8.onnx" == str(validate_args.model)
    limits = (validate_args.min_worst_group_acc, validate_args.max_acc_gap, validate_args.max_group_drop)
    assert limits == (5.0, 50.0, 5.0)
    assert str(validate_args.junit) == "build/fqexport/junit.xml"
    assert str(validate_args.reference) == "build/fqexport/float.onnx"
    # Files the workflow reads come from the prepare step (the API example).
    assert any("examples/api_example.py --quick" in r for r in runs)


def test_cli_example_commands_parse_with_the_real_cli():
    text = (EXAMPLES / "cli_example.sh").read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "cli_example.sh")]).returncode == 0
    variables = {"FQEXPORT": "fqexport", "MODEL": "fqexport.demo.models:small_resnet", "OUT_DIR": "out",
                 "NUM_CALIB": "128", "MIN_WORST_GROUP_ACC": "5", "MAX_ACC_GAP": "50", "MAX_GROUP_DROP": "5"}
    commands = fqexport_commands(text, variables)
    parser = cli.build_parser()
    parsed = [parser.parse_args(c) for c in commands]
    assert [p.command for p in parsed] == ["compress", "compress", "validate", "analyze", "validate"]
    gate = parsed[-1]
    assert (gate.min_worst_group_acc, gate.max_acc_gap, gate.max_group_drop) == (5.0, 50.0, 5.0)
    assert str(gate.junit) == "out/cli_junit.xml"


def test_readme_names_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    for name in ("api_example.py", "cli_example.sh", "ci_workflow.yml", "--quick"):
        assert name in readme, name
