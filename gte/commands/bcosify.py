"""``gte bcosify``: a pretrained standard CNN → a B-cos network that explains itself with W(x) (B-cosification,
:mod:`gte.models.bcosify`), written as a self-describing ``model.safetensors``; with ``--recipe``, fine-tuned on the
recipe's data as an ordinary gte run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from gte.commands._common import ArchOpt, SetOpt, err
from gte.errors import GteError

# The paper's fine-tune (shrebox/B-cosification, bcos/experiments/ImageNet/bcosification/experiment_parameters.py
# L31-75: Adam, lr 1e-4, no weight decay, cosine, AGC; labels through BCE with off-labels 1/C, what gte's label loss
# is for a B-cos student). Applied over the recipe, under the command line's --set.
PAPER = ("distill.method=ce", "optim.name=adam", "optim.lr=1e-4", "optim.weight_decay=0", "optim.warmup_epochs=0",
         "optim.clip=agc", "optim.clip_value=0")


def bcosify_command(
    model: str = typer.Argument(..., help="The model: a gte .safetensors, a .pth with --arch, a teacher catalog "
                                "name, or timm/hf-hub:<repo> (from the local Hugging Face cache)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors to write."),
    arch: Optional[str] = ArchOpt,
    recipe_name: Optional[str] = typer.Option(None, "--recipe", "-r", help="Then fine-tune it on this recipe's data "
                                              "(shipped name or TOML) with the paper's optimiser: Adam 1e-4, "
                                              "cosine, no warm-up, AGC; labels (BCE), or --set distill.method=kd "
                                              "to learn from MODEL itself."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Convert a pretrained ResNet, DenseNet, VGG, MobileNetV2 or EfficientNet-Lite into a B-cos network (input
    [x, 1-x], B = 2, biases removed, uncentered batch norms, the classifier before the pooling); fine-tune it with
    --recipe (or gte train / gte distill)."""
    if out.suffix != ".safetensors":
        raise GteError(f"--out {out}: must end in .safetensors")
    if set_ and recipe_name is None:
        raise GteError("--set changes the fine-tuning recipe: give --recipe as well")
    fine_tune = None
    if recipe_name is not None:  # a bad recipe is an error before anything is converted
        from gte.commands._common import recipe

        fine_tune = recipe(recipe_name, [*PAPER, *(set_ or [])])
    from gte.io import check_writable

    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GteError(f"--out {out}: cannot create its directory ({e.strerror})") from None
    check_writable(out.absolute().parent, "--out")
    from gte.models import create, hfhub, info, load_model, save_model
    from gte.models.bcosify import convert
    from gte.tables import literal

    if hfhub.is_hf_hub(model):
        n = hfhub.repo_classes(model)
        if n is None:
            raise GteError(f"{model}: its config.json does not say how many classes it has")
        original = create(model, n)
    else:
        original = load_model(model, arch=arch)
    converted, changes = convert(original)
    save_model(converted, out, bcosified_from=Path(model).name)
    mi = info(converted)
    err.print(literal(f"{out}: {mi.arch}, {mi.num_classes} classes, B-cos (explained by W(x)), input [x, 1-x] "
                      f"normalised by mean (μ, 1-μ), std (σ, σ), μ = {mi.mean}, σ = {mi.std}"
                      + "".join(f"; {c}" for c in changes)), highlight=False)
    if fine_tune is None:
        err.print(literal(f"fine-tune it: gte bcosify {model} --out {out} --recipe R, or gte train --recipe R "
                          f"--set student.arch={mi.arch} --set student.weights={out}"), highlight=False)
        return
    _fine_tune(recipe_name, [*PAPER, *(set_ or [])], model, info(original).arch, mi.arch, out)


def _fine_tune(name: str, sets: list[str], model: str, original_arch: str, arch: str, weights: Path) -> None:
    """The recipe's run with the converted model as student; a method with a teacher and no ``teacher.*`` on the
    command line learns from the original MODEL (KD needs no labels)."""
    from gte.commands._common import recipe
    from gte.models import hfhub
    from gte.tables import literal
    from gte.train import train as run_train

    sets = [*sets, f"student.arch={arch}", f"student.weights={weights}"]
    r = recipe(name, sets)
    if r.distill.method != "ce" and not any(s.startswith("teacher.") for s in sets):
        original = "" if hfhub.is_hf_hub(model) else model  # a Hub model brings its own weights
        r = recipe(name, [*sets, f"teacher.arch={original_arch}", f"teacher.weights={original}"])
        err.print(literal(f"fine-tuning with {r.distill.method}, the original {original_arch} teaching"),
                  highlight=False)
    result = run_train(r, err)
    err.print(literal(f"fine-tuned model written to {result.out / 'model.safetensors'}"), highlight=False)
