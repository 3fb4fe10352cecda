"""Options and helpers shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

err = Console(stderr=True)  # progress, notes and summaries; stdout is kept for results (tables, JSON)
RecipeOpt = typer.Option("demo", "--recipe", "-r", help="Shipped recipe name or a TOML file.")
RequiredRecipeOpt = typer.Option(..., "--recipe", "-r", help="Shipped recipe name or a TOML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set optim.lr=1e-4 (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory (overrides run.out).")
ArchOpt = typer.Option(None, "--arch", help="Architecture of a .pth MODEL.")
TeacherArchOpt = typer.Option(None, "--teacher-arch", help="Architecture of a .pth teacher.")


def recipe(name: str, overrides: Optional[List[str]], out: Optional[Path] = None, dry_run: bool = False):
    """The recipe ``name`` (shipped or a file) with ``--set`` overrides and ``--out``; for a dry run, values out of
    range are left for its list of problems instead of stopping at the first."""
    from gte.config import load_recipe

    r = load_recipe(name, overrides, check_ranges=not dry_run)
    if r.distill.logit_std:  # only then does a method fill keys; importing the methods imports torch (~3 s)
        from gte.methods import resolve

        r.distill = resolve(r.distill)  # the method's settings for keys the recipe leaves to it: shown and written out
    if out is not None:
        r.run.out = str(out)
    return r


def check_sizes(image_size: int | None, eval_resize: int = 0, teacher_size: int = 0) -> None:
    """``--image-size`` / ``--eval-resize`` / ``--teacher-image-size`` within gte's one image-side limit
    (:func:`gte.limits.check_side`), before any model or image is loaded; 0 means "the model's own" for the last two."""
    from gte.limits import check_side

    if image_size is not None:
        check_side(image_size, "--image-size")
    for value, flag in ((eval_resize, "--eval-resize"), (teacher_size, "--teacher-image-size")):
        if value:
            check_side(value, flag)
