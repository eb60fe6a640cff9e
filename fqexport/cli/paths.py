"""Input and output paths of a subcommand, checked before any compute starts.

Every subcommand declares its inputs (``--calib``, ``--weights``, ...) and outputs (``--out``,
``--report-dir`` with the files it writes there, ...). :func:`check_paths` resolves them all
(realpath, symlinks followed) and raises :class:`~fqexport.errors.OutputPathError` (exit 2)
with one line naming the flag when an output:

- is the same file as an input or as another output (both flags are named);
- is an existing directory (for a file output), a special file, or under ``/proc``, ``/sys``
  or ``/dev``;
- lies under a regular file, in a folder that does not exist (file outputs, unless an output
  folder of the same command creates it: ``--junit reports/j.xml --report-dir reports``; output
  folders are created when an ancestor exists), or in a folder this process cannot write.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fqexport.calibration.manifest_paths import manifest_image_paths
from fqexport.errors import DataError, OutputPathError

MSG_NO_INPUT = "{flag} {path}: no such file"
# input flags that name a file (not a model spec, not a file that may be absent: external data),
# by their dest; "model" is validate's positional ONNX file (compress's --model is a spec)
MUST_EXIST = {"model": "model", "data": "--data", "calib": "--calib", "weights": "--weights", "train": "--train",
              "test": "--test", "reference": "--reference"}
MSG_SAME_AS_INPUT = "{flag} {path} is the same file as {other} {other_path}: it would overwrite the input; choose another {flag}"
MSG_SAME_AS_OUTPUT = "{flag} {path} is the same file as {other} {other_path}: one would overwrite the other; choose another {flag}"
MSG_STDOUT = "{flag} -: fqexport writes files, not standard output; give a file path"
MSG_IS_DIR = "{flag} {path} is an existing directory; give a file name"
MSG_NOT_DIR = "{flag} {path} is an existing file, not a directory; give a folder"
MSG_SPECIAL = "{flag} {path} is not a regular file (a device, pipe or socket); give a regular file path"
MSG_SYSTEM = "{flag} {path} is under {root}, which holds no user files; choose another {flag}"
MSG_UNDER_FILE = "{flag} {path}: {parent} is a file, not a folder; choose another {flag}"
MSG_NO_FOLDER = "{flag} {path}: folder {parent} does not exist; create it first"
MSG_FOLDER_OF_OUTPUT = "{flag} {path}: {other} {other_path} creates a folder there; choose another {flag}"
MSG_NOT_WRITABLE = "{flag} {path}: folder {parent} is not writable; choose another {flag}"
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Output:
    """One output flag: a file, or a folder with the names of the files written inside."""

    flag: str
    path: str | os.PathLike
    inside: tuple[str, ...] | None = None  # None: a file output; a tuple: a folder output

    def files(self) -> list[tuple[str, Path]]:
        """(label, path) of every file this output writes."""
        base = Path(self.path)
        if self.inside is None:
            return [(self.flag, base)]
        return [(f"{self.flag} ({name})", base / name) for name in self.inside]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _created_folders(outputs: Sequence[Output]) -> dict[Path, Output]:
    """The folders the folder outputs create (real paths; each missing one and its missing
    ancestors) and the output that creates each."""
    made: dict[Path, Output] = {}
    for out in outputs:
        folder = _real(Path(out.path)) if out.inside is not None else None
        while folder is not None and not folder.exists() and folder != folder.parent:
            made.setdefault(folder, out)
            folder = folder.parent
    return made


def _check_location(flag: str, path: Path, is_dir: bool, created: Mapping[Path, Output]) -> None:
    """``created``: the folders the output folders create (a file output's missing folder may be one)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):  # "nope/../x.onnx": resolved away, but the write would create nope/
        if part == ".." and i and not Path(*parts[:i]).exists():
            raise OutputPathError(MSG_NO_FOLDER.format(flag=flag, path=path, parent=Path(*parts[:i])))
    real = _real(path)
    for root in _SYSTEM_ROOTS:
        if real == Path(root) or Path(root) in real.parents:
            raise OutputPathError(MSG_SYSTEM.format(flag=flag, path=path, root=root))
    if real.exists():
        mode = real.stat().st_mode
        if is_dir:
            if not stat.S_ISDIR(mode):
                raise OutputPathError(MSG_NOT_DIR.format(flag=flag, path=path))
            if not os.access(real, os.W_OK | os.X_OK):
                raise OutputPathError(MSG_NOT_WRITABLE.format(flag=flag, path=path, parent=path))
            return
        if stat.S_ISDIR(mode):
            raise OutputPathError(MSG_IS_DIR.format(flag=flag, path=path))
        if not stat.S_ISREG(mode):
            raise OutputPathError(MSG_SPECIAL.format(flag=flag, path=path))
    parent = real.parent
    while not parent.exists():
        if not is_dir:
            if parent in created:  # the output folder that creates it checks its location
                return
            raise OutputPathError(MSG_NO_FOLDER.format(flag=flag, path=path, parent=real.parent))
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(MSG_UNDER_FILE.format(flag=flag, path=path, parent=parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(MSG_NOT_WRITABLE.format(flag=flag, path=path, parent=parent))


def _under_file(path: Path) -> Path | None:
    """The regular file among ``path``'s ancestors, if any (``a.txt/x.json``)."""
    for parent in _real(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def spec_module_file(spec: str | os.PathLike) -> Path | None:
    """The source file of the module a ``package.module:name`` spec imports (looked up the way
    the loader imports it: the working directory first, then ``sys.path``; nothing is imported),
    or None for a path or a module not found as a source file."""
    text = str(spec)
    module, sep, attr = text.partition(":")
    if not sep or not attr or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module) or Path(text).exists():
        return None
    for root in (os.getcwd(), *sys.path):
        base = Path(root or os.getcwd()).joinpath(*module.split("."))
        for source in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if source.is_file():
                return source
    return None


def check_paths(
    inputs: Sequence[tuple[str, str | os.PathLike | None]],
    outputs: Sequence[Output | None],
) -> None:
    """Raise :class:`OutputPathError` for the first bad output location or path collision.

    ``inputs`` are ``(flag, path)`` pairs (``None`` paths and paths that are not existing files
    are skipped: :func:`check_inputs_exist` and the loaders report them); ``outputs`` are
    :class:`Output` (``None`` skipped).
    """
    outs = [o for o in outputs if o is not None and o.path is not None]
    created = _created_folders(outs)
    for out in outs:
        if os.fspath(out.path) == "-":  # the Unix convention for standard output, which no output here supports
            raise OutputPathError(MSG_STDOUT.format(flag=out.flag))
        base = Path(out.path)
        parent = _under_file(base)
        if parent is not None:
            raise OutputPathError(MSG_UNDER_FILE.format(flag=out.flag, path=base, parent=parent))
        maker = created.get(_real(base)) if out.inside is None else None
        if maker is not None:
            raise OutputPathError(MSG_FOLDER_OF_OUTPUT.format(flag=out.flag, path=base, other=maker.flag,
                                                              other_path=maker.path))
        _check_location(out.flag, base, is_dir=out.inside is not None, created=created)
        if out.inside is not None:
            for label, f in out.files():
                if f.is_dir():
                    raise OutputPathError(MSG_IS_DIR.format(flag=label, path=f))
    ins = [(flag, Path(p)) for flag, p in inputs if p is not None and Path(p).is_file()]
    # a CSV manifest's images are inputs too (survey 79: --junit img/i0.png overwrote one)
    ins += [(f"{flag} (an image it names)", image) for flag, p in list(ins) if p.suffix.lower() == ".csv"
            for image in manifest_image_paths(p) if image.is_file()]
    ins += [(f"{flag} (module {source.name})", source) for flag, p in inputs
            if p is not None and (source := spec_module_file(p)) is not None]
    written: list[tuple[str, Path]] = []
    for out in outs:
        for label, f in out.files():
            for flag, p in ins:
                if _same(f, p):
                    raise OutputPathError(MSG_SAME_AS_INPUT.format(flag=label, path=f, other=flag, other_path=p))
            for other, q in written:
                if _same(f, q):
                    raise OutputPathError(MSG_SAME_AS_OUTPUT.format(flag=label, path=f, other=other, other_path=q))
            written.append((label, f))


def check_inputs_exist(args: Any) -> None:
    """DataError naming the flag of the first input file of :data:`MUST_EXIST` that does not exist:
    after the flags' own checks and before the command imports torch or ONNX Runtime (the loaders
    said it seconds later, without the flag)."""
    for dest, flag in MUST_EXIST.items():
        path = getattr(args, dest, None)
        if dest == "model" and args.command != "validate":
            continue
        if isinstance(path, (str, os.PathLike)) and not os.path.lexists(path):
            raise DataError(MSG_NO_INPUT.format(flag=flag, path=path))
