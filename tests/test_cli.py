"""Tests of fqexport/cli.py through main([...]): exit codes 0/1/2, files, printed tables, errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_main
from fqexport.config import QuantConfig
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.pipeline.compress import compress

from fqexport.cli import main
from fqexport.cli.flags.compress import COMPRESS_ONLY_WITH
from fqexport.cli.flags.shared import MSG_ONLY_WITH
from fqexport.cli.main import build_parser


def _compress_args(files, out, *extra, calib=None, weights=None):
    return ["-q", "compress", "--model", "fixtures_models:tiny_mlp", "--weights", weights or files / "mlp.pt",
            "--calib", calib or files / "calib.npz", "--out", out, "--num-calib", "200", *extra]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, mlp_files, tests_dir):
    out_dir = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tests_dir)  # 'fixtures_models:tiny_mlp' resolves from the working directory
        code, out, err = run_main(_compress_args(mlp_files, out_dir / "mlp.onnx", "--layer-bits", "fc3=4",
                                             "--report", out_dir / "report.json"))
    return code, out, err, out_dir


def test_compress_says_when_the_file_stores_codes_wider_than_their_width(mlp_files, tests_dir, tmp_path, monkeypatch):
    """3-bit codes are stored in INT4 (validate counts 4 bits): the summary gives both figures."""
    monkeypatch.chdir(tests_dir)
    code, out, err = run_main(_compress_args(mlp_files, tmp_path / "w3.onnx", "--weight-bits", "3", "--no-speed-check",
                                             "--report", tmp_path / "r.json"))
    assert code == 0, err
    assert re.search(r"average weight bits 3\.00 \(float layers at 32; 100\.0% of weights quantized; 4\.00 at the width "
                     r"of the containers the file stores the codes in, what validate reports; [0-9.]+ stored with the "
                     r"scales and zero points\); wrote .*w3\.onnx \([0-9,]+ bytes, opset 21\)", out), out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["avg_weight_bits"] == pytest.approx(3.0) and summary["avg_container_weight_bits"] == pytest.approx(4.0)
    # "stored" counts the scales too, as a --budget-bits budget does (survey 98: it read 4.00 for a file
    # storing 4.199): every Linear of the tiny MLP is a MatMulNBits, its codes and block scales in the file
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tmp_path / "w3.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    stored = sum(init[i].nbytes for n in nodes for i in n.input[1:4] if i in init)
    params = sum(int(dict((a.name, a.i) for a in n.attribute)["K"]) * int(dict((a.name, a.i) for a in n.attribute)["N"])
                 for n in nodes)
    assert len(nodes) == 3 and summary["avg_stored_weight_bits"] == pytest.approx(8 * stored / params)
    assert summary["avg_stored_weight_bits"] > 4.0


def test_compress_end_to_end(compressed):
    code, out, err, d = compressed
    assert code == 0, err
    model = onnx.load(str(d / "mlp.onnx"))
    onnx.checker.check_model(model)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "module", "bits", "params", "macs", "storage"]
    rows = {l.split()[0]: l.split() for l in lines[2:5]}
    assert rows["fc1"] == ["fc1", "Linear", "8", "16,384", "16,384", "int8"]
    assert rows["fc3"] == ["fc3", "Linear", "4", "1,024", "1,024", "nbits"]
    assert "wrote " in out and "mlp.onnx" in out and "opset 21" in out
    assert "top-1 agreement" in out and "on 200 calibration samples" in out
    # the file against its float model on this CPU: speed or only size
    assert re.search(r"speed vs the float model, .*\([0-9]+ thread\(s\); .*: batch 1 [0-9.]+ vs [0-9.]+ \([0-9]+ pairs, "
                     r"median of their ratios [0-9.]+x\), batch 32 [0-9.]+ vs [0-9.]+ \([0-9]+ pairs, median of their "
                     r"ratios [0-9.]+x\)", out)
    assert re.search(r"batch 1: [0-9.]+x the float model's speed \([a-z ]+; 95 % interval [0-9.]+-[0-9.]+x\)", out)
    assert f"on this CPU ({cpu_isa()}) the file buys " in out


def test_compress_writes_report(compressed):
    _, _, _, d = compressed
    report = json.loads((d / "report.json").read_text())
    assert [r["bits"] for r in report["layers"]] == [8, 8, 4]
    assert report["export"]["agreement"] >= 0.99
    assert report["speed"].startswith(f"on this CPU ({cpu_isa()}) the file buys ")
    # the timings as numbers, not only the verdict's words (survey 58)
    timings = report["speed_timings"]
    assert (timings["cpu_isa"], timings["cpu_kernel_family"]) == (cpu_isa(), kernel_family(cpu_isa()))  # survey 77
    assert [t["batch_size"] for t in timings["latency"]] == [1, 32] == [t["batch_size"] for t in timings["float_latency"]]
    assert all(t["p50_ms"] > 0 for t in (*timings["latency"], *timings["float_latency"]))
    assert set(timings["speedup_vs_float"]) == {"1", "32"}
    assert f"batch 32: {timings['speedup_vs_float']['32']:.2f}x the float model's speed" in report["speed"]
    assert report["avg_weight_bits"] == pytest.approx((8 * 16384 + 8 * 65536 + 4 * 1024) / (16384 + 65536 + 1024))
    # the metadata the file holds, containers and opset included (the in-memory record had nulls) (survey 37)
    assert report["metadata"] == read_metadata(d / "mlp.onnx").to_dict()
    assert [r["storage"] for r in report["metadata"]["layers"]] == ["int8", "int8", "nbits"]


def test_a_float_layer_reports_its_macs(mlp_model, mlp_data):
    """A --keep-float layer said 0 MACs in the table, the report and the metadata (survey 37)."""
    cm = compress(mlp_model, mlp_data, QuantConfig(num_calib=64, keep_float=("fc3",), method="rtn"), progress=False)
    (fc3,) = [r for r in cm.layer_table() if r["name"] == "fc3"]
    assert fc3["macs"] == 256 * 4 == cm.metadata.float_layers[0].macs


def _worst_group_acc(path, data) -> float:

    pred = run_batches(make_session(path), data.x, 100).argmax(1)
    return min(float(np.mean(pred[data.group == g] == data.y[data.group == g])) for g in range(2))


def test_validate_passes_then_fails_a_too_high_limit(compressed, mlp_files, mlp_data):
    _, _, _, d = compressed
    worst = 100.0 * _worst_group_acc(d / "mlp.onnx", mlp_data)
    assert 60.0 < worst < 99.9  # the limit below is reachable and breakable
    base = ["validate", d / "mlp.onnx", "--data", mlp_files / "calib.npz", "--no-latency", "--no-kernel-check"]
    code, out, err = run_main([*base, "--min-worst-group-acc", f"{worst - 0.05:.2f}"])
    assert code == 0, err
    assert out.rstrip().endswith("PASS")
    code, out, err = run_main([*base, "--min-worst-group-acc", f"{worst + 0.05:.2f}"])
    assert code == 1
    assert "FAIL: 1 limit(s) broken" in out and "FAIL min_worst_group_acc" in out


def test_validate_limit_above_100_is_bad_input(compressed, mlp_files):
    _, _, _, d = compressed
    err = _bad_input(["validate", d / "mlp.onnx", "--data", mlp_files / "calib.npz", "--no-latency",
                      "--min-worst-group-acc", "100.5"])
    assert "min_worst_group_acc" in err and "100.5" in err


@pytest.fixture()
def bad_npz(tmp_path, mlp_data):
    def make(**changes):
        arrays = {"x": mlp_data.x.copy(), "y": mlp_data.y.copy(), "group": mlp_data.group.copy()}
        for k, fn in changes.items():
            fn(arrays[k])
        np.savez(tmp_path / "bad.npz", **arrays)
        return tmp_path / "bad.npz"

    return make


def _bad_input(argv) -> str:
    code, out, err = run_main(argv)
    assert code == 2, (out, err)
    # after the warnings of flags these tests give again to override _compress_args' (MSG_REPEATED)
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert lines and lines[0].startswith("error: "), err
    return err


def test_missing_calib_file(mlp_files, tmp_path):
    # named with its flag, before torch is imported (survey 76: "nope.npz: file not found" after ~3 s)
    code, out, err = run_main(_compress_args(mlp_files, tmp_path / "o.onnx", calib=tmp_path / "nope.npz"))
    assert code == 2 and f"error: --calib {tmp_path / 'nope.npz'}: no such file" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
    import subprocess
    import sys

    probe = ("import sys; from fqexport.cli import main; code = main(sys.argv[1:]); "
             "print('torch' in sys.modules, file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "validate", str(tmp_path / "none.onnx"), "--data",
                           str(tmp_path / "none.npz")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: model {tmp_path / 'none.onnx'}: no such file", "False"]


def test_nan_in_x(mlp_files, tmp_path, bad_npz):
    def poison(x):
        x[3, 2] = np.nan

    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", calib=bad_npz(x=poison)))
    # the .npz is memory-mapped and checked chunk by chunk (only the drawn samples are read): the sample is named
    assert "bad.npz: sample 3: field 'x' contains NaN or Inf (1 values)" in err
    assert not (tmp_path / "o.onnx").exists()


def test_label_out_of_range(mlp_files, tmp_path, bad_npz):
    def relabel(y):
        y[0] = 9
        y[37] = 7

    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", calib=bad_npz(y=relabel)))
    # the first bad sample and how many (survey 75: neither was named)
    assert "bad.npz: sample 0: field 'y' holds the label 9 outside [0, 4) (2 sample(s) outside;" in err


def test_bits_9(mlp_files, tmp_path):
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--weight-bits", "9"))
    assert "error: --weight-bits: weight_bits=9 is not supported" in err
    # abbreviated, as argparse accepts it: named in full (survey 76: "weight_bits=9 ..." with no flag)
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--weight-b", "9"))
    assert "error: --weight-bits: weight_bits=9 is not supported" in err


@pytest.mark.parametrize("given, message", [
    (["--num-calib", "0"], "error: --num-calib: num_calib=0 must be >= 1"),
    (["--damp=-1"], "error: --damp: damp=-1.0 must be in [0, 10)"),
    (["--batch-size", "0"], "error: --batch-size: batch_size=0 must be >= 1"),
    # the search's own errors (survey 57): a pin's width, a pin naming no layer, a budget no allocation meets
    (["--budget-bits", "3", "--pin", "fc1=12"], "error: --pin: pins['fc1']=12 is not supported"),
    (["--budget-bits", "3", "--pin", "nosuch=8"], "error: --pin: pin 'nosuch' matches no layer (layers: fc1, fc2, fc3)"),
    # survey 73: a pin on a layer that stays float is named as such, not as no layer
    (["--budget-bits", "3", "--keep-float", "fc2", "--pin", "fc2=8"],
     "error: --pin: pin 'fc2' matches 'fc2' (Linear; keep_float: fc2), which stay(s) float: no width to search; "
     "drop the pin (quantizable layers: fc1, fc3)"),
    (["--budget-bops", "1000"], "error: --budget-bops: budget_bops=1000 cannot be met: the smallest allocation"),
    # survey 63: the field is num_candidates, the flag --candidates; folds beyond the data; two pins
    (["--budget-bits", "3", "--candidates", "0"], "error: --candidates: num_candidates=0 must be >= 1"),
    (["--budget-bits", "3", "--verify-folds", "2000"],
     "error: --verify-folds: verify_folds=2000: 2000 folds need at least 2000 calibration samples"),
    (["--budget-bits", "3", "--pin-first-last", "8", "--pin", "fc3=4"],
     "error: --pin-first-last: pin_first_last=8 pins layer 'fc3' (the last quantizable layer), which pins['fc3'] "
     "pins to 4"),
    (["--budget-bits", "3", "--pin", "fc1=8", "--pin", "fc*=2"],
     "error: --pin: pins['fc1']=8 and pins['fc*']=2 both match layer 'fc1'"),
    # survey 89: --weight-range acts on 8-bit weights only (the file was the x86-safe one, its settings said 'full')
    (["--weight-bits", "4", "--weight-range", "full"], "error: --weight-range: used only with 8-bit weights"),
    (["--budget-bits", "3", "--bit-choices", "2,4", "--weight-range", "full"],
     "error: --weight-range: used only with 8-bit weights"),
    # survey 76: named --group-weights (the Hessians' flag, also given) or no flag at all
    (["--budget-bits", "3", "--group-weights", "samples", "--objective", "weighted", "--objective-weights", "a=nan,b=1"],
     "error: --objective-weights: MixedPrecisionConfig.group_weights['a']=nan must be a finite number >= 0"),
])
def test_a_config_error_names_the_flag_the_user_typed(mlp_files, tmp_path, given, message):
    """The CLI printed the config field (``num_calib=0 must be >= 1``), a word the user never typed."""
    assert message in _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", *given))


def test_unknown_layer_in_layer_bits(mlp_files, tmp_path):
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--layer-bits", "nope=4"))
    assert "layer_bits names 'nope', not a quantizable layer of the model (layers: fc1, fc2, fc3)" in err


def test_malformed_layer_bits(mlp_files, tmp_path):
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--layer-bits", "fc1"))
    assert "--layer-bits 'fc1': expected NAME=BITS" in err


def test_unreadable_checkpoint(mlp_files, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x00garbage")
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", weights=tmp_path / "broken.pt"))
    assert "broken.pt: cannot read checkpoint" in err


def test_a_directory_as_weights_or_model_and_an_onnx_model_are_named_for_what_they_are(mlp_files, tmp_path, compressed):
    """--weights DIR said 'checkpoint file not found'; --model m.onnx asked for --trust-pickle, and
    with it 'invalid load key' (survey 49)."""
    (tmp_path / "ckpt").mkdir()
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", weights=tmp_path / "ckpt"))
    assert err.strip() == f"error: {tmp_path / 'ckpt'} is a directory, not a checkpoint file: give the file"
    err = _bad_input(["-q", "compress", "--model", tmp_path / "ckpt", "--calib", mlp_files / "calib.npz", "--out",
                      tmp_path / "o.onnx"])
    assert err.strip() == f"error: {tmp_path / 'ckpt'} is a directory, not a model file: give the file"
    onnx_file = tmp_path / "exported.bin"  # found by its bytes, whatever its name
    onnx_file.write_bytes((compressed[3] / "mlp.onnx").read_bytes())
    for path in (compressed[3] / "mlp.onnx", onnx_file):
        err = _bad_input(["-q", "compress", "--model", path, "--trust-pickle", "--calib", mlp_files / "calib.npz",
                          "--out", tmp_path / "o.onnx"])
        assert err.startswith(f"error: {path}: an ONNX file; this takes the float PyTorch model"), err


def test_checkpoint_of_another_model(cnn_files, mlp_files, tmp_path):
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", weights=cnn_files / "cnn.pt"))
    assert "state_dict does not match the model from 'fixtures_models:tiny_mlp'" in err
    assert "missing keys ['fc1.weight'" in err


def test_pickled_model_needs_trust_flag(mlp_files, mlp_model, tmp_path):
    torch.save(mlp_model, tmp_path / "whole.pth")
    err = _bad_input(["-q", "compress", "--model", tmp_path / "whole.pth", "--calib", mlp_files / "calib.npz",
                      "--out", tmp_path / "o.onnx"])
    assert "--trust-pickle" in err


def test_validate_missing_model(mlp_files, tmp_path):
    err = _bad_input(["validate", tmp_path / "none.onnx", "--data", mlp_files / "calib.npz", "--no-latency"])
    assert "none.onnx" in err


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", "--model", "m:f"])
    assert info.value.code == 2
    assert "--calib" in capsys.readouterr().err


SUBCOMMANDS = ("compress", "validate", "analyze", "sweep", "demo")


@pytest.mark.slow  # a fresh interpreter importing torch: 10-30 s on a loaded 2-core machine
def test_installed_script_prints_help_naming_every_subcommand():
    script = Path(sys.executable).parent / "fqexport"
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "fqexport.cli"]
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fqexport")
    listed = [m.group(1) for m in re.finditer(r"^    (\w+) ", proc.stdout, re.MULTILINE)]
    assert listed == list(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fqexport {command}") and "-q, --quiet" in out


def test_compress_with_a_bit_budget_runs_the_mixed_precision_search(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    out = tmp_path / "mp.onnx"
    code, stdout, err = run_main(_compress_args(
        mlp_files, out, "--budget-bits", "4", "--bit-choices", "2,4,8", "--pin", "fc1=8",
        "--pin-first-last", "8", "--candidates", "2", "--report", tmp_path / "report.json", "--method", "rtn"))
    assert code == 0, err
    assert "mixed precision (worst-group, budget bits 4)" in stdout
    table = stdout.split("mixed precision (worst-group, budget bits 4):\n")[1].split("\n\n")[0]
    sensitivities = [line.split()[5] for line in table.splitlines()[2:]]  # 4 significant digits
    assert sensitivities and all(len(s.split("e")[0].lstrip("-0.").replace(".", "")) <= 4 for s in sensitivities), table
    # 200 of 400 calibration samples drawn leave too few of group 'b' unused: a hold-out split
    assert "candidates verified on held-out calibration data (a 30% hold-out split" in stdout
    # the samples behind the held-out figures, per group (survey 68: a 3-sample group's 100 % said nothing)
    counts = re.search(r"\nheld-out samples per group: a (\d+), b (\d+) \(one prediction of (a|b) is ([\d.]+) pp "
                       r"of its figure\)\n", stdout)
    assert counts, stdout
    n = min(int(counts[1]), int(counts[2]))
    assert float(counts[4]) == pytest.approx(100 / n, abs=0.01)
    # the fits, their time and the stored size are printed next to the nominal bits
    assert re.search(r"\n\d+ compress fits in [\d.]+ s; search [\d.]+ s; storage auto: nominal [\d.]+ bits, "
                     r"stored [\d.]+ bits/weight with scales, [\d,]+ weight bytes", stdout)
    # and the search's wall time beside one compress fit of it (the refit after the hold-out split)
    assert re.search(r"\nsearch wall time [\d.]+ s = [\d.]+x one compress \([\d.]+ s: the refit of the winner on "
                     r"all the data(, beside the verification fits)?\)\n", stdout)
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["fqexport"])
    bits = {l["name"]: l["bits"] for l in meta["layers"]}
    assert bits["fc1"] == 8 and bits["fc3"] == 8  # pinned: --pin and --pin-first-last
    assert set(bits.values()) <= {2, 4, 8}
    params = {l["name"]: l["params"] for l in meta["layers"]}
    avg = sum(bits[n] * params[n] for n in bits) / sum(params.values())
    assert avg <= 4.0 + 1e-9
    assert "allocation" in meta
    # no --task: inferred before the fits, and said so (each fit was handed the Task object)
    assert "task: classification (inferred: the data holds no boxes or masks)" in stdout
    assert meta["task"]["chosen"] == "inferred: the data holds no boxes or masks"
    report = json.loads((tmp_path / "report.json").read_text())
    table = report["mixed_precision"]["allocation"]["table"]
    assert {r["name"]: r["bits"] for r in table} == bits
    assert any(c["bits"] == bits for c in report["mixed_precision"]["candidates"])
    assert sum(report["mixed_precision"]["candidates"][0]["measured"]["count"].values()) == int(counts[1]) + int(counts[2])


def test_compress_with_the_output_fisher_sensitivity(tmp_path, mlp_files, tests_dir, monkeypatch):
    """``--sensitivity output-fisher``: the table the search ranks with is the solver's codes priced
    by the output Fisher (its method in the report), and the budget holds."""
    monkeypatch.chdir(tests_dir)
    out = tmp_path / "of.onnx"
    code, stdout, err = run_main(_compress_args(
        mlp_files, out, "--budget-bits", "4", "--bit-choices", "2,4,8", "--candidates", "1",
        "--sensitivity", "output-fisher", "--report", tmp_path / "report.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())["mixed_precision"]
    assert report["sensitivity"]["method"] == "output-fisher"
    delta = report["sensitivity"]["delta"]
    assert all(delta[l]["2"][g] >= delta[l]["8"][g] >= 0 for l in delta for g in delta[l]["2"])
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["fqexport"])
    bits = {l["name"]: l["bits"] for l in meta["layers"]}
    params = {l["name"]: l["params"] for l in meta["layers"]}
    assert sum(bits[n] * params[n] for n in bits) / sum(params.values()) <= 4.0 + 1e-9


def test_compress_verify_folds_flag(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    base = ("--budget-bits", "4", "--bit-choices", "2,4,8", "--candidates", "1", "--method", "rtn")
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "a.onnx", *base, "--verify-folds", "1"))
    assert code == 0, err
    assert re.search(r"\(a 30% hold-out split of \d+ samples; predicted vs measured\)", stdout)
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "c.onnx", *base, "--verify-folds", "3"))
    assert code == 0, err
    assert "(3-fold cross-fitted: every calibration sample held out once; predicted vs measured)" in stdout
    # 128 drawn of 400: the fits are compress's own, measured on the 272 samples it leaves unused
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "d.onnx", *base, "--num-calib", "128"))
    assert code == 0, err
    assert ("(the 272 calibration samples compress does not draw; each fit is the compress fit itself, no refit; "
            "predicted vs measured)") in stdout
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "b.onnx", *base, "--verify-folds", "0"))
    assert code == 2 and "verify_folds=0 must be an integer >= 1" in err
    assert not (tmp_path / "b.onnx").exists()


def test_compress_no_guard_verifies_the_candidates_alone_and_says_so(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    # 128 drawn of 400: each verification fit is compress's own, so one candidate is one fit
    base = ("--budget-bits", "4", "--bit-choices", "2,4,8", "--candidates", "1", "--method", "rtn", "--num-calib", "128")
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "g.onnx", *base, "--report", tmp_path / "g.json"))
    assert code == 0, err
    guarded = json.loads((tmp_path / "g.json").read_text())["mixed_precision"]
    assert "uniform" in [c["origin"] for c in guarded["candidates"]] and "--no-guard" not in stdout
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "n.onnx", *base, "--no-guard",
                                                "--report", tmp_path / "n.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "n.json").read_text())["mixed_precision"]
    assert [c["origin"] for c in report["candidates"]] == ["search"] and report["fits"] == 1
    assert report["allocation"]["uniform_guard"] is False and guarded["allocation"]["uniform_guard"] is True
    assert "note: no uniform allocation was verified (verify_uniform=False; CLI --no-guard)" in stdout
    assert "\n1 compress fit in " in stdout


def test_bad_bit_choices_exit_2(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "x.onnx", "--budget-bits", "4", "--bit-choices", "2,four"))
    assert code == 2
    assert "--bit-choices '2,four'" in err
    assert not (tmp_path / "x.onnx").exists()


def test_search_options_without_a_budget_are_bad_input(tmp_path, mlp_files):
    out = tmp_path / "x.onnx"
    code, stdout, err = run_main(_compress_args(mlp_files, out, "--objective", "mean", "--bit-choices", "2,4"))
    assert code == 2 and stdout == "" and not out.exists()
    assert err.strip() == ("error: --objective, --bit-choices: options of the mixed-precision search, which runs only "
                           "with a budget, so they would be ignored; add --budget-bits, --budget-bytes or "
                           "--budget-bops, or drop them")


WORKERS_NEEDS = COMPRESS_ONLY_WITH[0].needs  # "--finetune, or a budget with --engine local, ray or auto"


@pytest.mark.parametrize("extra, flags, needs", [
    (("--calibration", "minmax", "--percentile", "90"), "--percentile", "--calibration percentile"),
    (("--percentile", "99.99"), "--percentile", "--calibration percentile"),  # given at its default: given
    (("--calibration", "mse", "--percentile", "99"), "--percentile", "--calibration percentile"),
    (("--budget-bits", "4", "--engine", "local", "--task-cpus", "2"), "--task-cpus", "--engine ray"),
    (("--budget-bits", "4", "--engine", "serial", "--task-cpus", "1", "--task-gpus", "1"), "--task-cpus, --task-gpus",
     "--engine ray"),
    (("--budget-bits", "4", "--task-gpus", "0"), "--task-gpus", "--engine ray"),  # auto is local or serial
    (("--budget-bits", "4", "--ray-address", "auto"), "--ray-address", "--engine ray"),  # named the Python field
    (("--workers", "2"), "--workers", WORKERS_NEEDS),  # nothing runs on an engine
    (("--budget-bits", "4", "--engine", "serial", "--workers", "2"), "--workers", WORKERS_NEEDS),
    # rtn rounds each weight alone: the solver's options were accepted and ignored (survey 18)
    (("--method", "rtn", "--damp", "0.5", "--order", "natural", "--solver-target", "layer", "--block-size", "16"),
     "--order, --damp, --solver-target, --block-size", "--method solver"),
    (("--method", "rtn", "--damp", "0.01"), "--damp", "--method solver"),  # given at its default: given
])
def test_flags_that_would_be_ignored_are_refused_before_compute(tmp_path, mlp_files, extra, flags, needs):
    out = tmp_path / "x.onnx"
    code, stdout, err = run_main(_compress_args(mlp_files, out, *extra))
    assert code == 2 and stdout == "" and not out.exists()
    assert err.strip() == f"error: {MSG_ONLY_WITH.format(flags=flags, needs=needs)}"


def test_an_ignored_flag_error_names_the_flag_and_the_option_that_reads_it(tmp_path, mlp_files):
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "x.onnx", "--percentile", "90"))
    assert code == 2 and err.strip() == ("error: --percentile: used only with --calibration percentile, so they would "
                                         "be ignored here; use --calibration percentile, or drop them")
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "x.onnx", "--workers", "2"))
    needs = ("--finetune, or a budget with --engine local or auto, or --engine ray without --ray-address (a running "
             "cluster has its own CPUs)")
    assert code == 2 and err.strip() == (f"error: --workers: used only with {needs}, so they would be ignored here; "
                                         f"use {needs}, or drop them")
    # survey 64: a running cluster's own CPUs decide, --workers was ignored without a word
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "x.onnx", "--budget-bits", "4", "--engine", "ray",
                                           "--ray-address", "auto", "--workers", "7"))
    assert code == 2 and err.startswith("error: --workers: used only with") and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("extra", [
    ("--calibration", "percentile", "--percentile", "99.9"),
    ("--budget-bits", "4", "--engine", "ray", "--task-cpus", "2", "--task-gpus", "0.5"),
    ("--budget-bits", "4", "--workers", "2"),
    ("--budget-bits", "4", "--engine", "local", "--workers", "2"),
    ("--finetune", "--train", "train.npz", "--workers", "2"),  # the DataLoader's workers
    ("--finetune", "--train", "train.npz", "--budget-bits", "4", "--engine", "serial", "--workers", "2"),
    ("--finetune", "--train", "train.npz", "--learn-bits", "--budget-bits", "3", "--workers", "2"),
])
def test_flags_that_count_pass_the_checks(tmp_path, extra):
    args = build_parser().parse_args(["compress", "--model", "m:f", "--calib", "c.npz",
                                      "--out", str(tmp_path / "x.onnx"), *extra])
    args.check(args)  # no ConfigError


def test_solver_target_flag_reaches_the_metadata(tmp_path, mlp_files, tests_dir, monkeypatch):

    monkeypatch.chdir(tests_dir)
    metas = {}
    for target in ("layer", None):
        out = tmp_path / f"{target}.onnx"
        extra = ["--solver-target", target] if target else []
        code, _, err = run_main(_compress_args(mlp_files, out, "--weight-bits", "4", *extra))
        assert code == 0, err
        metas[target] = read_metadata(str(out))
    assert metas["layer"].solver_target == "layer"
    assert metas[None].solver_target == "float-output"
    with pytest.raises(SystemExit) as info:
        run_main(_compress_args(mlp_files, tmp_path / "x.onnx", "--solver-target", "output"))
    assert info.value.code == 2


def test_float_out_writes_the_reference_validate_takes(tmp_path, mlp_files, mlp_model, mlp_data, tests_dir,
                                                        monkeypatch):
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_compress_args(mlp_files, tmp_path / "q.onnx", "--float-out", tmp_path / "f.onnx",
                                            "--no-speed-check"))
    assert code == 0, err
    assert f"wrote the float reference {tmp_path / 'f.onnx'}" in stdout
    with torch.no_grad():
        want = mlp_model.eval()(torch.from_numpy(mlp_data.x[:50])).numpy()
    got = run_batches(make_session(tmp_path / "f.onnx"), mlp_data.x[:50], 50)
    np.testing.assert_allclose(got, want, atol=1e-4)  # the float model, not the quantized one
    code, stdout, err = run_main(["validate", tmp_path / "q.onnx", "--data", mlp_files / "calib.npz", "--reference",
                              tmp_path / "f.onnx", "--no-latency", "--max-group-drop", 5])
    assert code == 0, err
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "q2.onnx", "--float-out", mlp_files / "calib.npz"))
    assert code == 2 and "--float-out" in err


def test_tables_align_group_names_in_any_script(capsys):
    """Columns are padded by terminal width: a CJK character takes two columns, a combining
    mark none, so the next column starts at the same place on every row."""
    from fqexport.cli.common import display_width, print_table

    assert display_width("群") == 2 and display_width("e\u0301") == 1 and display_width("Ünïcødé 群") == 10
    print_table([{"group": "Ünïcødé 群", "acc": "1.0"}, {"group": "b", "acc": "0.5"}], ["group", "acc"])
    lines = capsys.readouterr().out.splitlines()
    assert [display_width(line[:line.rindex(" ") + 1]) for line in (lines[0], lines[2], lines[3])] == [12, 12, 12]


def test_a_pinned_width_outside_the_measured_ones_shows_not_measured(tmp_path, mlp_files, tests_dir, monkeypatch):
    """A layer pinned at a width the sensitivity did not measure has no entry: the table says so
    instead of "nan" (survey 14)."""
    monkeypatch.chdir(tests_dir)
    code, stdout, err = run_main(_compress_args(
        mlp_files, tmp_path / "mp.onnx", "--budget-bits", "6", "--bit-choices", "4,8", "--pin", "fc1=5",
        "--candidates", "1", "--method", "rtn"))
    assert code == 0, err
    table = stdout.split("mixed precision (worst-group, budget bits 6):\n")[1].split("\n\n")[0]
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "not measured" in rows["fc1"] and "nan" not in table


def test_group_weights_name_a_group_whose_name_holds_a_comma(mlp_files, mlp_data, tests_dir, tmp_path, monkeypatch):
    """'--group-weights "I,II=2,III=1"' was split at every comma: "I" had no '=' (survey 29)."""
    from fqexport.calibration.npz import save_npz
    from fqexport.cli.common import parse_group_assignments
    from fqexport.errors import ConfigError

    assert parse_group_assignments("I,II=2,III=1", "--group-weights") == {"I,II": 2.0, "III": 1.0}
    assert parse_group_assignments("a=1.5", "--group-weights") == {"a": 1.5}
    with pytest.raises(ConfigError, match=r"--group-weights 'c': expected NAME=W"):
        parse_group_assignments("a=1,c", "--group-weights")
    # names holding ',' and '=' (intersectional key=value names) end at a '=NUMBER' (survey 52)
    assert parse_group_assignments("sex=F,age=60+=3,sex=M,age<60=1", "--group-weights") == {
        "sex=F,age=60+": 3.0, "sex=M,age<60": 1.0}
    with pytest.raises(ConfigError, match=r"--group-weights 'b=x': W must be a number"):
        parse_group_assignments("a=1,b=x", "--group-weights")
    named = type(mlp_data)(mlp_data.x, mlp_data.y, mlp_data.group, ("I,II", "III"), "calib.npz")
    save_npz(named, tmp_path / "named.npz")
    monkeypatch.chdir(tests_dir)
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "m.onnx", "--group-weights", "I,II=2,III=1",
                                           "--no-speed-check", calib=tmp_path / "named.npz"))
    assert code == 0, err
    assert read_metadata(str(tmp_path / "m.onnx")).settings["group_weights"] == {"I,II": 2.0, "III": 1.0}


def test_a_compress_that_stops_leaves_no_earlier_report_beside_its_outputs(compressed, mlp_files, tmp_path):
    """Run 2 stopped after writing its --out (Ctrl-C in the speed check) or on an error: run 1's --report,
    describing another file, was left beside it (survey 58). Only a compress report is removed."""
    import shutil

    _, _, _, d = compressed
    report = tmp_path / "report.json"
    shutil.copy(d / "report.json", report)
    assert _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--num-calib", "0", "--report", report))
    assert not report.exists()
    other = tmp_path / "theirs.json"
    other.write_text('{"not": "a compress report"}')
    assert _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--num-calib", "0", "--report", other))
    assert other.read_text() == '{"not": "a compress report"}'


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_are_drawn_on_a_terminal_only(terminal, tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    err = _Terminal() if terminal else io.StringIO()
    argv = _compress_args(mlp_files, tmp_path / "m.onnx")[1:]  # without -q
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main([str(a) for a in argv]) == 0
    assert ("quantize (solver)" in err.getvalue()) == terminal, err.getvalue()


@pytest.mark.parametrize("argv, flag", [
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "o.onnx", "--report", ""], "--report"),
    (["compress", "--model", "m:f", "--calib", "c.npz", "--out", "o.onnx", "--float-out="], "--float-out"),
    (["validate", "m.onnx", "--data", "t.npz", "--report-dir", ""], "--report-dir"),
    (["sweep", "--model", "m:f", "--calib", "c.npz", "--budgets", "3", "--out-dir", ""], "--out-dir"),
    (["demo", "--out-dir", ""], "--out-dir"),
])
def test_an_empty_value_is_refused_naming_its_flag(tmp_path, monkeypatch, argv, flag):
    """survey 76: an unset CI variable (--report "") wrote nothing, or wrote into the working folder,
    with exit 0."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv)
    assert code == 2 and err == (f"error: {flag}: an empty value (an unset variable in a CI script?); give one, "
                                 f"or leave {flag} out\n")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_empty_report_dir_removes_nothing_from_the_working_folder(tmp_path, monkeypatch):
    """survey 78: `--report-dir ""` was refused, but first removed the working folder's report.json and
    report.md (an earlier run's, maybe another model's): "" names no folder."""
    from fqexport.validation.reports import REPORT_JSON, REPORT_MD, write_json_data

    monkeypatch.chdir(tmp_path)
    write_json_data({"passed": True, "fqexport_version": "0.2.0"}, tmp_path / REPORT_JSON)
    (tmp_path / REPORT_MD).write_text("# fqexport validation: PASS\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_main(["validate", "m.onnx", "--data", "t.npz", "--report-dir", ""])
    assert code == 2 and "--report-dir: an empty value" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_flag_given_twice_is_warned_about_and_the_last_counts(mlp_files, tmp_path):
    """survey 76: `--min-acc 99.9 --min-acc 0` passed a gate silently; a script may override a flag
    it set (argparse's rule), so the last still counts, with a warning."""
    code, _, err = run_main(_compress_args(mlp_files, tmp_path / "o.onnx", "--num-calib", "0"))
    assert code == 2
    assert err.splitlines()[0].startswith("warning: --num-calib given 2 times (200, 0): the last, 0, counts")
    assert "error: --num-calib: num_calib=0 must be >= 1" in err


def test_trust_pickle_with_a_factory_spec_is_refused_as_ignored(mlp_files, tmp_path):
    """survey 76: a factory spec unpickles nothing (its --weights: weights_only=True), so
    --trust-pickle was silently ignored where every other ignored flag is refused."""
    err = _bad_input(_compress_args(mlp_files, tmp_path / "o.onnx", "--trust-pickle"))
    assert "error: --trust-pickle: used only with a --model that is a pickled module file or a .pt2 program" in err
