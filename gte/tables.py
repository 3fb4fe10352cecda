"""Rich tables that fit an 80-column terminal: no vertical rules, two spaces between columns, text that folds
instead of being cut to "…" (the library's tables, and the commands' own, use this one style); :func:`literal` for
text from files."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from gte.text import visible


def compact_table(title: str | None = None, **options: Any) -> Table:
    """A table with a rule under its header only, columns two spaces apart, the title and caption left-aligned."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                 title_justify="left", caption_justify="left", **options)


def add_columns(table: Table, names: list[str] | tuple[str, ...], numeric: set[str] | tuple[str, ...] = ()) -> None:
    """Text columns fold (character-wise where a word is too long); ``numeric`` ones are right-aligned, never wrap."""
    for name in names:
        if name in numeric:
            table.add_column(name, justify="right", no_wrap=True)
        else:
            table.add_column(name, overflow="fold")


def literal(text: object) -> Text:
    """``text`` (a name or a file name from files) as a cell or part of a line that rich shows as written: markup
    such as ``[/]`` or ``[link=…]`` is not interpreted, control characters are made visible."""
    return Text(visible(str(text)))
