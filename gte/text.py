"""Text read from files, made safe to show: class and group names (model metadata, ``--classes``, ``classes.json``,
``groups.json``, a Hub repo's ``label_names``), file names and values echoed in error messages.

A terminal obeys the control characters in what it prints: ESC starts sequences that clear the screen, set the
window title (OSC 0), write the clipboard (OSC 52) or print hyperlinks (OSC 8), and BEL, C1 CSI (U+009B) and the rest
do their own things. :func:`visible` writes every control character as an escape (``\\x1b``) instead, and
:func:`shorten` bounds a value (a 2 MB name, a mean of a million numbers) before it reaches a message. Rich markup
and matplotlib mathtext are escaped where those libraries print (:func:`gte.tables.literal`,
:data:`gte.render.LITERAL`), Markdown in :func:`markdown` here.
"""

from __future__ import annotations

import re

NAME_LIMIT = 200  # characters of a class or group name kept (the longest ImageNet-1k name has 32)
LINE_LIMIT = 2000  # characters of an error line kept (head and tail: the tail often says what to do)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: Unicode's "Cc" category
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|#!~&$])")  # punctuation Markdown (GFM, its HTML and its math) acts on


def visible(text: str, keep: str = "") -> str:
    """``text`` with every control character (C0, DEL, C1) but those in ``keep`` (``"\\n"`` for a text of several
    lines) written as a Python escape (``\\x1b``, ``\\n``)."""
    def escape(match: re.Match) -> str:
        c = match.group()
        return c if c in keep else _SHORT.get(c, f"\\x{ord(c):02x}")

    return _CONTROL.sub(escape, text)


def shorten(value: object, limit: int = 80) -> str:
    """``value`` (its ``repr`` unless it is a string) in at most ``limit`` characters: a longer one keeps its head
    and tail around ``…(N characters)…``; applying it twice changes nothing."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    mark = f"…({len(text)} characters)…"
    keep = max(limit - len(mark), 2)
    return text[: (keep + 1) // 2] + mark + text[len(text) - keep // 2:]


def clean_name(name: str) -> str:
    """A class or group name from a file as gte keeps and shows it: control characters visible, bounded (applying
    it twice changes nothing)."""
    return shorten(visible(name), NAME_LIMIT)


def error_line(message: str) -> str:
    """An error or problem message as one bounded line with no control characters."""
    return shorten(visible(message), LINE_LIMIT)


def markdown(text: str) -> str:
    """``text`` as literal Markdown: no HTML, links, emphasis, table cells or math made from it."""
    return _MARKDOWN.sub(r"\\\1", visible(text))
