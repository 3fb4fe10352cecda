"""The ``gte`` command line: a thin layer over gte.train, gte.evaluate and gte.demo."""

from __future__ import annotations

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
DryRunOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe, check data and weights, exit.")


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
def distill(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
            dry_run: bool = DryRunOpt) -> None:
    """Distil a student from a teacher (no arguments: the embedded CPU demo, KD vs e2KD).

    Multi-process: `torchrun --nproc_per_node N -m gte distill …` or `accelerate launch --multi_gpu -m gte distill …`.
    """
    r = _recipe(recipe, set_, out)
    if dry_run:
        return _dry_run(r)
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
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryRunOpt) -> None:
    """Label-only training (baseline students, teachers)."""
    from gte.train import train as run_train

    r = _recipe(recipe, set_, out)
    r.distill.method = "ce"
    if dry_run:
        return _dry_run(r)
    result = run_train(r, err)
    err.print(f"model written to {result.out / 'model.safetensors'}")


def _dry_run(r) -> None:
    from gte.train import validate

    if r.demo.enabled:  # the demo makes its own shards and teacher on the first run
        Console().print(r.to_toml(), markup=False, highlight=False)
        err.print("dry run: the demo generates its data and teacher under $GTE_HOME when run")
        return
    validate(r)
    Console().print(r.to_toml(), markup=False, highlight=False)
    err.print("dry run: recipe, data paths and weights are valid")


@app.command()
def recipes() -> None:
    """List the shipped recipes (use one with --recipe NAME)."""
    from gte.config import shipped_recipes

    for name, summary in shipped_recipes().items():
        Console().print(f"[bold]{name:<24}[/] {summary}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A gte .safetensors, a .pth with --arch, or a teacher name."),
    data: str = typer.Option(..., "--data", help="Shard spec, e.g. 'val-{000000..000003}.tar'."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model for agreement/explanations."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a .pth MODEL."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", help="Architecture of a .pth teacher."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON (- = stdout, no table)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md + self-contained report.html here."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop size (default: the recipe.toml "
                                             "next to MODEL, else 32 for cifar_* archs, else 224)."),
    eval_resize: int = typer.Option(0, "--eval-resize", help="Resize (short side) before the crop (0 = size/0.875)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    waterbirds: Optional[bool] = typer.Option(None, "--waterbirds/--no-waterbirds", help="ID/OOD accuracy with "
                                              "group = 2·label + place, OOD = groups 1, 2 (default: detect 4 groups "
                                              "+ 2 classes)."),
    shift: bool = typer.Option(False, "--shift", help="Shift test: explanation cosine under diagonal shifts."),
    shift_max: int = typer.Option(16, "--shift-max", help="Largest shift in pixels."),
    shift_samples: int = typer.Option(256, "--shift-samples", help="Samples used by the shift test."),
    examples: int = typer.Option(6, "--examples", help="Images in the report's explanation grid."),
) -> None:
    """acc@1/5, agreement, explanation similarity, groups, F1/mAP, EPG/IoU, shift test (torchrun for many processes)."""
    from gte.evaluate import EvalOptions, eval_command

    if batch_size < 1 or shift_max < 0 or shift_samples < 1 or examples < 0:
        raise GteError("--batch-size and --shift-samples must be positive, --shift-max and --examples not negative")
    opts = EvalOptions(batch_size=batch_size, waterbirds=waterbirds, shift=shift, shift_max=shift_max,
                       shift_samples=shift_samples, examples=examples if report else 0)
    eval_command(model, data, teacher_path=teacher, arch=arch, teacher_arch=teacher_arch, image_size=image_size,
                 eval_resize=eval_resize, options=opts, json_out=json_out, report=str(report) if report else None)


@app.command()
def explain(
    images: List[str] = typer.Argument(..., help="Image files (PNG, JPEG, WebP, …)."),
    model: str = typer.Option(..., "--model", "-m", help="A gte .safetensors, or a .pth with --arch."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also explain with a teacher, side by side; "
                                          "both explain the teacher's top-1 class."),
    class_: Optional[int] = typer.Option(None, "--class", help="Explain class K (default: top-1)."),
    out: Path = typer.Option(Path("explain.png"), "--out", "-o", help="The PNG to write."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a .pth MODEL."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", help="Architecture of a .pth teacher."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size (default 32 for cifar_* "
                                             "archs, else 224)."),
    eval_resize: int = typer.Option(0, "--eval-resize", help="Resize before the centre crop (0 = size/0.875)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="JSON list of class names."),
) -> None:
    """Pictures of explanations: B-cos W(x) and contributions, or GradCAM; prints the top-5."""
    from gte.render import explain_images

    explain_images(images, model, teacher=teacher, cls=class_, out=out, arch=arch, teacher_arch=teacher_arch,
                   image_size=image_size, eval_resize=eval_resize, classes_file=classes)


@app.command()
def precompute(recipe: str = typer.Option(..., "--recipe", "-r", help="Shipped recipe name or a TOML file."),
               set_: Optional[List[str]] = SetOpt,
               out: Path = typer.Option(..., "--out", "-o", help="Directory for the new shards."),
               map_scale: int = typer.Option(1, "--map-scale", help="Store maps at 1/1, 1/2 or 1/4 resolution."),
               batch_size: int = typer.Option(0, "--batch-size", help="Teacher batch (0 = optim.batch_size).")) -> None:
    """Run the teacher once over data.train and write shards with its logits and explanations (frozen e2KD).

    Then train with `--set distill.frozen=true --set data.train='OUT/<shards>'`; torchrun splits shards over ranks.
    """
    from gte.precompute import precompute as run

    if batch_size < 0:
        raise GteError("--batch-size must not be negative")
    run(_recipe(recipe, set_, None), out, map_scale=map_scale, batch_size=batch_size, console=err)


@app.command()
def bench(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          steps: int = typer.Option(10, "--steps", help="Timed steps per row (after warm-up)."),
          batch: int = typer.Option(0, "--batch", help="Batch size (0 = optim.batch_size)."),
          warmup: int = typer.Option(1, "--warmup", help="Untimed steps per row first."),
          precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast)."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Also write the results as JSON.")) -> None:
    """Time one training step of CE, KD, e2KD live and frozen (K=1, K=16) and a reference e2KD step."""
    from gte.bench import bench_command

    if steps < 1 or batch < 0 or warmup < 0:
        raise GteError("--steps must be positive, --batch and --warmup not negative")
    bench_command(_recipe(recipe, set_, None), steps=steps, batch=batch, warmup=warmup, precision=precision,
                  json_out=json_out)


@app.command("fetch-teachers")
def fetch_teachers(
    names: Optional[List[str]] = typer.Argument(None, help="Catalog names (default: the whole catalog)."),
    list_: bool = typer.Option(False, "--list", help="Show the catalog and what is cached, download nothing."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="URL prefix, or local directory, with the release "
                                         "file names (air-gapped clusters)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Cache directory (default: $GTE_HOME/teachers)."),
) -> None:
    """Download B-cos v2 / torchvision teachers, verify their SHA-256 and cache them as safetensors."""
    from gte import teachers

    if list_:
        Console().print(teachers.catalog_table(dest))
        return
    entries = [teachers.get(n) for n in names or teachers.CATALOG]  # unknown names fail before any download
    for t in entries:
        teachers.fetch(t, dest=dest, mirror=mirror, console=err)


# `gte data …` (shard converters, few-shot subsets, shard info, loader benchmark) lives in gte/data/cli.py
from gte.data.cli import data_app  # noqa: E402

app.add_typer(data_app, name="data")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except GteError as e:
        if os.environ.get("GTE_DEBUG"):
            raise
        print(f"gte: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
