"""What every subcommand shares: exit codes, the help formatter, the table printer, the options
every subcommand accepts, and the parsers of ``NAME=VALUE`` flags. The option groups several
subcommands share are in ``fqexport.cli.flags.shared``.

Light by design: this module and ``fqexport.cli.flags`` import only ``fqexport.config``, the config
dataclasses and ``fqexport.errors``, so ``--help`` and every flag error appear before any stage
(torch, onnx) is imported."""

from __future__ import annotations

import argparse
import sys
import unicodedata
from typing import Any, Sequence

from fqexport.errors import ConfigError
from fqexport.shown_text import shown_text

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3  # a signal n exits 128 + n (cli/main.py)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, adding ``(default: X)`` to every option whose help does not already
    name its default (flags that are off unless given, and options without a value, excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        no_value = default is None or default is argparse.SUPPRESS or default is False or default in ([], ())
        if "default" in text or action.required or not action.option_strings or no_value:
            return text
        return f"{text} (default: %(default)s)"


def parse_assignments(items: Sequence[str], flag: str, value: str, convert, example: str) -> dict:
    """``["a=1", "b=2"]`` → ``{"a": convert("1"), ...}`` with errors naming ``flag``.

    ``value`` names the right-hand side in messages: "BITS" (an integer) or "W" (a number).
    """
    out, given = {}, {}
    for item in items:
        name, sep, raw = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} {item!r}: expected NAME={value}, e.g. {example}")
        try:
            parsed = convert(raw)
        except ValueError as err:
            kind = "an integer" if convert is int else "a number"
            raise ConfigError(f"{flag} {item!r}: {value} must be {kind}") from err
        if name in out and out[name] != parsed:  # a later repeat would silently win
            raise ConfigError(f"{flag} names {name!r} twice with different values ({given[name]} and {raw}); give it once")
        out[name], given[name] = parsed, raw
    return out


def parse_group_assignments(text: str, flag: str, example: str = "minority=2,majority=1") -> dict[str, float]:
    """``"a=2,b=1"`` → ``{"a": 2.0, "b": 1.0}``; a group name may hold commas and ``=``
    (``"I,II=2,III=1"``, ``"sex=F,age=60+=3"``): an assignment ends at the first comma-separated
    piece whose text after its last ``=`` is a number, the rest belongs to the name."""
    items, name = [], []
    for piece in text.split(","):
        name.append(piece)
        if "=" in piece and _is_number(piece.rpartition("=")[2]):
            items.append(",".join(name))
            name = []
    if name:  # a tail without "=": reported as the malformed item it is
        items.append(",".join(name))
    return parse_assignments(items, flag, "W", float, example)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_layer_bits(items: Sequence[str], flag: str = "--layer-bits") -> dict[str, int]:
    """``["fc=8"]`` → ``{"fc": 8}``; errors name ``flag``."""
    return parse_assignments(items, flag, "BITS", int, "fc=8")


def parse_group_weights(text: str | None):
    """``equal`` (None), ``samples``, or ``NAME=W,NAME=W``."""
    if text is None or text == "equal":
        return None
    if text == "samples":
        return "samples"
    return parse_group_assignments(text, "--group-weights")


def int_at_least(low: int, high: int | None = None):
    """An argparse ``type`` accepting integers >= ``low`` (and <= ``high`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}" + (f" and <= {high}" if high is not None else ""))
        return value

    return parse


SEED = int_at_least(0, 2**32 - 1)  # every --seed: numpy's and torch's generators take [0, 2**32)


def display_width(text: str) -> int:
    """Terminal columns of ``text``: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (:func:`display_width`)."""
    return text + " " * (width - display_width(text))


def cell_text(value: Any) -> str:
    """``value`` for one table cell (:func:`~fqexport.shown_text.shown_text`: control characters
    escaped, edge spaces quoted), so that the row stays one line."""
    return shown_text(value)


def print_table(rows: list[dict], columns: list[str], file=None) -> None:
    """Print ``rows`` as an aligned text table (aligned by terminal columns, so group names in
    any script line up; control characters escaped: :func:`cell_text`)."""
    file = file or sys.stdout
    cells = [[cell_text(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([display_width(c)] + [display_width(row[i]) for row in cells]) for i, c in enumerate(columns)]

    print("  ".join(pad(c, w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(pad(v, w) for v, w in zip(row, widths)), file=file)


QUIET_HELP = "no progress bars (they are drawn only when stderr is a terminal)"


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``fqexport validate ... -q``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an internal error")
    return common


def size_text(size_bytes: int) -> str:
    """A file size as read on a console: bytes below 100 kB (two decimals of a small file's MB can
    be a quarter off), else MB to 3 significant digits."""
    return f"{size_bytes:,} bytes" if size_bytes < 100_000 else f"{size_bytes / 1e6:.3g} MB"
