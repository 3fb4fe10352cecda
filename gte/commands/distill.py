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


# The commands take no arguments; they are registered with click's allow_extra_args so that a stray one (most often
# `--set key value`, a space where `=` belongs) gets gte's one line instead of click's usage box.
EXTRA_ARGS = {"allow_extra_args": True}


def distill_command(ctx: typer.Context, recipe_name: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
                    out: Optional[Path] = OutOpt, dry_run: bool = DryRunOpt,
                    seeds: Optional[str] = typer.Option(None, "--seeds", help="Run the recipe once per seed into "
                                                        "OUT/seed-N, one after the other (finished seeds are "
                                                        "skipped, an interrupted one resumes), e.g. 0,1,2; then "
                                                        "`gte compare`.")) -> None:
    """Distil a student from a teacher (no arguments: the embedded CPU demo, KD vs e2KD).

    Multi-process: `torchrun --nproc_per_node N -m gte distill …` or `accelerate launch --multi_gpu -m gte distill …`.
    """
    _no_arguments(ctx.args, set_)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    r = recipe(recipe_name, set_, out, dry_run)
    if r.demo.enabled and r.data.train:  # the demo recipe as a template for one's own data: an ordinary run
        r.demo.enabled = False
        err.print("data.train is set: running an ordinary distillation with the demo's settings (no synthetic data)")
    if dry_run:
        return _dry_run(r)
    if seed_list is not None:
        return _run_seeds(r, seed_list)
    _run_one(r)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2]: distinct integers >= 0, in the order given."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise GteError(f"--seeds expects distinct integers >= 0 separated by commas, e.g. 0,1,2; got '{text}'")
    return seeds


def _run_seeds(r, seeds: list[int]) -> None:
    """The recipe once per seed into OUT/seed-N, in the given order (under torchrun every rank runs the same
    sequence). A seed with its results written is skipped; an interrupted one resumes from its checkpoints. The
    demo's data and teacher stay those of the recipe's own run.seed (``demo.data_seed``): only the students vary."""
    import copy

    base = Path(r.run.out)
    for seed in seeds:
        one = copy.deepcopy(r)
        if one.demo.enabled and one.demo.data_seed < 0:
            one.demo.data_seed = r.run.seed
        one.run.seed, one.run.out = seed, str(base / f"seed-{seed}")
        out = Path(one.run.out)
        done = (out / "results.json").is_file() if one.demo.enabled else (out / "model.safetensors").is_file() and (
            not one.data.test or (out / "test.json").is_file())
        if done:
            err.print(f"seed {seed}: finished in {out}, skipped", markup=False, highlight=False)
            continue
        err.print(f"[bold]seed {seed}[/] → {out}")
        _run_one(one)
    from gte import dist

    if dist.is_main():
        runs = f"'{base}'/seed-*/*/" if r.demo.enabled else f"'{base}'/seed-*/"
        err.print(f"compare the seeds: gte compare {runs} --report '{base}'/compare", markup=False, highlight=False,
                  soft_wrap=True)


def _run_one(r) -> None:
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


def train_command(ctx: typer.Context, recipe_name: str = RequiredRecipeOpt, set_: Optional[List[str]] = SetOpt,
                  out: Optional[Path] = OutOpt, dry_run: bool = DryRunOpt) -> None:
    """Label-only training (baseline students, teachers)."""
    _no_arguments(ctx.args, set_)
    r = recipe(recipe_name, set_, out, dry_run)
    r.distill.method = "ce"
    if dry_run:
        return _dry_run(r)
    from gte.train import train as run_train

    result = run_train(r, err)
    _written(result.out, "model")


def _no_arguments(extra: List[str], set_: Optional[List[str]]) -> None:
    if not extra:
        return
    key = next((x for x in set_ or [] if "=" not in x), None)
    if key is not None:
        raise GteError(f"--set expects key=value, got '{key}' '{extra[0]}': write --set {key}={extra[0]}")
    raise GteError(f"unexpected argument '{extra[0]}' (options only: --recipe, --set key=value, --out, --dry-run)")


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
    import tomli_w

    shown = {k: v for k, v in r.to_dict().items() if k != "demo" or r.demo.enabled}  # [demo] only where it runs
    # TOML leaves C1 controls as they are: made visible like every other line from files
    Console().print(visible(tomli_w.dumps(shown), keep="\n"), markup=False, highlight=False)
    for p in found:
        err.print(f"gte: problem: {error_line(p)}", markup=False, highlight=False, soft_wrap=True)
    if found:
        err.print(f"dry run: {len(found)} problem(s)", markup=False)
        raise typer.Exit(2)
    if r.demo.enabled:
        err.print("dry run: the demo recipe is valid; it generates its data and teacher under $GTE_HOME when run")
    else:
        from gte.engine import trained_explainer
        from gte.models import is_bcos

        how = trained_explainer(r, is_bcos(r.student.arch))
        err.print("dry run: recipe, data paths and weights are valid" + (
            f"; the explanation term compares {how} maps (recorded in the student's spec: `gte eval --teacher` "
            "compares the same)" if how else ""))
