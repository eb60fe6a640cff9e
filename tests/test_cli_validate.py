"""Tests of ``fqexport validate`` through the real ``fqexport.cli.main``: exit codes 0/1/2, the
printed table and checks, the reports it writes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fixtures_models import saturating_qdq_gemm
from fqexport.exporters.cpu_isa import cpu_isa, runs_natively
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from fqexport.cli import main
from fqexport.cli.flags.validate import MSG_MODEL_DIR

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa


def _run(argv):
    return main(["-q", "validate", *map(str, argv)])  # no progress bars on the stderr the tests read


def _exit_code(argv) -> int:
    """``_run``'s exit code, argparse's own exit (a usage error) included."""
    try:
        return _run(argv)
    except SystemExit as stop:
        return int(stop.code)


def _export(net, x, path):
    torch.onnx.export(net, (torch.from_numpy(x[:2]),), str(path), dynamo=True, opset_version=21,
                      input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("cli")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    x = np.random.default_rng(1).standard_normal((120, 8)).astype(np.float32)
    _export(net, x, d / "float.onnx")
    # the same net with negated logits: for 2 classes it predicts the other class for every sample
    flipped = torch.nn.Sequential(*net, torch.nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        flipped[-1].weight.copy_(-torch.eye(2))
    _export(flipped, x, d / "flipped.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": x[i : i + 40]} for i in range(0, 120, 40))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(d / "float.onnx"), str(d / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    group = np.where(np.arange(120) % 3 == 0, "minority", "majority")
    np.savez(d / "test.npz", x=x, y=y, group=group)
    # the float model's own labels, with the first 10 of the 40 minority samples flipped:
    # the float model then scores exactly 75 % on the minority and 100 % on the majority
    noisy = y.copy()
    noisy[np.flatnonzero(group == "minority")[:10]] ^= 1
    np.savez(d / "noisy.npz", x=x, y=noisy, group=group)
    np.savez(d / "wrong.npz", x=x[:, :5], y=y, group=group)
    (d / "broken.onnx").write_bytes(b"\x08\x01garbage")
    return d


def test_exit_0_when_limits_hold_and_reports_written(files, tmp_path, capsys):
    rc = _run([files / "qdq.onnx", "--data", files / "test.npz", "--reference", files / "float.onnx",
               "--min-worst-group-acc", 50, "--max-size-mb", 1, "--max-latency-ms", 1000, "--repeats", 3,
               "--report-dir", tmp_path / "rep", "--junit", tmp_path / "junit.xml", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "minority" in out and "majority" in out and "\nPASS\n" in out
    assert "changed predictions vs reference per group (reference right and model wrong / the reverse; " in out
    assert "PASS min_worst_group_acc" in out and "kernels: " in out and "QGemm=2" in out
    assert (tmp_path / "rep" / "report.json").is_file() and (tmp_path / "rep" / "report.md").is_file()
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("tests") == "3" and root.get("failures") == "0"


def test_exit_1_names_broken_limit_value_and_group(files, tmp_path, capsys):
    rc = _run([files / "float.onnx", "--data", files / "test.npz", "--min-acc", 50, "--max-size-mb", 0.0001,
               "--no-latency", "--junit", tmp_path / "j.xml"])
    out = capsys.readouterr().out
    assert rc == 1
    # the float model is right on every sample: both groups at 100 %, a tie named as one
    assert "worst group majority (tied with minority): 100.00 %" in out
    size = (files / "float.onnx").stat().st_size
    assert f"FAIL max_size_mb: model size {size / 1e6:.6g} MB ({size:,} bytes) exceeds --max-size-mb 0.0001" in out
    assert "PASS min_acc: overall accuracy 100.00 % ok --min-acc 50" in out
    root = ET.parse(tmp_path / "j.xml").getroot()
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["max_size_mb"]


def test_exit_1_for_worst_group_gap_and_drop(files, tmp_path, capsys):
    rc = _run([files / "float.onnx", "--data", files / "test.npz", "--min-worst-group-acc", 100.0,
               "--max-acc-gap", 0, "--no-latency", "--no-kernel-check"])
    assert rc == 0  # float labels its own data perfectly: 100 % everywhere, gap 0
    capsys.readouterr()
    rc = _run([files / "float.onnx", "--data", files / "noisy.npz", "--min-worst-group-acc", 80,
               "--max-acc-gap", 20, "--no-latency", "--no-kernel-check"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 1
    assert "FAIL min_worst_group_acc: worst-group accuracy (group 'minority') 75.00 % below --min-worst-group-acc 80" in out
    # the gate raised ValidationFailed (ValidationReport.raise_for_failures): one FAIL line on stderr naming both
    assert captured.err.startswith(f"FAIL: {files / 'float.onnx'}: 2 limit(s) broken: min_worst_group_acc: ")
    assert "; max_acc_gap: " in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "FAIL max_acc_gap: accuracy gap of group 'minority' to the best group 'majority' 25.00 pp exceeds --max-acc-gap 20" in out
    rc = _run([files / "flipped.onnx", "--data", files / "test.npz", "--reference", files / "float.onnx",
               "--max-group-drop", 5, "--no-latency", "--no-kernel-check"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL max_group_drop: accuracy drop vs reference (group '" in out
    assert "100.00 pp exceeds --max-group-drop 5" in out
    # a copy of the model as its reference: every drop 0, passes (and a warning says why)
    import shutil

    shutil.copy(files / "float.onnx", tmp_path / "copy.onnx")
    rc = _run([files / "float.onnx", "--data", files / "test.npz", "--reference", tmp_path / "copy.onnx",
               "--max-group-drop", 0, "--no-latency", "--no-kernel-check"])
    assert rc == 0 and "PASS max_group_drop: accuracy drop vs reference" in capsys.readouterr().out
    # the model's own file as its reference: a gate that cannot fail, refused (survey 22)
    rc = _run([files / "float.onnx", "--data", files / "test.npz", "--reference", files / "float.onnx",
               "--max-group-drop", 0, "--no-latency", "--no-kernel-check"])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        f"error: --reference {files / 'float.onnx'} is the model itself: its drops would be 0 and its agreement "
        "100 % whatever the model does; give the float model (compress --float-out) as the reference")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{d}/broken.onnx", "--data", "{d}/test.npz"], "broken.onnx"),
        (["{d}/float.onnx", "--data", "{d}/wrong.npz", "--no-latency"],
         "wrong.npz: x has shape [5] per sample but model {d}/float.onnx expects input [batch, 8]"),
        (["{d}/float.onnx", "--data", "{d}/missing.npz"], "missing.npz"),
        (["{d}/float.onnx", "--data", "{d}/test.npz", "--max-group-drop", "1"], "needs a reference model"),
        (["{d}/float.onnx", "--data", "{d}/test.npz", "--min-acc", "150"], "must be a finite number in [0, 100]"),
        # the flag the user typed, not the field (survey 76: every limit's error named none)
        (["{d}/float.onnx", "--data", "{d}/test.npz", "--min-acc", "nan"], "error: --min-acc: threshold min_acc=nan"),
        (["{d}/float.onnx", "--data", "{d}/test.npz", "--threads", "2147483648"],
         "error: --threads 2147483648 must be from 0 (ORT's default) to 4096"),
    ],
)
def test_bad_inputs_exit_2_with_the_message(files, capsys, argv, message):
    assert _run([a.format(d=files) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message.format(d=files) in captured.err
    assert "PASS" not in captured.out and "FAIL" not in captured.out


def test_a_directory_as_the_model_says_validate_takes_an_onnx_file(files, tmp_path, capsys):
    (tmp_path / "dirmodel.onnx").mkdir()
    for argv, flag in (([tmp_path / "dirmodel.onnx"], "model"),
                       ([files / "float.onnx", "--reference", tmp_path / "dirmodel.onnx"], "--reference")):
        assert _run([*argv, "--data", files / "test.npz"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {MSG_MODEL_DIR.format(flag=flag, path=tmp_path / 'dirmodel.onnx')}\n"
        assert err == (f"error: {flag} {tmp_path / 'dirmodel.onnx'} is a directory; validate takes an .onnx file (the "
                       "model's file, not its folder)\n")


def test_a_rerun_into_the_same_report_dir_leaves_no_plot_it_did_not_draw(files, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: no plots drawn")
    rep = tmp_path / "rep"
    assert _run([files / "float.onnx", "--data", files / "test.npz", "--repeats", 2, "--warmup", 0,
                 "--no-kernel-check", "--report-dir", rep]) == 0
    assert {p.name for p in rep.iterdir()} == {"report.json", "report.md", "group_accuracy.png", "latency.png"}
    (rep / "notes.png").write_bytes(b"mine")
    assert _run([files / "float.onnx", "--data", files / "test.npz", "--no-latency", "--no-kernel-check",
                 "--report-dir", rep]) == 0
    assert {p.name for p in rep.iterdir()} == {"report.json", "report.md", "group_accuracy.png", "notes.png"}
    assert _run([files / "float.onnx", "--data", files / "test.npz", "--no-latency", "--no-kernel-check",
                 "--report-dir", rep, "--no-plots"]) == 0
    assert {p.name for p in rep.iterdir()} == {"report.json", "report.md", "notes.png"}
    capsys.readouterr()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="CUDAExecutionProvider present: the missing-CUDA message cannot be tested")
def test_cuda_missing_exits_2_naming_the_package(files, capsys):
    assert _run([files / "float.onnx", "--data", files / "test.npz", "--provider", "cuda"]) == 2
    assert "pip install onnxruntime-gpu" in capsys.readouterr().err


def test_quiet_is_accepted_after_the_subcommand(files, capsys):
    rc = main(["validate", str(files / "float.onnx"), "--data", str(files / "test.npz"), "--no-latency",
               "--no-kernel-check", "--min-acc", "99", "-q"])
    assert rc == 0 and "PASS min_acc: overall accuracy 100.00 % ok --min-acc 99" in capsys.readouterr().out


def test_target_flag_gates_the_emulated_cpu_and_prints_the_isa(tmp_path, capsys):
    data = saturating_qdq_gemm(tmp_path / "sat.onnx")
    group = np.array(data.group_names)[data.group]
    np.savez(tmp_path / "sat.npz", x=data.x, y=data.y, group=group)
    rc = _run([tmp_path / "sat.onnx", "--data", tmp_path / "sat.npz", "--target", "x86-vnni",
               "--target", "x86-avx2", "--min-worst-group-acc", 50, "--no-latency",
               "--report-dir", tmp_path / "rep", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"provider cpu  cpu {cpu_isa()} (int8 kernel family " in out
    how = "this CPU's own kernels" if runs_natively("x86-avx2") else "emulated: 1 kernel-dependent node(s)"
    assert f"target x86-avx2 ({how}): majority 100.00 % (k.dev 0.00), minority 0.00 % (k.dev 100.00)" in out
    assert ("FAIL min_worst_group_acc[target=x86-avx2]: x86-avx2: worst-group accuracy (group 'minority') "
            "0.00 % below --min-worst-group-acc 50") in out
    # a group name holding the line's separator is quoted: 'minority, rural' read as two groups (survey 52)
    np.savez(tmp_path / "comma.npz", x=data.x, y=data.y, group=np.where(group == "minority", "minority, rural", group))
    _run([tmp_path / "sat.onnx", "--data", tmp_path / "comma.npz", "--target", "x86-avx2", "--no-latency",
          "--no-kernel-check"])
    assert "majority 100.00 %, 'minority, rural' 0.00 %; agreement" in capsys.readouterr().out
    assert "PASS min_worst_group_acc[target=x86-vnni]" in out
    label = f"x86-avx2 (this CPU's own kernels, {cpu_isa()})" if runs_natively("x86-avx2") else "x86-avx2 (emulated)"
    assert f"| {label} | minority | 0.00 | 100.00 |" in (tmp_path / "rep" / "report.md").read_text()


def test_unknown_target_is_a_usage_error(files, capsys):
    with pytest.raises(SystemExit) as exc:
        _run([files / "qdq.onnx", "--data", files / "test.npz", "--target", "x86-sse"])
    assert exc.value.code == 2
    assert "invalid choice: 'x86-sse'" in capsys.readouterr().err


def test_a_limit_that_looks_like_a_fraction_is_warned_about_once(files, caplog):
    """The flags' check, the run and every --target's checks read the same limits: one warning."""
    rc = _run([files / "qdq.onnx", "--data", files / "test.npz", "--min-worst-group-acc", "0.37",
               "--target", "x86-vnni", "--no-latency", "--no-kernel-check"])
    assert rc == 0
    assert caplog.text.count("min_worst_group_acc=0.37 is read as 0.37 %") == 1


def test_a_host_kernels_stand_in_is_recorded(files, tmp_path, monkeypatch, capsys, caplog):
    """FQEXPORT_HOST_KERNELS makes every --target family emulated (native stays this CPU's own
    session, which the console and markdown said was emulated too, survey 41): the console, JSON
    and markdown say so, and a run that gates no stand-in target is warned."""
    import json

    monkeypatch.setenv("FQEXPORT_HOST_KERNELS", "arm64")
    rc = _run([files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--target", "arm64",
               "--report-dir", tmp_path, "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    assert ("; standing in for arm64 (FQEXPORT_HOST_KERNELS: every --target family emulated; native is this CPU's "
            "own session)") in out
    # how many fused nodes the emulation computed, in the console and the report (survey 54)
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["host_kernels_stand_in"] == "arm64" and d["targets"]["arm64"]["emulated"] is True
    nodes = d["targets"]["arm64"]["emulated_nodes"]
    assert nodes and f"target arm64 (emulated: {len(nodes)} kernel-dependent node(s))" in out
    assert ("- standing in for the arm64 int8 kernels (`FQEXPORT_HOST_KERNELS`): every --target family is emulated; "
            "the native row is still this CPU's own session") in (tmp_path / "report.md").read_text()
    with caplog.at_level("WARNING"):
        assert _run([files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--no-kernel-check"]) == 0
    assert "add --target arm64 (API: targets=...) to gate the stand-in family" in caplog.text
    capsys.readouterr()
    monkeypatch.delenv("FQEXPORT_HOST_KERNELS")
    assert _run([files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--report-dir", tmp_path,
                 "--no-plots"]) == 0
    assert "standing in" not in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["host_kernels_stand_in"] is None


def test_nan_outputs_are_refused_naming_the_samples_by_group(files, tmp_path, capsys):
    """A model returning NaN on some samples passed --min-acc: argmax counts a NaN row as class 0
    (survey 22). The gate now stops with exit 2, counting them per group."""
    import onnx
    from onnx import TensorProto, helper

    x = np.load(files / "test.npz")["x"]
    # logits = [log(x0), -log(x0)]: NaN where x0 < 0
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a"], ["x0"]), helper.make_node("Log", ["x0"], ["l"]),
         helper.make_node("Neg", ["l"], ["n"]), helper.make_node("Concat", ["l", "n"], ["logits"], axis=1)],
        "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 1), ("a", 1))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "nan.onnx")
    assert _run([tmp_path / "nan.onnx", "--data", files / "test.npz", "--no-latency", "--min-acc", 1]) == 2
    err = capsys.readouterr().err
    group = np.load(files / "test.npz")["group"]
    neg = x[:, 0] < 0
    counts = ", ".join(f"{g!r} {int((neg & (group == g)).sum())}" for g in ("majority", "minority"))
    assert err.startswith(f"error: model {tmp_path / 'nan.onnx'} returns NaN or Inf on {int(neg.sum())} of 120 "
                          f"samples of {files / 'test.npz'} (by group: {counts}; the first is sample "
                          f"{int(np.flatnonzero(neg)[0])}): its outputs cannot be scored")


def test_a_model_with_two_outputs_is_refused_naming_them(files, tmp_path, capsys):
    """The first output was measured whatever it held (features: 6 % 'accuracy', exit 1)."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 2], np.ones(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["feat"]), helper.make_node("MatMul", ["feat", "w"], ["logits"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "two.onnx")
    assert _run([tmp_path / "two.onnx", "--data", files / "test.npz", "--no-latency"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'two.onnx'}: the model has 2 outputs ('feat' ['N', 8], 'logits' ['N', 2]); fqexport "
        "measures a model's one output (the logits, boxes or masks): export the model with that output only")


def test_a_run_that_errors_leaves_no_earlier_pass_report(files, tmp_path, capsys):
    """Run 1 passes and writes its reports; run 2 stops on bad data (exit 2): run 1's PASS
    report.json / report.md / JUnit were left for CI to read (survey 22)."""
    rep, junit = tmp_path / "rep", tmp_path / "rep" / "junit.xml"
    assert _run([files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--report-dir", rep,
                 "--junit", junit, "--no-plots"]) == 0
    assert sorted(p.name for p in rep.iterdir()) == ["junit.xml", "report.json", "report.md"]
    (rep / "notes.txt").write_text("the user's own file")
    assert _run([files / "qdq.onnx", "--data", files / "wrong.npz", "--no-latency", "--report-dir", rep,
                 "--junit", junit, "--no-plots"]) == 2
    assert sorted(p.name for p in rep.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad", [["--max-group-drop", "1"], ["--threads", "-1"], ["--min-worst-group-acc", "200"],
                                 # refused by argparse itself (survey 58), and an output path check_paths refuses
                                 ["--min-worst-grup-acc", "3"], ["--batch-size", "0"], ["--report-dir", "A_FILE"]])
def test_a_flag_error_leaves_no_earlier_pass_report(files, tmp_path, bad):
    """A flag error (exit 2 before any data is read) left run 1's PASS reports behind (survey 49)."""
    rep, junit = tmp_path / "rep", tmp_path / "rep" / "junit.xml"
    good = [files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--report-dir", rep, "--junit", junit,
            "--no-plots"]
    assert _run(good) == 0 and sorted(p.name for p in rep.iterdir()) == ["junit.xml", "report.json", "report.md"]
    (tmp_path / "a_file").write_text("not a folder")
    assert _exit_code([*good, *[str(tmp_path / "a_file") if b == "A_FILE" else b for b in bad]]) == 2
    left = sorted(p.name for p in rep.iterdir())
    assert left == ([] if bad[0] != "--report-dir" else ["report.json", "report.md"])  # not this run's outputs


def test_an_early_error_never_removes_an_input_nor_another_tools_junit(files, tmp_path):
    """Removing the earlier reports first must not remove what the run reads (--junit set to the data file
    is refused, not obeyed) nor a JUnit file fqexport did not write."""
    import shutil

    data = tmp_path / "test.npz"
    shutil.copy(files / "test.npz", data)
    assert _exit_code([files / "qdq.onnx", "--data", data, "--no-latency", "--junit", data]) == 2 and data.is_file()
    theirs = tmp_path / "pytest.xml"
    theirs.write_text('<?xml version="1.0"?><testsuite name="pytest" tests="1"/>')
    assert _exit_code([files / "qdq.onnx", "--data", data, "--no-latency", "--junit", theirs, "--batch-size", "0"]) == 2
    assert theirs.is_file()


def test_a_latency_limit_at_a_batch_a_fixed_batch_model_cannot_run_is_refused(files, tmp_path, capsys, caplog):
    """A batch-1 model was timed at batch 1 for --latency-batch-sizes 1,32: the limit at 32 was
    silently never checked (survey 22)."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 2], np.linspace(-1, 1, 16, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "fixed1.onnx")
    base = [tmp_path / "fixed1.onnx", "--data", files / "test.npz", "--latency-batch-sizes", "1,32", "--repeats", 2]
    assert _run([*base, "--max-latency-ms", 1000]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --max-latency-ms (max_latency_ms) at --latency-batch-sizes 1,32: model {tmp_path / 'fixed1.onnx'} "
        "runs batch 1 only (its input's batch dim is fixed), so the limit could not be checked at 32; time batch 1 "
        "(--latency-batch-sizes 1) or export the model with a dynamic batch")
    with caplog.at_level("WARNING", logger="fqexport.validation.gate"):
        assert _run(base) == 0  # no limit: measured at batch 1, and said
    assert "runs batch 1 only (a fixed batch dim): latency is timed at batch 1, not at 32" in caplog.text
    assert _run([*base[:3], "--latency-batch-sizes", "1", "--max-latency-ms", 1000, "--repeats", 2]) == 0


def test_a_reader_closing_stdout_early_still_gets_the_reports(files, tmp_path, monkeypatch):
    """`validate ... --junit j.xml | head -1` exited 141 before writing the reports (survey 22):
    they are written before the console summary now."""
    import fqexport.cli.validate as validate_cli

    def closed(report):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(validate_cli, "print_summary", closed)
    rc = _run([files / "qdq.onnx", "--data", files / "test.npz", "--no-latency", "--report-dir", tmp_path / "r",
               "--junit", tmp_path / "j.xml", "--no-plots"])
    assert rc == 141
    assert (tmp_path / "r" / "report.json").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert (tmp_path / "j.xml").is_file()


def test_a_missing_reference_is_named_by_its_flag(files, tmp_path, capsys):
    """'ONNX model nope.onnx does not exist' did not say which of the two models (survey 49)."""
    assert _run([files / "qdq.onnx", "--data", files / "test.npz", "--reference", tmp_path / "nope.onnx"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --reference {tmp_path / 'nope.onnx'}: ONNX model does not "
                                                "exist: check the path")
