"""``gte recipes``: the shipped recipes."""

from __future__ import annotations

from rich.console import Console


def recipes_command() -> None:
    """List the shipped recipes (use one with --recipe NAME)."""
    from gte.config import shipped_recipes

    for name, summary in shipped_recipes().items():
        Console().print(f"[bold]{name:<24}[/] {summary}")
