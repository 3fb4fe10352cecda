"""``gte convert``: your own weights (a timm/torchvision/gte architecture's state dict) into a self-describing
``model.safetensors`` that ``gte distill`` (as ``teacher.weights``), ``gte eval`` and ``gte explain`` read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gte.commands._common import err
from gte.errors import GteError
from gte.tables import literal
from gte.text import shorten


def convert_command(
    src: Path = typer.Argument(..., help="Weights: .safetensors, or .pth/.pt (read weights-only, never unpickled)."),
    arch: str = typer.Option(..., "--arch", help="Architecture: a gte name, timm/<name> or torchvision/<name>."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors to write."),
    rename: Optional[str] = typer.Option(None, "--from", help="Key format of SRC when it is not ARCH's own: "
                                         "lukemelas-efficientnet."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class names: 'imagenet' or a JSON list file."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Side it was trained at (default: the "
                                             "architecture's)."),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="Eval centre-crop fraction (224/256 = 0.875)."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear, bicubic or nearest."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Input mean, three numbers: 0.5,0.5,0.5."),
    std: Optional[str] = typer.Option(None, "--std", help="Input std, three numbers."),
    explain_layer: Optional[str] = typer.Option(None, "--explain-layer", help="GradCAM layer (dotted module name)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Class count (default: read from the "
                                              "architecture's classifier in SRC)."),
) -> None:
    """Convert a state dict into gte's model.safetensors with its spec (size, crop, interpolation, mean/std,
    explanation layer, class names)."""
    if out.suffix != ".safetensors":
        raise GteError(f"--out {out}: must end in .safetensors")
    from gte.io import check_writable

    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GteError(f"--out {out}: cannot create its directory ({e.strerror})") from None
    check_writable(out.absolute().parent, "--out")
    from gte.models import info
    from gte.models.convert import convert_weights

    model = convert_weights(src, arch, out, rename=rename, num_classes=num_classes, classes=classes,
                            input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                            mean=_triple(mean, "--mean"), std=_triple(std, "--std"), gradcam_layer=explain_layer)
    mi = info(model)
    err.print(literal(f"{out}: {mi.arch}, {mi.num_classes} classes, {mi.input_size}px (resize {mi.eval_resize}, "
                      f"{mi.interpolation}), mean {mi.mean}, std {mi.std}, explained at {mi.gradcam_layer}"
                      + (", with class names" if mi.class_names else "")), highlight=False)


def _triple(text: str | None, flag: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GteError(f"{flag} {shorten(repr(text))}: expected three comma-separated numbers") from None
    if len(values) != 3:
        raise GteError(f"{flag} {shorten(repr(text))}: expected three comma-separated numbers")
    return values  # type: ignore[return-value]
