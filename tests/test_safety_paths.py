"""Outputs never destroy inputs: every output path is resolved (symlinks, files inside
--out-dir/--report-dir) and compared with every input and output before any compute."""

from __future__ import annotations

import onnx
import pytest
from safety_helpers import compress_args, first_line, make_inputs, run_cli, snapshot

from fqexport.cli.paths import Output, check_paths
from fqexport.errors import OutputPathError


@pytest.fixture()
def work(tmp_path):
    return make_inputs(tmp_path)


@pytest.mark.parametrize("args, line", [
    (compress_args("--out", "calib.npz"),
     "error: --out calib.npz is the same file as --calib calib.npz: it would overwrite the input; choose another --out"),
    (["validate", "model.onnx", "--data", "calib.npz", "--junit", "model.onnx"],
     "error: --junit model.onnx is the same file as model model.onnx: it would overwrite the input; "
     "choose another --junit"),
])
def test_cli_refuses_an_output_equal_to_an_input(work, args, line):
    before = snapshot(work)
    code, out, err = run_cli(args, work)
    assert (code, first_line(err)) == (2, line)
    assert snapshot(work) == before  # nothing new, inputs unchanged byte for byte


@pytest.mark.parametrize("args, line", [
    (["validate", "model.onnx", "--data", "calib.npz", "--reference", "float.onnx", "--junit", "float.onnx.data"],
     "error: --junit float.onnx.data is the same file as --reference's external data float.onnx.data: it would "
     "overwrite the input; choose another --junit"),
    (["validate", "ext.onnx", "--data", "calib.npz", "--report-dir", ".", "--junit", "weights.bin"],
     "error: --junit weights.bin is the same file as model's external data weights.bin: it would overwrite the "
     "input; choose another --junit"),
    (["validate", "md.onnx", "--data", "calib.npz", "--report-dir", "."],
     "error: --report-dir (report.md) report.md is the same file as model's external data report.md: it would "
     "overwrite the input; choose another --report-dir (report.md)"),
])
def test_cli_refuses_an_output_equal_to_a_models_external_data(work, args, line):
    """Any location an ONNX file's tensors name (torch.onnx.export's <name>.onnx.data, 'weights.bin'),
    of the model and of --reference, is an input."""
    for name, location in (("float.onnx", "float.onnx.data"), ("ext.onnx", "weights.bin"), ("md.onnx", "report.md")):
        onnx.save(onnx.load(str(work / "model.onnx")), str(work / name), save_as_external_data=True,
                  location=location, size_threshold=0)
    before = snapshot(work)
    code, out, err = run_cli(args, work)
    assert (code, first_line(err)) == (2, line)
    assert snapshot(work) == before


def test_report_equal_to_out(work):
    with pytest.raises(OutputPathError) as info:
        check_paths([("--calib", work / "calib.npz")], [Output("--out", work / "o.onnx"), Output("--report", work / "o.onnx")])
    assert str(info.value) == (f"--report {work / 'o.onnx'} is the same file as --out {work / 'o.onnx'}: "
                               "one would overwrite the other; choose another --report")


def test_symlink_and_hard_link_to_an_input_are_the_same_file(work):
    (work / "link.pt").symlink_to(work / "mlp.pt")
    (work / "hard.pt").hardlink_to(work / "mlp.pt")
    for name in ("link.pt", "hard.pt"):
        with pytest.raises(OutputPathError, match=f"--out .*{name} is the same file as --weights"):
            check_paths([("--weights", work / "mlp.pt")], [Output("--out", work / name)])


def test_files_inside_an_output_folder_are_compared(work):
    (work / "pareto.json").write_text("{}")
    with pytest.raises(OutputPathError) as info:
        check_paths([("--calib", work / "pareto.json")], [Output("--out-dir", work, ("pareto.json", "pareto.csv"))])
    assert str(info.value).startswith(f"--out-dir (pareto.json) {work / 'pareto.json'} is the same file as --calib")


def test_distinct_paths_and_a_factory_spec_pass(work):
    before = sorted(p.name for p in work.iterdir())
    assert check_paths([("--model", "fixtures_models:tiny_mlp"), ("--weights", work / "mlp.pt"),
                        ("--calib", work / "calib.npz")],
                       [Output("--out", work / "o.onnx"), Output("--report", work / "r.json"), None]) is None
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written
    # the same outputs, one colliding with an input: the check is live on these paths
    with pytest.raises(OutputPathError, match="is the same file as --calib"):
        check_paths([("--calib", work / "calib.npz")], [Output("--out", work / "calib.npz")])


def test_an_output_equal_to_the_module_of_a_factory_or_decode_spec_is_refused(work, monkeypatch):
    """``compress --model mymodels:mlp --out mymodels.py`` replaced the model's source with ONNX bytes,
    exit 0 (survey 49): the module a spec imports is an input, found as the loader finds it (the
    working directory first) without importing it."""
    source = "from fixtures_models import tiny_mlp\n"
    (work / "mymodels.py").write_text(source)
    before = snapshot(work)
    code, out, err = run_cli(["compress", "--model", "mymodels:tiny_mlp", "--weights", "mlp.pt", "--calib",
                              "calib.npz", "--num-calib", "64", "--out", "mymodels.py"], work)
    assert (code, first_line(err)) == (2, f"error: --out mymodels.py is the same file as --model (module mymodels.py) "
                                          f"{work / 'mymodels.py'}: it would overwrite the input; choose another --out")
    assert snapshot(work) == before
    (work / "pkg").mkdir()
    (work / "pkg" / "__init__.py").write_text("")
    (work / "pkg" / "heads.py").write_text("def decode(out):\n    return out\n")
    monkeypatch.chdir(work)
    with pytest.raises(OutputPathError, match=r"--report .*heads.py is the same file as --decode \(module heads.py\)"):
        check_paths([("--decode", "pkg.heads:decode")], [Output("--report", work / "pkg" / "heads.py")])
