"""``gte bcosify``: a pretrained standard CNN → a B-cos network that explains itself with W(x) (B-cosification,
:mod:`gte.models.bcosify`), written as a self-describing ``model.safetensors`` to fine-tune with ``gte train``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gte.commands._common import ArchOpt, err
from gte.errors import GteError


def bcosify_command(
    model: str = typer.Argument(..., help="The model: a gte .safetensors, a .pth with --arch, a teacher catalog "
                                "name, or timm/hf-hub:<repo> (from the local Hugging Face cache)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors to write."),
    arch: Optional[str] = ArchOpt,
) -> None:
    """Convert a pretrained ResNet, DenseNet, VGG, MobileNetV2 or EfficientNet-Lite into a B-cos network (input
    [x, 1-x], B = 2, biases removed, uncentered batch norms, the classifier before the pooling); fine-tune it
    afterwards with gte train."""
    if out.suffix != ".safetensors":
        raise GteError(f"--out {out}: must end in .safetensors")
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
    err.print(literal(f"fine-tune it: gte train --recipe R --set student.arch={mi.arch} --set student.weights={out}"),
              highlight=False)
