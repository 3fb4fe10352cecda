"""Pictures of explanations (`gte explain`): images in, one PNG and a printed top-5 table out.

B-cos models are drawn with the official renderers of the ``bcos`` package (``gradient_to_image`` for the colour
explanation, the ``plot_contribution_map`` convention for Σ x·W(x)); standard models with GradCAM overlaid the way
pytorch-grad-cam's ``show_cam_on_image`` does it (OpenCV's JET table reproduced here, so cv2 is not a dependency).
Images are decoded (and rejected) before torch is imported: a bad file costs a fraction of a second, not a model load.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from gte.data.images import max_pixels, to_rgb
from gte.errors import GteError
from gte.io import loads_json
from gte.text import clean_name

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from matplotlib.figure import Figure
    from rich.console import Console

TOP_K = 5
# Text artists showing names and file names: as written, never mathtext ($…$) or LaTeX (a user's text.usetex)
LITERAL = {"parse_math": False, "usetex": False}

# OpenCV's COLORMAP_JET as RGB: channel c is clip(1.5 − |4x − (3, 2, 1)_c|) at x = i/255, rounded half to even.
_i = np.arange(256.0)[:, None]
JET = np.rint(np.clip(382.5 - np.abs(4 * _i - 255 * np.array([3.0, 2.0, 1.0])), 0, 255)).astype(np.uint8)
JET[159, 2] = 1  # OpenCV's float table lands just below this one exact .5 tie (checked against cv2 4.x)
del _i


# --------------------------------------------------------------------------------------------- loading
def load_image(path: str | os.PathLike, limit: int | None = None) -> Image.Image:
    """Decode an image file fully to RGB; bombs, non-images and unreadable files raise a one-line GteError."""
    p, limit = Path(path), limit or max_pixels()
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # PIL only warns between 1× and 2× its limit; make every size over the limit an error, and never accept a
    # truncated file as a half-grey picture (another library may have flipped the global).
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = limit, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()  # decode now, so truncation surfaces here and not inside a transform
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GteError(f"{p}: refused, more than {limit} pixels (a decompression bomb?); "
                       "raise GTE_MAX_IMAGE_PIXELS to allow it") from None
    except FileNotFoundError:
        raise GteError(f"image not found: {p}") from None
    except UnidentifiedImageError:
        raise GteError(f"{p}: not an image file (or a format Pillow cannot read)") from None
    except (IsADirectoryError, PermissionError) as e:
        raise GteError(f"{p}: cannot read the file ({e.strerror})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying "corrupt"
        raise GteError(f"{p}: corrupt or truncated image ({' '.join(str(e).split())})") from None
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def preprocess(image: Image.Image, size: int, resize: int = 0, interpolation: str = "bilinear") -> torch.Tensor:
    """gte's eval geometry (as in ``gte eval``): Resize(resize, else size/0.875) + CenterCrop(size), 3×H×W in
    [0, 1]; ``interpolation`` is the model spec's."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    pipe = v2.Compose([v2.PILToTensor(), v2.Resize(resize or round(size / 0.875), InterpolationMode(interpolation),
                                                   antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])
    return pipe(image)


def class_names(num_classes: int, classes_file: str | None = None, models: Sequence = ()) -> list[str]:
    """Names from ``--classes`` (a JSON list), else the first model's own (its spec's ``class_names``), else
    ImageNet's (1000 classes), else ``class k``."""
    if classes_file:
        return names_file(classes_file, num_classes)
    from gte.models import info

    for m in models:
        if info(m).class_names and len(info(m).class_names) == num_classes:
            return list(info(m).class_names)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {k}" for k in range(num_classes)]


def names_file(path: str | Path, num_classes: int) -> list[str]:
    """A JSON list of ``num_classes`` class-name strings (one line for anything else), as gte shows them
    (:func:`gte.text.clean_name`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GteError(f"{path}: cannot read the class names ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GteError(f"{path}: not UTF-8 text (byte {e.start}); class names must be a JSON list in UTF-8") from None
    try:
        names = loads_json(text, str(path))
    except json.JSONDecodeError as e:
        raise GteError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise GteError(f"{path}: expected a JSON list of class-name strings")
    if len(names) != num_classes:
        raise GteError(f"{path}: {len(names)} class names, the model has {num_classes} classes")
    return [clean_name(n) for n in names]


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names (torchvision's offline weight metadata)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# --------------------------------------------------------------------------------------------- pictures
def cam_overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """pytorch-grad-cam's ``show_cam_on_image(image, cam, use_rgb=True)``: H×W×3 float [0,1] + H×W [0,1] → uint8."""
    heatmap = JET[np.uint8(255 * cam)].astype(np.float32) / 255
    out = (1 - image_weight) * heatmap + image_weight * image.astype(np.float32)
    return np.uint8(255 * (out / np.max(out)))  # their convention: rescale by the max, then truncate


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's per-image min-max scaling (same epsilon), so maps compare with theirs."""
    cam = cam - cam.min()
    return (cam / (1e-7 + cam.max())).astype(np.float32)


@dataclass
class Panel:
    """One model's explanation of one image."""

    role: str  # "model", "teacher" or "student"
    arch: str
    bcos: bool
    explained: int  # the class explained
    prob: float  # this model's probability for it (sigmoid for B-cos, softmax otherwise)
    maps: torch.Tensor  # raw explanation: W(x) 6×H×W (B-cos) or GradCAM 1×H×W
    picture: np.ndarray  # gradient_to_image RGBA H×W×4 float (B-cos) or the CAM overlay H×W×3 uint8
    heat: np.ndarray  # Σ x·W(x) (B-cos) or the min-max-normalised CAM, H×W
    top: list[tuple[int, float]]  # top-5 (class, probability)


@dataclass
class Row:
    """One image and its panels (teacher first)."""

    path: str
    image: torch.Tensor  # 3×H×W in [0, 1], as the models saw it
    explained: int
    panels: list[Panel]
    note: str = ""  # lines under the image (the report: its label and group)


def explain_panel(model: nn.Module, image: torch.Tensor, cls: int | None, role: str) -> Panel:
    """Explain ``cls`` (None: the model's top-1) for one preprocessed image with the model's own explainer."""
    import torch

    from gte.explain import contribution_map, explain_with_logits
    from gte.models import info, to_model_input

    mi = info(model)
    device = next(model.parameters()).device
    x = to_model_input(mi, image[None].to(device))
    classes = None if cls is None else torch.tensor([cls])
    maps, logits = explain_with_logits(model, x, classes, mi.explainer)
    explained = int(logits.argmax(1)) if cls is None else cls
    # B-cos heads are trained with BCE on one-hot targets: their calibrated per-class score is the sigmoid.
    probs = (torch.sigmoid(logits) if mi.bcos else torch.softmax(logits, 1))[0].float().cpu()
    top = torch.topk(probs, min(TOP_K, probs.numel()))
    if mi.bcos:
        from bcos.common import gradient_to_image

        picture = gradient_to_image(x[0].cpu(), maps[0].cpu(), smooth=15, alpha_percentile=99.5)
        heat = contribution_map(x, maps)[0].cpu().numpy()
    else:
        heat = normalise_cam(maps[0, 0].float().cpu().numpy())
        picture = cam_overlay(image.permute(1, 2, 0).numpy(), heat)
    return Panel(role, mi.arch, mi.bcos, explained, float(probs[explained]), maps[0].cpu(), picture, heat,
                 [(int(k), float(p)) for p, k in zip(top.values, top.indices)])


def explain_rows(images: Sequence[tuple[str, torch.Tensor]], model: nn.Module, teacher: nn.Module | None = None,
                 cls: int | None = None) -> list[Row]:
    """Explain each image: with a teacher, both models explain the teacher's top-1 class (or ``cls``), as in e2KD."""
    rows = []
    for path, image in images:
        panels = []
        if teacher is not None:
            panels.append(explain_panel(teacher, image, cls, "teacher"))
            cls_here: int | None = panels[0].explained
        else:
            cls_here = cls
        panels.append(explain_panel(model, image, cls_here, "student" if teacher is not None else "model"))
        rows.append(Row(path, image, panels[0].explained, panels))
    return rows


# Text size of every picture: 10 pt at the saved 100 dpi is ~14 px, readable at 100 % zoom. The columns are sized so a
# teacher + student grid (~1120 px) fits the report page (gte.report.CSS, 1200 px) and the browser never shrinks it.
FONT = 10
PANEL_IN = 2.0  # one image column, inches
TEXT_IN = PANEL_IN - 0.25  # the width a caption may take under or over one column, inches
# How to read an explanation, under it, by Panel.bcos
READ = {True: "B-cos W(x): colour = the direction of the weights at the pixel; brighter = stronger positive "
              "evidence for the class",
        False: "GradCAM on the image, scaled to its own max: the heat shows where, p how sure"}


def text_width(text: str, size: float = FONT) -> float:
    """The width of one line of ``text`` at ``size`` points, in inches (matplotlib's own font metrics)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    return text_to_path.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0] / 72


def fit(text: str, inches: float = TEXT_IN) -> str:
    """``text`` cut with an ellipsis to ``inches`` at FONT size, so a caption never runs into the next column."""
    if text_width(text) <= inches:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with its ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if text_width(text[:mid] + "…") <= inches else (lo, mid - 1)
    return text[:lo] + "…"


def prob_text(p: float) -> str:
    """A probability as shown in captions: two decimals, small ones to one significant digit (p = 0.001)."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.1g}"


def wrap(text: str, inches: float = TEXT_IN) -> str:
    """``text`` broken into lines of at most ``inches`` at FONT size (a word longer than a line is cut by fit)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}") <= inches:
            lines[-1] += f" {word}"
        else:
            lines.append(fit(word, inches))
    return "\n".join(lines)


def figure(rows: Sequence[Row], names: Sequence[str], dpi: int = 100) -> Figure:
    """Image | explanation | attribution map with a colour bar of its scale, per model, one row per image.

    Over each explanation: the model, the class explained and its probability; under it, how to read it. Under each
    map: the model's top-5. Every row is given the height its text needs, so captions never reach the next row.
    GradCAM maps stay min-max scaled per map (pytorch-grad-cam's convention, and GradCAM's raw values have no scale
    that compares across models or layers): the probability beside each map and the caption say what the heat hides.
    """
    from bcos.common import plot_contribution_map
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    jet = ListedColormap(JET / 255.0, name="gte-jet")  # GradCAM's colours, as a map a colour bar can show
    panels = len(rows[0].panels)
    ncols = 1 + 2 * panels
    line = 1.25 * FONT / 72  # inches per text line
    below = max(max(len(p.top) for r in rows for p in r.panels), 1 + max(row.note.count("\n") for row in rows),
                *(wrap(READ[p.bcos]).count("\n") + 1 for r in rows for p in r.panels))
    row_in = PANEL_IN + (2 + below) * line + 0.35  # two title lines, the text below, padding
    gradcam = any(not p.bcos for r in rows for p in r.panels)
    width = PANEL_IN * ncols + 0.6 * panels  # + a colour bar and its labels per model
    foot = wrap("Probabilities: sigmoid for B-cos models (trained with BCE), softmax for standard models. "
                  "Under each map: the model's top-5." + (" GradCAM maps are each scaled to their own max (0–1), so "
                                                          "a map of a p = 0.001 class looks as hot as one of p = 0.95."
                                                          if gradcam else ""), width - 0.3)
    foot_in = (foot.count("\n") + 1) * line + 0.15
    fig = Figure(figsize=(width, row_in * len(rows) + foot_in), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(row.image.permute(1, 2, 0).numpy())
        ax.set_title(fit(Path(row.path).name), fontsize=FONT, **LITERAL)
        ax.set_xlabel(row.note, fontsize=FONT, loc="left", **LITERAL)
        for j, p in enumerate(row.panels):
            ax_e, ax_h = axes[r, 1 + 2 * j], axes[r, 2 + 2 * j]
            if p.bcos:
                ax_e.set_facecolor("black")  # the RGBA's transparent (unimportant) parts recede into black
                ax_e.imshow(p.picture)
                _, heat = plot_contribution_map(p.heat, ax=ax_h)  # bwr, symmetric, 99.5-percentile cut-off
                ax_h.set_title("contribution Σ x·W(x)", fontsize=FONT)
            else:
                ax_e.imshow(p.picture)
                heat = ax_h.imshow(p.heat, cmap=jet, vmin=0, vmax=1)
                ax_h.set_title("GradCAM ÷ its max", fontsize=FONT)
            bar = fig.colorbar(heat, ax=ax_h, fraction=0.05, pad=0.02)
            bar.ax.tick_params(labelsize=FONT)
            bar.ax.yaxis.get_offset_text().set_fontsize(FONT)  # the "1e−5" above a bar of small contributions
            # Left-aligned, two lines over a one-line map title: the model line may run on over its map.
            prob = f"  p = {prob_text(p.prob)}"
            ax_e.set_title(f"{fit(f'{p.role} {p.arch}', 2 * PANEL_IN)}\n"
                           f"{fit(names[p.explained], TEXT_IN - text_width(prob))}{prob}", fontsize=FONT, loc="left",
                           **LITERAL)
            ax_e.set_xlabel(wrap(READ[p.bcos]), fontsize=FONT, loc="left")
            ax_h.set_xlabel("\n".join(fit(f"{prob_text(q)}  {names[k]}") for k, q in p.top),
                            fontsize=FONT, loc="left", **LITERAL)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.get_layout_engine().set(rect=(0, foot_in / fig.get_figheight(), 1, 1 - foot_in / fig.get_figheight()))
    fig.text(0.01, 0.005, foot, fontsize=FONT, va="bottom")
    return fig


def render(rows: Sequence[Row], names: Sequence[str], out: str | os.PathLike, dpi: int = 100) -> Path:
    """Draw the :func:`figure` of ``rows``; write the PNG atomically."""
    fig = figure(rows, names, dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, out)  # a reader never sees half a PNG
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GteError(f"{out}: cannot write the picture ({e.strerror})") from None
    return out


def print_top(rows: Sequence[Row], names: Sequence[str], console: Console) -> None:
    """The top-5 of every model for every image as one rich table."""
    from gte.tables import add_columns, compact_table, literal

    table = compact_table("top-5 (sigmoid for B-cos models, softmax for standard ones)")
    add_columns(table, ("image", "model", "rank", "class", "name", "p"), numeric=("rank", "class", "p"))
    for row in rows:
        for p in row.panels:
            for rank, (k, q) in enumerate(p.top, 1):
                mark = " *" if k == row.explained else ""
                image, model = (Path(row.path).name, f"{p.role} {p.arch}") if rank == 1 else ("", "")  # once each
                table.add_row(literal(image), model, str(rank), str(k), literal(names[k] + mark), f"{q:.3f}")
    console.print(table)
    console.print("* = the class explained in the picture")
