"""``gte recipes``: the shipped recipes."""

from __future__ import annotations

from rich.console import Console


def recipes_command() -> None:
    """List the shipped recipes (use one with --recipe NAME)."""
    from gte.config import shipped_recipes
    from gte.tables import add_columns, compact_table

    table = compact_table(show_header=False)
    add_columns(table, ("recipe", "what it runs"))
    table.columns[0].no_wrap, table.columns[0].style = True, "bold"  # a name is typed whole after --recipe
    for name, summary in shipped_recipes().items():
        table.add_row(name, summary)
    Console().print(table)
