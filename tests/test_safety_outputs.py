"""Output locations are checked before any compute: a bad one exits 2 with one line naming
the flag, and leaves nothing behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from safety_helpers import compress_args, first_line, make_inputs, run_cli, snapshot

from fqexport.atomic import atomic_write
from fqexport.cli.paths import MSG_FOLDER_OF_OUTPUT, MSG_NO_FOLDER, Output, check_paths
from fqexport.errors import OutputPathError


@pytest.fixture()
def work(tmp_path):
    return make_inputs(tmp_path)


def test_cli_output_errors_come_before_compute(work):
    before = snapshot(work)
    for out, line in [
        ("/proc/x.onnx", "error: --out /proc/x.onnx is under /proc, which holds no user files; choose another --out"),
        ("calib.npz/x.onnx", f"error: --out calib.npz/x.onnx: {work / 'calib.npz'} is a file, not a folder; "
                             "choose another --out"),
        ("-", "error: --out -: fqexport writes files, not standard output; give a file path"),
    ]:
        start = time.perf_counter()
        code, stdout, err = run_cli(compress_args("--out", out), work)
        assert (code, first_line(err), stdout) == (2, line, "")
        assert time.perf_counter() - start < 120  # import time only; compress would take longer
    assert snapshot(work) == before


@pytest.mark.parametrize("flag, inside, rel, message", [
    ("--out", None, ".", "{flag} {path} is an existing directory; give a file name"),
    ("--out", None, "missing/o.onnx", "{flag} {path}: folder {work}/missing does not exist; create it first"),
    ("--report-dir", ("report.json",), "calib.npz/reports", "{flag} {path}: {work}/calib.npz is a file, not a folder; choose another {flag}"),
    ("--out-dir", ("pareto.json",), "calib.npz", "{flag} {path} is an existing file, not a directory; give a folder"),
    ("--json", None, "calib.npz/a/b.json", "{flag} {path}: {work}/calib.npz is a file, not a folder; choose another {flag}"),
    ("--junit", None, "/dev/null", "{flag} {path} is under /dev, which holds no user files; choose another {flag}"),
])
def test_bad_output_locations(work, flag, inside, rel, message):
    path = work / rel if not rel.startswith("/") else rel
    with pytest.raises(OutputPathError) as info:
        check_paths([], [Output(flag, path, inside)])
    assert str(info.value) == message.format(flag=flag, path=path, work=work)


def test_missing_output_folder_passes_the_check_and_is_created_by_the_write(work):
    folder = work / "new" / "reports"
    assert check_paths([], [Output("--report-dir", folder, ("report.json",))]) is None
    assert not (work / "new").exists()  # the check runs before any compute and writes nothing
    atomic_write(folder / "report.json", lambda tmp: tmp.write_text("{}"))
    assert (folder / "report.json").read_text() == "{}" and [p.name for p in folder.iterdir()] == ["report.json"]


def test_a_file_output_inside_an_output_folder_the_command_creates_passes(work):
    """docs/validation.md's CI example: --junit reports/validate.xml --report-dir reports, reports/ missing."""
    for junit, report_dir in (("reports/validate.xml", "reports"), ("new/validate.xml", "new/reports"),
                              ("reports/ci/validate.xml", "reports/ci")):
        outputs = [Output("--junit", work / junit), Output("--report-dir", work / report_dir, ("report.json",))]
        assert check_paths([], outputs) is None and check_paths([], outputs[::-1]) is None
    assert not (work / "reports").exists() and not (work / "new").exists()
    # a folder nothing creates still fails first, and a file cannot take the place of a folder to create
    with pytest.raises(OutputPathError) as info:
        check_paths([], [Output("--junit", work / "other" / "j.xml"), Output("--report-dir", work / "reports", ("r",))])
    assert str(info.value) == MSG_NO_FOLDER.format(flag="--junit", path=work / "other" / "j.xml",
                                                   parent=work / "other")
    with pytest.raises(OutputPathError) as info:
        check_paths([], [Output("--junit", work / "new"), Output("--report-dir", work / "new" / "reports", ("r",))])
    assert str(info.value) == MSG_FOLDER_OF_OUTPUT.format(flag="--junit", path=work / "new", other="--report-dir",
                                                          other_path=work / "new" / "reports")
    assert str(info.value) == (f"--junit {work / 'new'}: --report-dir {work / 'new' / 'reports'} creates a folder "
                               "there; choose another --junit")


def test_the_ci_example_writes_its_junit_into_the_report_dir_it_creates(work):
    code, out, err = run_cli(["validate", "model.onnx", "--data", "calib.npz", "--no-latency", "--no-plots",
                              "--no-kernel-check", "--junit", "reports/validate.xml", "--report-dir", "reports"], work)
    assert code == 0, err
    assert sorted(p.name for p in (work / "reports").iterdir()) == ["report.json", "report.md", "validate.xml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(work):
    (work / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputPathError, match="folder .*ro is not writable"):
        check_paths([], [Output("--out", work / "ro" / "o.onnx")])


def test_atomic_write_applies_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "r.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_dot_dot_through_a_missing_folder_is_refused_not_created(work):
    """``--junit nope/../j.xml`` resolved to ``j.xml`` and passed the check; the write then created an
    empty ``nope/`` (survey 58)."""
    with pytest.raises(OutputPathError) as info:
        check_paths([], [Output("--junit", work / "nope" / ".." / "j.xml")])
    assert str(info.value) == MSG_NO_FOLDER.format(flag="--junit", path=work / "nope" / ".." / "j.xml", parent=work / "nope")
    assert not (work / "nope").exists()
    (work / "here").mkdir()
    check_paths([], [Output("--junit", work / "here" / ".." / "j.xml")])  # an existing folder's ".." is fine


def test_an_output_that_is_one_of_a_manifests_images_is_refused(tmp_path):
    """survey 79: `validate --data img/m.csv --junit img/i0.png` turned the image into JUnit XML."""
    (tmp_path / "img").mkdir()
    for name in ("i0.png", "i1.png"):
        (tmp_path / "img" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    manifest = tmp_path / "img" / "m.csv"
    manifest.write_text("path,label,group\ni0.png,0,a\n" + f"{tmp_path / 'img' / 'i1.png'},1,b\n")
    for image in ("i0.png", "i1.png"):
        with pytest.raises(OutputPathError, match=rf"^--junit .*{image} is the same file as --data \(an image it names\)"):
            check_paths([("--data", manifest)], [Output("--junit", tmp_path / "img" / image)])
    check_paths([("--data", manifest)], [Output("--junit", tmp_path / "img" / "j.xml")])  # another file: fine


def test_a_dash_output_is_refused_as_standard_output_and_dot_slash_dash_is_a_file(work, monkeypatch):
    """'-' is no file name fqexport writes; './-' is the file named '-' (Path shortened it to '-',
    refused as standard output: survey 85), for the flags parsed as paths too."""
    from fqexport.cli.flags.shared import output_path

    monkeypatch.chdir(work)
    for flag in ("--json", "--junit"):
        with pytest.raises(OutputPathError, match=rf"^{flag} -: fqexport writes files, not standard output; give a file path$"):
            check_paths([], [Output(flag, output_path("-"))])
        check_paths([], [Output(flag, output_path("./-"))])
    assert output_path("./-") == work / "-" and output_path("a/b.json") == Path("a/b.json")
