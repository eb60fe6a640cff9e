"""Command line: fqexport compress | validate | analyze | sweep | demo.

The CLI only parses arguments and calls the API. Each subcommand runs in two steps: its checks
(``fqexport.cli.flags``: every flag, flag combination and output path, before any stage is
imported, so a typo costs well under a second) and then its run (``COMMANDS``: the module that
imports the stage, loaded by name only now).

Exit codes: 0 ok; 1 a validation limit broken (and only that); 2 bad input: any other fqexport
error, a bad flag, an output path that collides or cannot be written (all before any compute),
and also errors found while running: a data or model file that does not load or fit, or an
export whose check against the PyTorch reference fails (no file is written then); 3 an internal
error (a bug: please report it; ``--debug`` prints the traceback); 128+n stopped by signal n
(130 SIGINT / Ctrl-C, 143 SIGTERM; temp files removed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence

from fqexport.atomic import outputs_written
from fqexport.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_FAILED,
    EXIT_INTERNAL,
    QUIET_HELP,
    HelpFormatter,
)
from fqexport.cli.flags.analyze import add_analyze_parser
from fqexport.cli.flags.compress import add_compress_parser
from fqexport.cli.flags.demo import add_demo_parser
from fqexport.cli.flags.finetune import FINETUNE_FIELDS
from fqexport.cli.flags.sweep import add_sweep_parser
from fqexport.cli.flags.validate import add_validate_parser
from fqexport.cli.paths import check_inputs_exist
from fqexport.errors import DISK_FULL_ERRNOS, ConfigError, FqexportError, ValidationFailed
from fqexport.validation.reports import remove_earlier_reports
from fqexport.version import __version__

OMP_WAIT_POLICY = "PASSIVE"  # the CLI's default for torch's OpenMP pool (see main)

# subcommand -> "module:function" that runs it, imported by name when the subcommand runs (after
# its checks passed); the one lazy import of the CLI (tests/test_import_graph.py checks it).
COMMANDS: dict[str, str] = {
    "compress": "fqexport.cli.compress:run_compress",
    "validate": "fqexport.cli.validate:run_validate",
    "analyze": "fqexport.cli.analyze:run_analyze",
    "sweep": "fqexport.cli.sweep:run_sweep",
    "demo": "fqexport.cli.demo:run_demo_command",
}

MSG_INTERNAL = (
    "internal error: {kind}: {err} — this is a bug in fqexport, please report it with the command "
    "line and the output of the same command with --debug"
)
MSG_INTERNAL_MEMORY = ("out of memory: {err}; use fewer samples (--num-calib, --batch-size), a smaller model, or a higher "
                       "memory limit (ulimit -v, the container's)")
MSG_DISK_FULL = ("cannot write {what}: {err}; free space on its disk, set TMPDIR to a folder with room (fqexport "
                 "writes working files in the temporary folder {tmp}) or raise the file-size limit (ulimit -f)")
MSG_SIGNAL = "interrupted by {name}; no partial output was left"
MSG_SIGNAL_WRITTEN = "interrupted by {name}; no half-written file was left, but these outputs were finished before it: {paths}"
MSG_ERROR_WRITTEN = "note: these outputs were finished before the error, and are from this run: {paths}"


class _Signalled(BaseException):
    """Raised by the SIGTERM handler so that ``finally`` blocks and temp-file cleanup run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# every SIGTERM/SIGINT the handlers saw: Python swallows an exception raised where the signal
# landed in a weakref callback or a __del__ ("Exception ignored in: ..."), and the run went on to exit 0
_SIGNALS_SEEN: list[int] = []


def _raise_signalled(signum, frame) -> None:
    _SIGNALS_SEEN.append(signum)
    raise _Signalled(signum)


def _raise_interrupt(signum, frame) -> None:
    _SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt


def _unraisable(previous: Callable) -> Callable:
    """A ``sys.unraisablehook`` that takes a signal handler's exception swallowed in a weakref
    callback or ``__del__`` quietly (no "Exception ignored in ..." traceback; the run then ends
    with the signal's exit code, :func:`_run`); every other unraisable exception goes to
    ``previous``."""

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        # ours only: a _Signalled, or a KeyboardInterrupt while our SIGINT handler (which records it
        # in _SIGNALS_SEEN, so that _run exits with it) is installed; a host's own goes to ``previous``
        if isinstance(err, _Signalled) or (isinstance(err, KeyboardInterrupt) and _SIGNALS_SEEN
                                           and signal.getsignal(signal.SIGINT) is _raise_interrupt):
            return
        previous(unraisable)

    return hook


def build_parser() -> argparse.ArgumentParser:
    """The ``fqexport`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fqexport", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fqexport {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_compress_parser(sub)
    add_validate_parser(sub)
    add_analyze_parser(sub)
    add_sweep_parser(sub)
    add_demo_parser(sub)
    return parser


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs subcommand ``name`` (``COMMANDS``), importing its module now."""
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _interrupted(name: str, before: int) -> str:
    """The interrupt message: the outputs this run finished before the signal, if any (a late
    interrupt may leave ``--out`` written and ``--float-out`` or ``--report`` not)."""
    done = _finished(before)
    return MSG_SIGNAL_WRITTEN.format(name=name, paths=done) if done else MSG_SIGNAL.format(name=name)


def _finished(before: int) -> str:
    """The outputs this run finished since ``outputs_written()[before]``, each once, comma separated."""
    return ", ".join(dict.fromkeys(str(p) for p in outputs_written()[before:]))


def _say_finished(before: int) -> None:
    """After an error: the outputs this run finished before it (``--out`` written, ``--float-out``
    failed), so that a later step does not take them for an earlier run's."""
    done = _finished(before)
    if done:
        print(MSG_ERROR_WRITTEN.format(paths=done), file=sys.stderr)


def _stopped(signum: int, before: int) -> int:
    """Say that signal ``signum`` ended the run (:func:`_interrupted`); its exit code, 128 + signum."""
    print(_interrupted(signal.Signals(signum).name, before), file=sys.stderr)
    return 128 + signum


# What torch's CPU and CUDA allocators say when an allocation fails (a RuntimeError, or
# torch.OutOfMemoryError, a RuntimeError subclass)
_OOM_TEXTS = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory", "out of memory")


# a library that cannot be mapped into memory (`ulimit -v`: "libtorch_cpu.so: failed to map segment")
_MAP_TEXTS = ("failed to map segment", "Cannot allocate memory", "cannot allocate memory")


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (ImportError, OSError)):
        return any(t in str(err) for t in _MAP_TEXTS)
    return isinstance(err, RuntimeError) and any(t in str(err) for t in _OOM_TEXTS)


def _disk_full(err: BaseException) -> OSError | None:
    """The OSError ``err`` is, or was raised from (``raise ... from``), that says a disk, a quota
    or the file-size limit is full (a working file in the temporary folder: the export check's
    copy, an activation spill). Not one it was merely raised while handling: a bug in handling a
    full disk is a bug."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        err = err.__cause__
    return None


MSG_EMPTY_VALUE = "{flag}: an empty value (an unset variable in a CI script?); give one, or leave {flag} out"
MSG_EMPTY_ARGUMENT = "an empty argument (an unset variable in a CI script?) on the command line: {argv}"
MSG_REPEATED = ("warning: {flag} given {n} times ({values}): the last, {last}, counts (argparse's rule, which lets a "
                "script override a flag it set; `--bits 4 8` gives several widths)")
# actions that take their flag once: a second occurrence replaces the first, silently before
# (`--min-acc 99.9 --min-acc 0` passed the gate; `analyze --bits 4 --bits 8` dropped W4)
_ONCE = (argparse._StoreAction,)


def _argv_problem(parser: argparse.ArgumentParser, name: str, argv: Sequence[str]) -> str | None:
    """What argparse lets through that a CI script cannot have meant: an empty value (``--report
    ""``, ``--out-dir=``: an unset variable, which wrote nothing or into the working folder); None
    when there is none. A single-value flag given twice (the last counts) is warned about on
    stderr (:data:`MSG_REPEATED`)."""
    action = _flag_resolver(parser, name)
    seen: dict[argparse.Action, list[str]] = {}
    takes_value = False
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "" and not takes_value:
            return MSG_EMPTY_ARGUMENT.format(argv=" ".join(repr(t) if not t else t for t in argv))
        takes_value = False
        if not token.startswith("--"):
            continue
        word, eq, value = token.partition("=")
        found = action(word)
        if found is None:
            continue
        if found.nargs != 0 and ((eq and not value) or (not eq and i + 1 < len(argv) and argv[i + 1] == "")):
            return MSG_EMPTY_VALUE.format(flag=found.option_strings[-1])
        takes_value = found.nargs != 0 and not eq
        seen.setdefault(found, []).append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    for found, values in seen.items():
        if isinstance(found, _ONCE) and len(values) > 1:
            print(MSG_REPEATED.format(flag=found.option_strings[-1], n=len(values), values=", ".join(values),
                                      last=values[-1]), file=sys.stderr)
    return None


def _flag_resolver(parser: argparse.ArgumentParser, name: str) -> Callable[[str], argparse.Action | None]:
    """``word`` (an option as typed) -> the action of subcommand ``name`` argparse takes it for:
    the exact option, else the unique ``--`` option it abbreviates; None for any other word."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    by_flag = {o: a for a in sub._actions for o in a.option_strings}

    def action(word: str) -> argparse.Action | None:
        if word in by_flag:
            return by_flag[word]
        if not word.startswith("--") or not sub.allow_abbrev:
            return None
        hits = {a for o, a in by_flag.items() if o.startswith("--") and o.startswith(word)}
        return hits.pop() if len(hits) == 1 else None

    return action


def _given_flags(parser: argparse.ArgumentParser, name: str, argv: Sequence[str]) -> dict[str, str]:
    """The options of subcommand ``name`` that ``argv`` gives, by the config field they set, each
    as typed or, abbreviated, in full (``{"num_calib": "--num-calib"}``: ``--num-c 0`` is named
    ``--num-calib`` in its error)."""
    action, given = _flag_resolver(parser, name), {}
    for word in (a.split("=", 1)[0] for a in argv if a.startswith("-")):
        found = action(word)
        if found is not None:
            given[found.dest] = word if word in found.option_strings else next(
                o for o in found.option_strings if o.startswith(word))
    return given


# config fields whose flag's dest is another word: MixedPrecisionConfig.pins <- --pin, its
# num_candidates <- --candidates, and the fine-tuning fields, named "FinetuneConfig.<field>" (its
# batch_size <- --ft-batch-size: compress's own --batch-size is another flag)
_FIELD_DESTS = {"pins": "pin", "num_candidates": "candidates", "FinetuneConfig.group_weights": "group_loss_weights",
                "MixedPrecisionConfig.group_weights": "objective_weights",
                **{f"FinetuneConfig.{field}": dest for dest, field in FINETUNE_FIELDS.items()}}


def _with_flag(err: FqexportError, flags: dict[str, str]) -> str:
    """A config error's message (``num_calib=0 must be >= 1``, ``pins['fc']=12 …``, ``pin 'x'
    matches no layer``, ``FinetuneConfig.batch_size=0 …``: the API's words) led by the
    command-line flag the user typed for that field (``--num-calib: num_calib=0 …``)."""
    field = re.match(r"(?:threshold )?((?:\w+\.)?\w+)(?:\[[^\]]*\])?[= ]", str(err))  # Thresholds': "threshold min_acc=…"
    name = field.group(1) if field else ""
    dest = _FIELD_DESTS.get(name) or _FIELD_DESTS.get(name.rpartition(".")[2], name.rpartition(".")[2])
    if isinstance(err, ConfigError) and dest in flags:
        return f"{flags[dest]}: {err}"
    return str(err)


def _signal_behind(err: BaseException) -> BaseException | None:
    """The interrupt (KeyboardInterrupt, :class:`_Signalled`) an exception was raised from or
    during: a signal handler's exception raised inside C code comes back wrapped (Ray's
    ``CoreWorker.wait``: "SystemError: ... returned a result with an exception set")."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (KeyboardInterrupt, _Signalled)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _run(args: argparse.Namespace, flags: dict[str, str] | None = None) -> int:
    """:func:`_run_command`'s exit code, unless a signal arrived that it never saw raised (swallowed
    in a weakref callback or ``__del__``): then the signal's exit code."""
    seen, before = len(_SIGNALS_SEEN), len(outputs_written())
    code = _run_command(args, flags, before)
    if code < 128 and len(_SIGNALS_SEEN) > seen:
        return _stopped(_SIGNALS_SEEN[seen], before)
    return code


def _run_command(args: argparse.Namespace, flags: dict[str, str] | None, before: int) -> int:
    try:
        args.check(args)
        check_inputs_exist(args)
        return int(command(args.command)(args))
    except ValidationFailed as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return EXIT_FAILED
    except FqexportError as err:
        print(f"error: {_with_flag(err, flags or {})}", file=sys.stderr)
        _say_finished(before)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT, before)
    except _Signalled as sig:
        return _stopped(sig.signum, before)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a Unix tool does
        _to_devnull(sys.stdout)
        return 128 + signal.SIGPIPE
    except MemoryError as err:
        print(f"error: {MSG_INTERNAL_MEMORY.format(err=err or 'an allocation failed')}", file=sys.stderr)
        _say_finished(before)
        return EXIT_BAD_INPUT
    except Exception as err:  # the last resort: never exit 1 (a broken limit) or with a bare traceback
        if (signalled := _signal_behind(err)) is not None:  # raised inside C code that wrapped it (Ray's wait)
            return _stopped(signal.SIGINT if isinstance(signalled, KeyboardInterrupt) else signalled.signum, before)
        if (full := _disk_full(err)) is not None:
            import tempfile

            what = full.filename or "a working file"
            print(f"error: {MSG_DISK_FULL.format(what=what, err=full.strerror or full, tmp=tempfile.gettempdir())}",
                  file=sys.stderr)
            _say_finished(before)
            return EXIT_BAD_INPUT
        if _out_of_memory(err):  # torch's allocators raise RuntimeError, not MemoryError
            print(f"error: {MSG_INTERNAL_MEMORY.format(err=' '.join(str(err).split())[:300])}", file=sys.stderr)
            _say_finished(before)
            return EXIT_BAD_INPUT
        if args.debug:
            traceback.print_exc()
        print(MSG_INTERNAL.format(kind=type(err).__name__, err=" ".join(str(err).split())[:300]), file=sys.stderr)
        _say_finished(before)
        return EXIT_INTERNAL


def _remove_validate_reports(argv: Sequence[str]) -> None:
    """A ``validate`` command line argparse refused (a mistyped flag, a bad value: exit 2) removes
    the earlier reports at its ``--report-dir`` / ``--junit`` too, as every other error does
    (:func:`~fqexport.cli.flags.validate.check_validate`): no earlier PASS is left for CI. Its
    other words (the model, the data...) are never removed."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != "validate":
        return
    outputs = argparse.ArgumentParser(add_help=False)
    outputs.add_argument("--report-dir")
    outputs.add_argument("--junit")
    try:
        known, _ = outputs.parse_known_args(argv)
    except SystemExit:  # e.g. --junit with no value: nothing named
        return
    inputs = [w for w in words[1:] if w not in (known.report_dir, known.junit)]
    remove_earlier_reports(known.report_dir, known.junit, inputs=inputs)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _Stdout:
    """``sys.stdout`` while a command runs. A character its encoding cannot take is written
    escaped (``\\u2014``): an ASCII or Latin-1 stdout (``PYTHONIOENCODING``) ended a passing gate
    with exit 3 on the summary's dash. Once the reader has gone (``| head -1``, ``| true``), the
    rest is dropped and the command still finishes its files (compress's ``--report`` was lost):
    :attr:`gone` then makes the exit code 141, as a Unix tool's on SIGPIPE."""

    def __init__(self, stream) -> None:
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        if self.gone:
            return len(text)
        try:
            return self.stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            return self.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _reader_gone(self) -> None:
        self.gone = True
        _to_devnull(self.stream)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null: what it still buffers goes nowhere at
    exit's flush, without a second BrokenPipeError (nothing for a stream that is not a file)."""
    try:
        fileno = stream.fileno()
    except (OSError, ValueError, AttributeError):  # captured (StringIO), closed, None
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fileno)
    except OSError:
        pass
    finally:
        os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, check and run the subcommand, map errors and signals to exit codes."""
    if sys.stdout is None or threading.current_thread() is not threading.main_thread():
        # no stdout to guard (pythonw, a service: print writes nothing), or a call from a thread,
        # which must not swap the process's sys.stdout under the main thread's own output
        return _main(argv)
    stdout = sys.stdout = _Stdout(sys.stdout)
    try:
        code = _main(argv)
    finally:
        sys.stdout = stdout.stream
    return 128 + signal.SIGPIPE if stdout.gone and code == EXIT_OK else code


def _main(argv: Sequence[str] | None) -> int:
    # torch's OpenMP threads spin while they wait for each other; on a shared CPU that starves a
    # descheduled peer (README: 163 s -> 11 s for a compress under load, ~2 % slower when quiet).
    # Set before any stage imports torch; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    if threading.current_thread() is not threading.main_thread():  # signal handlers need the main thread
        return _parse_and_run(argv)
    # the handlers first: an interrupt while the arguments are parsed exits as one, without a traceback
    previous = signal.signal(signal.SIGTERM, _raise_signalled)
    previous_int = signal.signal(signal.SIGINT, _raise_interrupt) if signal.getsignal(
        signal.SIGINT) is signal.default_int_handler else None  # a host's own SIGINT handler is left alone
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        return _parse_and_run(argv)
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def _parse_and_run(argv: Sequence[str] | None) -> int:
    before = len(outputs_written())
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):
                _remove_validate_reports(argv)
            raise
        flags = _given_flags(parser, args.command, argv)
        problem = _argv_problem(parser, args.command, argv)
        if problem is not None:
            _remove_validate_reports(argv)
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT, before)
    except _Signalled as sig:
        return _stopped(sig.signum, before)
    # progress bars redraw a line with \r: only a terminal shows them as one line, a log file or
    # a CI log gets every redraw (as pip and cargo do, none there)
    args.quiet = args.quiet or not _is_terminal(sys.stderr)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return _run(args, flags)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
