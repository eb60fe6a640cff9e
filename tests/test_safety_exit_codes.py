"""The exit-code map: 0 ok, 1 only a broken validation limit, 2 bad input, 3 an internal error
(traceback only with --debug); -q/--quiet and --debug accepted after every subcommand."""

from __future__ import annotations

import contextlib
import io

import pytest
from safety_helpers import first_line, make_inputs, run_cli, snapshot, tiny_onnx

import fqexport.cli.analyze as analyze_cli
from fqexport.cli import build_parser, main


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture()
def work(tmp_path):
    return make_inputs(tmp_path)


def test_scalar_output_onnx_is_bad_input_not_a_failed_limit(work):
    tiny_onnx(work / "scalar.onnx", scalar_output=True)
    before = snapshot(work)
    code, _, err = run_cli(["validate", "scalar.onnx", "--data", "calib.npz", "--no-latency", "--no-kernel-check"], work)
    assert code == 2
    assert first_line(err) == ("error: model scalar.onnx on data calib.npz: the ONNX model returns a scalar (shape []); "
                               "fqexport validates classifiers whose first output is logits [N, C]")
    assert snapshot(work) == before


def test_a_broken_limit_is_1_and_a_passing_run_0(work):
    args = ["validate", work / "model.onnx", "--data", work / "calib.npz", "--no-latency", "--no-kernel-check"]
    assert _main(args)[0] == 0
    assert _main([*args, "--min-acc", "100"])[0] == 1


def test_an_unexpected_exception_is_internal_error_3(work, monkeypatch):
    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(analyze_cli, "run_analyze", boom)
    args = ["analyze", "--model", "fixtures_models:tiny_mlp", "--data", work / "calib.npz"]
    code, _, err = _main(args)
    assert code == 3
    assert err.strip() == ("internal error: RuntimeError: something broke — this is a bug in fqexport, please report "
                           "it with the command line and the output of the same command with --debug")
    code, _, err = _main([*args, "--debug"])
    assert code == 3 and err.startswith("Traceback (most recent call last):")


def test_torchs_out_of_memory_is_bad_input_with_advice(work, monkeypatch):
    """torch raises RuntimeError (DefaultCPUAllocator), not MemoryError: it was "a bug in fqexport",
    exit 3 (survey 24)."""
    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 268435456 bytes")

    monkeypatch.setattr(analyze_cli, "run_analyze", oom)
    code, _, err = _main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", work / "calib.npz"])
    assert code == 2
    assert err.startswith("error: out of memory: [enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                          "allocate memory") and err.strip().endswith("use fewer samples (--num-calib, --batch-size), "
                                                                       "a smaller model, or a higher memory limit "
                                                                       "(ulimit -v, the container's)")


def test_a_closed_stdout_ends_quietly_with_sigpipes_code(work, monkeypatch):
    """`fqexport validate ... | head`: the reader went away; 141 like any Unix tool, not an
    "internal error" (survey 17)."""
    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(analyze_cli, "run_analyze", closed)
    code, _, err = _main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", work / "calib.npz"])
    assert code == 141 and err == ""


def test_a_stdout_that_closes_early_or_cannot_encode_still_gets_every_file(work):
    """survey 97: `compress ... --report r.json | true` exited 141 without writing the report, and an ASCII
    stdout (PYTHONIOENCODING=ascii) turned the summary's dash into exit 3 "this is a bug" after the
    files were written. A closed stdout now drops the rest of the console and the run finishes its
    files (141 at the end); a character stdout cannot encode is written escaped (exit 0)."""
    import subprocess
    import sys

    from safety_helpers import cli_env, compress_args

    command = [sys.executable, "-m", "fqexport.cli", *compress_args("--out", "m.onnx", "--report", "r.json")]
    reader = subprocess.Popen(command, cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # the reader went away before the first line (`| true`)
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=300) == 141 and err == "", err
    assert (work / "m.onnx").is_file() and (work / "r.json").is_file()
    ascii_env = dict(cli_env(), PYTHONIOENCODING="ascii")
    run = subprocess.run([*command[:-4], "--out", "a.onnx", "--no-speed-check"], cwd=work, env=ascii_env,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout.decode("ascii")
    assert "\\u2014 passed" in out and (work / "a.onnx").is_file()


def test_a_full_disk_under_a_working_file_is_bad_input_naming_the_way_out(work, monkeypatch):
    """survey 97: a full temporary folder or `ulimit -f` under the export check's working copy gave exit
    3 "this is a bug" (OSError: File too large); also when a library wraps the OSError."""
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/x/check.onnx")

    monkeypatch.setattr(analyze_cli, "run_analyze", full)
    argv = ["analyze", "--model", "fixtures_models:tiny_mlp", "--data", work / "calib.npz"]
    code, _, err = _main(argv)
    assert code == 2 and first_line(err).startswith(
        "error: cannot write /tmp/x/check.onnx: No space left on device; free space on its disk, set TMPDIR")

    def wrapped(args):
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from e

    monkeypatch.setattr(analyze_cli, "run_analyze", wrapped)
    code, _, err = _main(argv)
    assert code == 2 and first_line(err).startswith("error: cannot write a working file: File too large;")


@pytest.mark.parametrize("command", ["compress", "validate", "analyze", "sweep", "demo"])
def test_quiet_and_debug_accepted_after_every_subcommand(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"-q", "--quiet", "--debug", "-v"} <= flags


def test_a_memory_limit_hit_loading_a_library_or_a_session_is_said_as_memory(work, monkeypatch):
    """survey 97: under `ulimit -v` torch's import failed with "libtorch_cpu.so: failed to map segment"
    (exit 3 "this is a bug") and ONNX Runtime's "pthread_create failed ... Cannot allocate memory" was
    blamed on the file ("Is it a complete, valid .onnx file?")."""
    import pytest as _pytest

    from fqexport.exporters.ort_session import make_session

    def unmappable(args):
        raise ImportError("libtorch_cpu.so: failed to map segment from shared object")

    monkeypatch.setattr(analyze_cli, "run_analyze", unmappable)
    code, _, err = _main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", work / "calib.npz"])
    assert code == 2 and first_line(err).startswith("error: out of memory: libtorch_cpu.so: failed to map segment")

    import onnxruntime as ort

    def no_threads(*a, **k):
        raise RuntimeError("pthread_create failed: Cannot allocate memory")

    monkeypatch.setattr(ort, "InferenceSession", no_threads)
    with _pytest.raises(MemoryError, match="ONNX Runtime ran out of memory opening .*model.onnx: pthread_create"):
        make_session(work / "model.onnx")


def test_the_stdout_guard_leaves_a_missing_stdout_and_other_threads_alone(work, monkeypatch):
    """review 100: with sys.stdout None (pythonw) the guard's own write raised AttributeError (exit 3),
    and two calls from threads restored sys.stdout out of order, leaving a finished command's guard
    in place; a bug raised while handling a full disk was said as a full disk."""
    import errno
    import sys
    import threading

    printed = []

    def prints(args):
        printed.append(sys.stdout)
        print("a line")
        return 0

    monkeypatch.setattr(analyze_cli, "run_analyze", prints)
    argv = ["analyze", "--model", "fixtures_models:tiny_mlp", "--data", str(work / "calib.npz")]
    monkeypatch.setattr(sys, "stdout", None)
    assert main(argv) == 0 and printed == [None]
    monkeypatch.undo()
    monkeypatch.setattr(analyze_cli, "run_analyze", prints)
    before, codes = sys.stdout, []
    thread = threading.Thread(target=lambda: codes.append(main(argv)))
    thread.start()
    thread.join()
    assert codes == [0] and sys.stdout is before and printed[-1] is before  # not swapped from a thread

    def bug_while_full(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            return {}["missing"]

    monkeypatch.setattr(analyze_cli, "run_analyze", bug_while_full)
    code, _, err = _main(argv)
    assert code == 3 and "KeyError" in err
