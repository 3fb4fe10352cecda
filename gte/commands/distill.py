"""``gte distill`` and ``gte train`` (label-only), with ``--dry-run``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.commands._common import OutOpt, RecipeOpt, RequiredRecipeOpt, SetOpt, err, recipe
from gte.errors import GteError
from gte.text import error_line, visible

DryRunOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe and every problem found, then exit "
                         "(code 2 when there is one).")


def distill_command(recipe_name: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
            dry_run: bool = DryRunOpt) -> None:
    """Distil a student from a teacher (no arguments: the embedded CPU demo, KD vs e2KD).

    Multi-process: `torchrun --nproc_per_node N -m gte distill …` or `accelerate launch --multi_gpu -m gte distill …`.
    """
    r = recipe(recipe_name, set_, out, dry_run)
    if r.demo.enabled and r.data.train:  # the demo recipe as a template for one's own data: an ordinary run
        r.demo.enabled = False
        err.print("data.train is set: running an ordinary distillation with the demo's settings (no synthetic data)")
    if dry_run:
        return _dry_run(r)
    if r.demo.enabled:
        from gte.demo import run_demo

        run_demo(r, err)
        err.print(f"results written to {Path(r.run.out) / 'results.md'} (students in {r.run.out}/<method>/)")
        return
    if r.distill.method == "ce":
        raise GteError("distill.method is 'ce' (labels only): use `gte train`")
    from gte.train import train as run_train

    result = run_train(r, err)
    _written(result.out, "student")


def train_command(recipe_name: str = RequiredRecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
          dry_run: bool = DryRunOpt) -> None:
    """Label-only training (baseline students, teachers)."""
    r = recipe(recipe_name, set_, out, dry_run)
    r.distill.method = "ce"
    if dry_run:
        return _dry_run(r)
    from gte.train import train as run_train

    result = run_train(r, err)
    _written(result.out, "model")


def _written(out: Path, what: str) -> None:
    from gte import dist

    if dist.is_main():  # once per launch, not once per rank
        err.print(f"{what} written to {out / 'model.safetensors'} (recipe.toml, metrics.jsonl, checkpoints/ beside it)")


def _dry_run(r) -> None:
    """Print the resolved recipe, then every problem found (exit 2 when there is one)."""
    if r.demo.enabled:  # the demo makes its own shards and teacher on the first run
        from gte.demo import problems
    else:
        from gte.validate import problems
    found = problems(r)
    Console().print(visible(r.to_toml(), keep="\n"), markup=False, highlight=False)  # TOML leaves C1 as it is
    for p in found:
        err.print(f"gte: problem: {error_line(p)}", markup=False, highlight=False, soft_wrap=True)
    if found:
        err.print(f"dry run: {len(found)} problem(s)", markup=False)
        raise typer.Exit(2)
    if r.demo.enabled:
        err.print("dry run: the demo recipe is valid; it generates its data and teacher under $GTE_HOME when run")
    else:
        err.print("dry run: recipe, data paths and weights are valid")
