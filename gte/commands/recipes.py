"""``gte recipes``: the shipped recipes, one line each; ``gte recipes NAME``: one recipe's description and file."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console


def recipes_command(name: Optional[str] = typer.Argument(None, help="A shipped recipe: show its description.")
                    ) -> None:
    """List the shipped recipes (use one with --recipe NAME), or describe one."""
    from gte.config import load_recipe, recipe_path, shipped_recipes
    from gte.tables import add_columns, compact_table

    if name is not None:
        path = recipe_path(name)  # one line with close matches for an unknown name
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        Console().print("\n".join(header) + f"\n\nfile: {path} (gte distill --recipe {name} --dry-run shows it "
                        "resolved)", markup=False, highlight=False,
                        soft_wrap=True)
        return
    table = compact_table()
    add_columns(table, ("recipe", "method", "teacher → student"))
    for col in table.columns[:2]:  # a name is typed whole after --recipe
        col.no_wrap = True
    table.columns[0].style = "bold"
    for recipe_name in shipped_recipes():
        r = load_recipe(recipe_name, check_ranges=False)
        if r.demo.enabled:
            method, teacher = ", ".join(r.demo.methods), r.demo.teacher_arch
        else:
            method, teacher = r.distill.method, r.teacher.arch or "–"
        table.add_row(recipe_name, method, f"{teacher} → {r.student.arch}")
    Console().print(table)
    Console(stderr=True).print("gte recipes NAME describes one", highlight=False)
