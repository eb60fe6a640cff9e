"""Text from the user's data (a group name) as it is shown in one line of a table, a report or
the console: every control character as its escape, and spaces at its edges made visible."""

from __future__ import annotations

import math
import re
from typing import Any

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, the Unicode line breaks
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown_text(value: Any) -> str:
    """``value`` on one line: control characters (a line break, a tab, an ESC) as their escapes
    (``\\n``, ``\\x1b``), so that a row stays one row and a terminal runs no escape sequence; a
    text with spaces at an edge quoted (``'trailing '``): a table pads and Markdown trims cells,
    so ``trailing`` and ``trailing `` would read as one group."""
    text = _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}" if ord(m.group()) > 0xFF
                                               else f"\\x{ord(m.group()):02x}"), str(value))
    return f"'{text}'" if text.strip() and text != text.strip() else text


def loss_text(x: float) -> str:
    """A loss or loss difference as the console and notes show it: 4 decimals from 0.001 up (two
    significant digits or more), 3 significant digits below (a near-lossless model's 2.2e-07 gap
    and its standard error read "by 0.0000, within 2 x 0.0000"; a gap of 9.0e-05 within 2 x 4.6e-05
    read "by 0.0001"), so that figures side by side compare as they are."""
    x = float(x) + 0.0  # -0.0 reads 0.0000
    if math.isfinite(x) and abs(x) < 1e-12:  # float round-off of a zero (a difference of equal sums)
        x = 0.0
    return f"{x:.4f}" if x == 0 or not math.isfinite(x) or abs(x) >= 1e-3 else f"{x:.3g}"
