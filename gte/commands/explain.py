"""``gte explain``: pictures of explanations (B-cos W(x) and contributions, or GradCAM) and a printed top-5."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import typer
from rich.console import Console

from gte.commands._common import ArchOpt, TeacherArchOpt, check_sizes, err
from gte.errors import GteError


def explain_command(
    images: List[str] = typer.Argument(..., help="Image files (PNG, JPEG, WebP, …)."),
    model: str = typer.Option(..., "--model", "-m", help="A gte .safetensors, or a .pth with --arch."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also explain with a teacher, side by side; "
                                          "both explain the teacher's top-1 class."),
    class_: Optional[int] = typer.Option(None, "--class", help="Explain class K (default: top-1)."),
    out: Path = typer.Option(Path("explain.png"), "--out", "-o", help="The PNG to write."),
    arch: Optional[str] = ArchOpt,
    teacher_arch: Optional[str] = TeacherArchOpt,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size (default: the model's own, from "
                                             "its spec)."),
    eval_resize: int = typer.Option(0, "--eval-resize", show_default=False, help="Resize before the centre crop "
                                    "(default: the model's own; with --image-size: size/0.875)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="JSON list of class names."),
) -> None:
    """Pictures of explanations: B-cos W(x) and contributions, or GradCAM; prints the top-5."""
    check_sizes(image_size, eval_resize)
    explain_images(images, model, teacher=teacher, cls=class_, out=out, arch=arch, teacher_arch=teacher_arch,
                   image_size=image_size, eval_resize=eval_resize, classes_file=classes)


def explain_images(paths: Sequence[str], model: str, *, teacher: str | None = None, cls: int | None = None,
                   out: str | Path = "explain.png", arch: str | None = None, teacher_arch: str | None = None,
                   image_size: int | None = None, eval_resize: int = 0, classes_file: str | None = None,
                   console: Console | None = None) -> list:
    """Decode, explain with each model, print the top-5 table, write the PNG; returns the rendered rows."""
    from gte.render import load_image

    if not paths:
        raise GteError("no images given")
    pictures = [load_image(p) for p in paths]  # all inputs checked before any model (and torch) is loaded
    from gte.io import check_writable

    check_writable(Path(out).absolute().parent, "--out")
    from gte import dist
    from gte.models import eval_geometry, freeze, info, load_model
    from gte.render import class_names, explain_rows, preprocess, print_top, render
    from gte.tables import literal

    student = freeze(load_model(model, arch=arch))
    t = freeze(load_model(teacher, arch=teacher_arch)) if teacher else None
    first = info(t if t is not None else student)
    n = first.num_classes
    if info(student).num_classes != n:
        raise GteError(f"teacher has {n} classes, the model {info(student).num_classes}")
    if cls is not None and not 0 <= cls < n:
        raise GteError(f"--class {cls} is out of range: the model has {n} classes (0..{n - 1})")
    names = class_names(n, classes_file, [m for m in (t, student) if m is not None])
    size, resize = eval_geometry(t if t is not None else student, image_size, eval_resize)
    device = dist.device()
    for m in (student, t):
        if m is not None:
            m.to(device)
    images = [(str(p), preprocess(im, size, resize, first.interpolation)) for p, im in zip(paths, pictures)]
    rows = explain_rows(images, student, t, cls)
    print_top(rows, names, console or Console())
    err.print("explanations written to", literal(render(rows, names, out)))
    return rows
