"""Interrupted writes: SIGINT and SIGTERM remove the temp file and exit 128+n; SIGKILL leaves
``.<name>.fqexport-<writer>-<pid>.tmp``, which the next write of the same output removes."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safety_helpers import cli_env, compress_args, first_line

from fqexport.atomic import atomic_write, stale_temp_files, temp_path, writer_key

# The real CLI (its main(), its signal handling), with compress replaced by a slow atomic write.
# SIGINT gets Python's own handler back: a shell starts background jobs (``cmd &``, as CI runners
# may) with SIGINT ignored, and Python then never raises KeyboardInterrupt — a terminal's Ctrl-C
# is what this models.
SCRIPT = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pathlib import Path
    import fqexport.cli.compress as c
    from fqexport.atomic import atomic_write
    from fqexport.cli import main
    def slow(tmp):
        tmp.write_bytes(b"partial")
        time.sleep(120)
    c.run_compress = lambda args: atomic_write(Path(args.out), slow)
    sys.exit(main(sys.argv[1:]))
""")


def _start(folder, name):
    (folder / "mlp.pt").touch()
    (folder / "calib.npz").touch()
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *compress_args("--out", name)], cwd=folder,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_signals_during_a_write_then_rerun(tmp_path):
    sigs = {"int": signal.SIGINT, "term": signal.SIGTERM, "kill": signal.SIGKILL}
    procs = {}
    for key in sigs:
        (tmp_path / key).mkdir()
        procs[key] = _start(tmp_path / key, "o.onnx")  # all three start at once: imports overlap
    for key, proc in procs.items():
        tmp = temp_path(tmp_path / key / "o.onnx", proc.pid)
        deadline = time.time() + 240
        while not tmp.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(sigs[key])
    results = {key: (proc.wait(180), proc.stderr.read()) for key, proc in procs.items()}

    assert results["int"][0] == 130, results["int"][1][-2000:]
    assert first_line(results["int"][1]) == "interrupted by SIGINT; no partial output was left"
    assert results["term"][0] == 143, results["term"][1][-2000:]
    assert first_line(results["term"][1]) == "interrupted by SIGTERM; no partial output was left"
    for key in ("int", "term"):
        assert sorted(os.listdir(tmp_path / key)) == ["calib.npz", "mlp.pt"]

    assert results["kill"][0] == -signal.SIGKILL
    left = tmp_path / "kill" / f".o.onnx.fqexport-{writer_key()}-{procs['kill'].pid}.tmp"
    assert left.exists() and stale_temp_files(tmp_path / "kill" / "o.onnx") == [left]
    atomic_write(tmp_path / "kill" / "o.onnx", lambda tmp: tmp.write_bytes(b"done"))  # the rerun
    assert sorted(os.listdir(tmp_path / "kill")) == ["calib.npz", "mlp.pt", "o.onnx"]
    assert (tmp_path / "kill" / "o.onnx").read_bytes() == b"done"


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = temp_path(tmp_path / "o.onnx", other.pid)
        live.write_bytes(b"in progress")
        atomic_write(tmp_path / "o.onnx", lambda tmp: tmp.write_bytes(b"x"))
        assert live.exists()
    finally:
        other.kill()
        other.wait()


def test_another_hosts_or_namespaces_writer_is_neither_collided_with_nor_judged(tmp_path):
    """survey 97: two CI containers writing one output on a shared volume, both pid 1, shared the temp
    name `.o.onnx.fqexport-1.tmp`: the second unlinked the first's file and reused the name, and the
    first's rename put the second's half-written file in place. The name carries a hash of the host
    and PID namespace; another writer's temp file, whatever its pid, is left alone."""
    import re

    mine = temp_path(tmp_path / "o.onnx", 1)
    assert re.fullmatch(r"\.o\.onnx\.fqexport-[0-9a-f]{8}-1\.tmp", mine.name) and writer_key() in mine.name
    theirs = tmp_path / f".o.onnx.fqexport-{'0' * 8 if writer_key() != '0' * 8 else '1' * 8}-{os.getpid()}.tmp"
    dead = tmp_path / f".o.onnx.fqexport-{'f' * 8 if writer_key() != 'f' * 8 else 'e' * 8}-999999999.tmp"
    for other in (theirs, dead):
        other.write_bytes(b"another container's write in progress")
    assert stale_temp_files(tmp_path / "o.onnx") == []  # not this namespace's: not judged
    atomic_write(tmp_path / "o.onnx", lambda tmp: tmp.write_bytes(b"mine"))
    assert (tmp_path / "o.onnx").read_bytes() == b"mine"
    assert theirs.read_bytes() == dead.read_bytes() == b"another container's write in progress"


def _compress_that_writes_then_raises(tmp_path, monkeypatch, error: BaseException) -> int:
    """The CLI's compress, in ``tmp_path``, replaced by one that writes ``--out`` (o.onnx) then
    raises ``error``: its exit code."""
    import fqexport.cli.compress as c
    from fqexport.cli import main

    def half(args):
        atomic_write(tmp_path / "o.onnx", lambda tmp: tmp.write_bytes(b"done"))
        raise error

    monkeypatch.setattr(c, "run_compress", half)
    (tmp_path / "mlp.pt").touch()
    (tmp_path / "calib.npz").touch()
    monkeypatch.chdir(tmp_path)
    return main(compress_args("--out", "o.onnx"))


def test_a_late_interrupt_names_the_outputs_already_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C after ``--out`` was written and before ``--float-out``: the message names the file
    that was finished, rather than claiming nothing was left."""
    assert _compress_that_writes_then_raises(tmp_path, monkeypatch, KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert first_line(err) == ("interrupted by SIGINT; no half-written file was left, but these outputs were "
                               f"finished before it: {tmp_path / 'o.onnx'}")
    assert sorted(os.listdir(tmp_path)) == ["calib.npz", "mlp.pt", "o.onnx"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no "Exception ignored" report
def test_a_signal_that_lands_where_python_swallows_exceptions_still_ends_the_run(tmp_path, monkeypatch, capsys):
    """A SIGTERM that arrived inside a weakref callback (the garbage collection of torch/onnx objects) was
    printed as 'Exception ignored in: ...' and the run went on to exit 0: a CI cancel reported as a
    success (survey 58). The handler records the signal, and the run's exit code is the signal's."""
    import weakref

    import fqexport.cli.compress as c
    from fqexport.cli import main

    class Held:
        pass

    def run(args):
        held = Held()
        ref = weakref.ref(held, lambda _: os.kill(os.getpid(), signal.SIGTERM))  # lands in the callback
        del held
        assert ref() is None
        return 0  # the rest of the run went on

    monkeypatch.setattr(c, "run_compress", run)
    (tmp_path / "mlp.pt").touch()
    (tmp_path / "calib.npz").touch()
    monkeypatch.chdir(tmp_path)
    assert main(compress_args("--out", "o.onnx")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM; no partial output was left" in err
    # the swallowed exception is not reported as a traceback before the message (survey 81)
    assert "Exception ignored" not in err and "Traceback" not in err, err
    import importlib

    cli_main = importlib.import_module("fqexport.cli.main")

    assert signal.getsignal(signal.SIGTERM) is not cli_main._raise_signalled  # the handlers are given back


def test_an_interrupt_while_the_arguments_are_parsed_exits_130_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C in the first ~0.3 s (loading and parsing, before the handlers were installed) printed
    a KeyboardInterrupt traceback and ended by the signal."""
    cli_main = importlib.import_module("fqexport.cli.main")  # the module (the package's `main` is its function)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["demo"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted by SIGINT; no partial output was left" and "Traceback" not in err


def test_an_interrupt_while_the_command_line_loads_exits_130_without_a_traceback():
    """The package's import of the CLI is guarded too: a KeyboardInterrupt raised while it loads
    (here by a module the import meets) ends with the interrupt's exit code and one line."""
    script = textwrap.dedent("""
        import builtins, sys
        real = builtins.__import__
        def interrupting(name, *a, **k):
            if name == "fqexport.cli.flags.compress":
                raise KeyboardInterrupt
            return real(name, *a, **k)
        builtins.__import__ = interrupting
        from fqexport.cli import main
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 130 and r.stderr.strip() == "interrupted by SIGINT while fqexport started; nothing was written"


def test_scratch_writes_are_not_outputs_an_interrupt_names(tmp_path):
    """compress's speed check timed a float reference in a temporary folder, and a late Ctrl-C listed
    that deleted file among the run's finished outputs (survey 81)."""
    from fqexport.atomic import outputs_written, scratch_writes

    before = len(outputs_written())
    with scratch_writes():
        atomic_write(tmp_path / "scratch.onnx", lambda tmp: tmp.write_bytes(b"x"))
    atomic_write(tmp_path / "out.onnx", lambda tmp: tmp.write_bytes(b"y"))
    assert outputs_written()[before:] == (tmp_path / "out.onnx",)
    assert (tmp_path / "scratch.onnx").read_bytes() == b"x"  # written all the same


def test_an_error_after_an_output_was_written_names_it(tmp_path, monkeypatch, capsys):
    """--out written, then --float-out failed (disk full): exit 2 said nothing of the new --out, which a
    later CI step could take for an earlier run's (survey 81)."""
    from fqexport.errors import OutputPathError

    full = OutputPathError(f"cannot write {tmp_path / 'f.onnx'}: No space left on device")
    assert _compress_that_writes_then_raises(tmp_path, monkeypatch, full) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot write {tmp_path / 'f.onnx'}: No space left on device",
        f"note: these outputs were finished before the error, and are from this run: {tmp_path / 'o.onnx'}"]


def test_an_out_of_memory_error_after_an_output_names_it_too(tmp_path, monkeypatch, capsys):
    """Review: the note was given after an OutputPathError, not after running out of memory."""
    assert _compress_that_writes_then_raises(tmp_path, monkeypatch, MemoryError()) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"note: these outputs were finished before the error, and are from this run: {tmp_path / 'o.onnx'}")


def test_the_unraisable_hook_leaves_an_interrupt_it_did_not_record_to_python(monkeypatch):
    """Review: under a host's own SIGINT handler (main() leaves it alone) a KeyboardInterrupt
    swallowed in a __del__ was dropped without a word; it goes to Python's report as before."""
    from types import SimpleNamespace

    cli_main = importlib.import_module("fqexport.cli.main")
    seen = []
    hook = cli_main._unraisable(seen.append)
    monkeypatch.setattr(cli_main, "_SIGNALS_SEEN", [signal.SIGINT])
    host = SimpleNamespace(exc_value=KeyboardInterrupt())
    hook(host)  # the host's handler is installed, not ours: not ours to take
    assert seen == [host]
    monkeypatch.setattr(signal, "getsignal", lambda s: cli_main._raise_interrupt)
    hook(SimpleNamespace(exc_value=KeyboardInterrupt()))  # ours, recorded: taken quietly
    hook(SimpleNamespace(exc_value=cli_main._Signalled(signal.SIGTERM)))
    assert seen == [host]
    error = SimpleNamespace(exc_value=ValueError("a real error"))
    hook(error)
    assert seen == [host, error]


def test_an_older_versions_temp_file_of_a_dead_writer_is_still_removed(tmp_path):
    """review 100: a `.<name>.fqexport-<pid>.tmp` left by a version before the writer key was never
    cleaned up after upgrading."""
    old = tmp_path / ".o.onnx.fqexport-999999999.tmp"
    old.write_bytes(b"killed mid-write")
    assert stale_temp_files(tmp_path / "o.onnx") == [old]
    atomic_write(tmp_path / "o.onnx", lambda tmp: tmp.write_bytes(b"done"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
