"""``gte distill`` and ``gte train`` (label-only), with ``--dry-run``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.commands._common import OutOpt, RecipeOpt, RequiredRecipeOpt, SetOpt, err, recipe
from gte.errors import GteError

DryRunOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe, check data and weights, exit.")


def distill_command(recipe_name: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
            dry_run: bool = DryRunOpt) -> None:
    """Distil a student from a teacher (no arguments: the embedded CPU demo, KD vs e2KD).

    Multi-process: `torchrun --nproc_per_node N -m gte distill …` or `accelerate launch --multi_gpu -m gte distill …`.
    """
    r = recipe(recipe_name, set_, out)
    if dry_run:
        return _dry_run(r)
    if r.demo.enabled:
        from gte.demo import run_demo

        run_demo(r, err)
        return
    if r.distill.method == "ce":
        raise GteError("distill.method is 'ce' (labels only): use `gte train`")
    from gte.train import train as run_train

    result = run_train(r, err)
    err.print(f"student written to {result.out / 'model.safetensors'}")


def train_command(recipe_name: str = RequiredRecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
          dry_run: bool = DryRunOpt) -> None:
    """Label-only training (baseline students, teachers)."""
    r = recipe(recipe_name, set_, out)
    r.distill.method = "ce"
    if dry_run:
        return _dry_run(r)
    from gte.train import train as run_train

    result = run_train(r, err)
    err.print(f"model written to {result.out / 'model.safetensors'}")


def _dry_run(r) -> None:
    if r.demo.enabled:  # the demo makes its own shards and teacher on the first run
        Console().print(r.to_toml(), markup=False, highlight=False)
        err.print("dry run: the demo generates its data and teacher under $GTE_HOME when run")
        return
    from gte.validate import validate

    validate(r)
    Console().print(r.to_toml(), markup=False, highlight=False)
    err.print("dry run: recipe, data paths and weights are valid")
