"""What a name may hold: the characters segpipe refuses in class names, and shows escaped.

Class names and file names end up in files people open (XML, YAML, CSV, JSON, line lists)
and on terminals. A few characters break those or act on them: C0 and C1 control characters
(``\\x1b`` starts a terminal escape sequence, ``\\x85`` and ``\\x0b`` end a line for Python's
``splitlines`` and for YAML), the line and paragraph separators U+2028/U+2029, the bidi
overrides that reorder what a person reads, Unicode noncharacters (XML 1.0 forbids U+FFFE and
U+FFFF) and lone surrogates (no UTF-8 writer can encode them). ``unsafe_character`` finds the
first of them; class names holding one are refused before any work, and ``printable`` shows any
text on a terminal with them escaped (``\\x1b``, ``\\u2028``), never acted on.
"""

from __future__ import annotations

import re
from typing import Optional

#: Code points no name segpipe writes or prints may carry (module docstring), as ranges:
#: C0 controls (tab, line feed and carriage return among them), DEL and C1 controls, the
#: bidi marks, embeddings, overrides and isolates, the line and paragraph separators,
#: noncharacters, and surrogates.
UNSAFE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00, 0x1F), (0x7F, 0x9F), (0x200E, 0x200F), (0x2028, 0x202E), (0x2066, 0x2069),
    (0xD800, 0xDFFF), (0xFDD0, 0xFDEF), (0xFFFE, 0xFFFF),
    *((plane + 0xFFFE, plane + 0xFFFF) for plane in range(0x10000, 0x110000, 0x10000)))


def _character_class(escape) -> str:
    return "[" + "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}"
                         for a, b in UNSAFE_RANGES) + "]"


UNSAFE_CHARACTERS = re.compile(_character_class(lambda c: re.escape(chr(c))))
#: ``UNSAFE_CHARACTERS`` as an RE2 character class (Arrow's regular expressions).
UNSAFE_CHARACTERS_RE2 = _character_class(lambda c: f"\\x{{{c:x}}}")


def _escaped(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def unsafe_character(text: str) -> Optional[str]:
    """The first character of ``text`` that a name may not hold, escaped (``\\x1b``); None
    when there is none."""
    found = UNSAFE_CHARACTERS.search(text)
    return _escaped(found.group()) if found else None


def printable(text: str, keep: str = "") -> str:
    """``text`` with every character a name may not hold escaped, but those in ``keep``
    (a terminal stream keeps ``"\\n\\r\\t"``): a name read from a tampered file can neither
    move the cursor, recolour or retitle the terminal, nor split a line."""
    def escape(match: re.Match) -> str:
        return match.group() if match.group() in keep else _escaped(match.group())

    return UNSAFE_CHARACTERS.sub(escape, text)


#: The longest class name: each goes into every prediction file's footer and every export.
MAX_NAME_LENGTH = 1000


def check_name(name: str, what: str) -> Optional[str]:
    """Why ``name`` cannot be a class name (``what`` says where it was found), or None."""
    if len(name) > MAX_NAME_LENGTH:
        return (f"{what} '{printable(name[:40])}...' is {len(name):,} characters long, more "
                f"than the {MAX_NAME_LENGTH:,} a class name may have")
    bad = unsafe_character(name)
    if bad is not None:
        return (f"{what} '{printable(name)}' holds the character {bad}, which breaks the XML, "
                "YAML and CSV files segpipe writes and acts on terminals; remove it")
    if not name.strip():
        return f"{what} is empty"
    return None
