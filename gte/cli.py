"""The ``gte`` command line: a thin layer over gte.train, gte.evaluate and gte.demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gte.errors import GteError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Good Teachers Explain: explanation-enhanced knowledge distillation (e2KD).")
err = Console(stderr=True)
RecipeOpt = typer.Option("demo", "--recipe", "-r", help="Shipped recipe name or a TOML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set optim.lr=1e-4 (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory (overrides run.out).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    if debug:
        os.environ["GTE_DEBUG"] = "1"


def _recipe(name: str, overrides: Optional[List[str]], out: Optional[Path]):
    from gte.config import load_recipe

    recipe = load_recipe(name, overrides)
    if out is not None:
        recipe.run.out = str(out)
    return recipe


@app.command()
def distill(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt) -> None:
    """Distil a student from a teacher (no arguments: the embedded CPU demo, KD vs e2KD)."""
    r = _recipe(recipe, set_, out)
    if r.demo.enabled:
        from gte.demo import run_demo

        run_demo(r, err)
        return
    if r.distill.method == "ce":
        raise GteError("distill.method is 'ce' (labels only): use `gte train`")
    from gte.train import train

    result = train(r, err)
    err.print(f"student written to {result.out / 'model.safetensors'}")


@app.command()
def train(recipe: str = typer.Option(..., "--recipe", "-r", help="Shipped recipe name or a TOML file."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt) -> None:
    """Label-only training (baseline students, teachers)."""
    from gte.train import train as run_train

    r = _recipe(recipe, set_, out)
    r.distill.method = "ce"
    result = run_train(r, err)
    err.print(f"model written to {result.out / 'model.safetensors'}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A gte .safetensors, or a .pth with --arch."),
    data: str = typer.Option(..., "--data", help="Shard spec, e.g. 'val-{000000..000003}.tar'."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model for agreement/explanations."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a .pth MODEL."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
    image_size: int = typer.Option(224, "--image-size"),
    eval_resize: int = typer.Option(0, "--eval-resize", help="Resize before the centre crop (0 = size/0.875)."),
    batch_size: int = typer.Option(64, "--batch-size"),
) -> None:
    """Accuracy, agreement, explanation similarity and per-group accuracy of MODEL on shards."""
    import torch

    from gte.config import DataConfig
    from gte.evaluate import evaluate
    from gte.models import freeze, load_model

    student = load_model(model, arch=arch)
    t = freeze(load_model(teacher)) if teacher else None
    cfg = DataConfig(image_size=image_size, eval_resize=eval_resize, num_workers=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if t is not None:
        t.to(device)
    metrics = evaluate(student.to(device), data, data=cfg, teacher=t, batch_size=batch_size, device=device)
    text = json.dumps(metrics, indent=2)
    if json_out:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, json_out)
    Console().print_json(text)


def _not_yet(what: str) -> None:
    raise GteError(f"`gte {what}` is not yet available in this version of gte")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def explain() -> None:
    """Pictures of explanations (not yet available)."""
    _not_yet("explain")


@app.command("fetch-teachers", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def fetch_teachers() -> None:
    """Verified downloads of B-cos v2 and torchvision teachers (not yet available)."""
    _not_yet("fetch-teachers")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except GteError as e:
        if os.environ.get("GTE_DEBUG"):
            raise
        print(f"gte: error: {e}", file=sys.stderr)
        sys.exit(2)
