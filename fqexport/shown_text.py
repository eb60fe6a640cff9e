"""Text from the user's data (a group name) as it is shown in one line of a table, a report or
the console: every control character as its escape, and spaces at its edges made visible."""

from __future__ import annotations

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
