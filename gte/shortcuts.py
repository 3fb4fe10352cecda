"""Shortcut transforms: a known pattern inserted into test images, with the exact region it covers.

Each transform is a pure function of a batch of images in [0, 1] (N×3×H×W), their sample keys and a seed; it returns
the shifted images, the inserted region per sample (N×H×W bool, a superset of the pixels that changed) and which
samples it applied to. Randomness (a watermark's place, a random corner, a background partner) comes from
``blake2b(f"{seed}\\0{name}\\0{key}")``, so a sample is shifted the same way in every run, process and batch order
(except ``background``, whose partner is drawn among the batch's other samples with boxes).

- ``watermark``: ImageNet-W's overlay (Li et al., CVPR 2023, "A Whac-A-Mole Dilemma"; facebookresearch/Whac-A-Mole,
  ``imagenet_w/watermark_transform.py``, ``AddWatermark`` and ``_add_watermark``): text in white at opacity 0.5, font
  size side / 6.22 (36 px at 224), alpha-composited over the image. ImageNet-W writes "捷径捷径捷径" in Source Han Serif at
  (0.01·W, 0.4·H); gte draws ``text`` with PIL's default font (no CJK glyphs, no font file) at a random place per image
  that keeps it inside (``place=random``), or at ImageNet-W's place (``place=imagenet-w``).
- ``patch``: a filled square of ``color`` with side ``size``·min(H, W) at a corner (``random``: one per sample).
- ``background``: ImageNet-9's "mixed-rand" (Xiao et al., ICLR 2021): the object of image i (the pixels inside its
  boxes) on the background of another image j of the batch, whose own object region (the bounding rectangle of its
  boxes) is filled by tiling the largest background strip beside it, as ImageNet-9's ``only_bg_t`` does
  (``fill=tile``), or blanked to black like ``only_bg_b`` (``fill=black``). The inserted region is everything outside
  i's boxes. Samples without boxes (or whose boxes the crop removed) are left out and counted.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from gte.errors import GteError

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
CARTON = 478  # ImageNet's "carton": what ImageNet-W's watermark makes ImageNet models predict


@dataclass
class Shifted:
    """The result of a shortcut transform on a batch."""

    images: torch.Tensor  # N×3×H×W in [0, 1]
    mask: torch.Tensor  # N×H×W bool: the inserted region (every changed pixel lies in it)
    used: torch.Tensor  # N bool: samples the transform applied to (the others are returned unchanged)


def unit(seed: int, name: str, key: str) -> float:
    """A number in [0, 1) fixed by (seed, name, key)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _color(value: str) -> tuple[float, float, float]:
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(value if not _is_hex(value) else "#" + value)
    except ValueError:
        raise GteError(f"'{value}' is not a colour (a name such as magenta, or hex such as ff00ff)") from None
    return tuple(c / 255 for c in rgb[:3])  # type: ignore[return-value]


def _is_hex(value: str) -> bool:
    return len(value) in (3, 6) and all(c in "0123456789abcdefABCDEF" for c in value)


def _blend(images: torch.Tensor, alpha: torch.Tensor, color: Sequence[float]) -> torch.Tensor:
    """``images·(1 − α) + α·color`` with α N×H×W in [0, 1]."""
    c = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    a = alpha[:, None].to(images.dtype)
    return torch.where(a > 0, images * (1 - a) + a * c, images)


# --------------------------------------------------------------------------------------------- transforms
def patch(images: torch.Tensor, keys: Sequence[str], seed: int = 0, *, size: float = 0.125,
          color: str = "magenta", corner: str = "bottom-right", **_: object) -> Shifted:
    """A square of ``color``, side ``max(1, round(size·min(H, W)))``, pasted at ``corner`` (or a random one)."""
    n, _, h, w = images.shape
    side = max(1, round(size * min(h, w)))
    mask = torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    for i, key in enumerate(keys):
        where = corner if corner != "random" else CORNERS[int(unit(seed, "patch", key) * 4)]
        top = 0 if where.startswith("top") else h - side
        left = 0 if where.endswith("left") else w - side
        mask[i, top:top + side, left:left + side] = True
    out = _blend(images, mask.float(), _color(color))
    return Shifted(out, mask, torch.ones(n, dtype=torch.bool, device=images.device))


@lru_cache(maxsize=8)
def _text_alpha(text: str, font_size: int) -> torch.Tensor:
    """The text's coverage (h×w in [0, 1], cropped to its ink) drawn with PIL's default font."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(font_size)
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(canvas).text((-x0, -y0), text, fill=255, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def watermark(images: torch.Tensor, keys: Sequence[str], seed: int = 0, *, text: str = "shortcut",
              opacity: float = 0.5, color: str = "white", scale: float = 1 / 6.22, place: str = "random",
              **_: object) -> Shifted:
    """``text`` (font size ``scale``·min(H, W)) composited at ``opacity`` at a random place inside each image (or at
    ImageNet-W's (0.01·W, 0.4·H) with ``place=imagenet-w``)."""
    n, _, h, w = images.shape
    glyphs = _text_alpha(text, max(4, round(scale * min(h, w)))).to(images.device)
    if not glyphs.any():
        raise GteError(f"watermark text {text!r}: PIL's default font draws nothing for it")
    th, tw = glyphs.shape
    alpha = torch.zeros(n, h, w, device=images.device)
    for i, key in enumerate(keys):
        if place == "imagenet-w":
            top, left = round(0.4 * h), round(0.01 * w)
        else:
            top = int(unit(seed, "watermark/y", key) * max(1, h - th + 1))
            left = int(unit(seed, "watermark/x", key) * max(1, w - tw + 1))
        ph, pw = min(th, h - top), min(tw, w - left)
        if ph > 0 and pw > 0:
            alpha[i, top:top + ph, left:left + pw] = glyphs[:ph, :pw]
    alpha = alpha * opacity
    out = _blend(images, alpha, _color(color))
    return Shifted(out, alpha > 0, torch.ones(n, dtype=torch.bool, device=images.device))


def _fill_object(image: torch.Tensor, region: torch.Tensor, fill: str) -> torch.Tensor:
    """``image`` (3×H×W) with the bounding rectangle of ``region`` tiled from the largest strip beside it (or
    black)."""
    out = image.clone()
    rows, cols = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h, w = region.shape
    strips = {"left": x0 * h, "right": (w - x1) * h, "top": y0 * w, "bottom": (h - y1) * w}
    best = max(strips, key=lambda k: strips[k])
    if fill == "black" or strips[best] == 0:
        out[:, y0:y1, x0:x1] = 0
        return out
    if best in ("left", "right"):
        strip = image[:, y0:y1, :x0] if best == "left" else image[:, y0:y1, x1:]
        idx = torch.arange(x1 - x0, device=image.device) % strip.shape[-1]
        out[:, y0:y1, x0:x1] = strip[:, :, idx]
    else:
        strip = image[:, :y0, x0:x1] if best == "top" else image[:, y1:, x0:x1]
        idx = torch.arange(y1 - y0, device=image.device) % strip.shape[-2]
        out[:, y0:y1, x0:x1] = strip[:, idx, :]
    return out


def background(images: torch.Tensor, keys: Sequence[str], seed: int = 0, *, boxes: Sequence | None = None,
               fill: str = "tile", **_: object) -> Shifted:
    """Mixed-rand: each sample's object (inside its boxes) on the background of another sample of the batch with
    boxes, chosen by the smallest ``unit(seed, key_i, key_j)``; samples without boxes are not used."""
    from gte.metrics import box_mask

    n, _, h, w = images.shape
    objects = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        sample_boxes = (boxes[i] if boxes is not None and i < len(boxes) else None) or []
        if sample_boxes:
            objects[i] = box_mask(sample_boxes, h, w)
    objects = objects.to(images.device)
    has = [i for i in range(n) if objects[i].any()]
    out, mask = images.clone(), torch.zeros_like(objects)
    used = torch.zeros(n, dtype=torch.bool, device=images.device)
    for i in has:
        others = [j for j in has if j != i]
        if not others:
            continue
        j = min(others, key=lambda j: (unit(seed, "background/" + keys[j], keys[i]), j))
        scene = _fill_object(images[j], objects[j], fill)
        out[i] = torch.where(objects[i][None], images[i], scene)
        mask[i], used[i] = ~objects[i], True
    return Shifted(out, mask, used)


# --------------------------------------------------------------------------------------------- names and options
@dataclass(frozen=True)
class Transform:
    """A registered shortcut: the function and its options with their defaults (the types they parse to)."""

    apply: Callable[..., Shifted]
    options: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)


SHORTCUTS: dict[str, Transform] = {
    "watermark": Transform(watermark, {"text": "shortcut", "opacity": 0.5, "color": "white", "scale": 1 / 6.22,
                                       "place": "random"}, {"place": ("random", "imagenet-w")}),
    "patch": Transform(patch, {"size": 0.125, "color": "magenta", "corner": "bottom-right"},
                       {"corner": (*CORNERS, "random")}),
    "background": Transform(background, {"fill": "tile"}, {"fill": ("tile", "black")}),
}


@dataclass(frozen=True)
class Shortcut:
    """One shortcut test as asked for on the command line (``NAME[:key=value,…]``)."""

    label: str
    name: str
    options: dict
    seed: int = 0

    def __call__(self, images: torch.Tensor, keys: Sequence[str], boxes: Sequence | None = None) -> Shifted:
        return SHORTCUTS[self.name].apply(images, keys, self.seed, boxes=boxes, **self.options)


def _hint(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def parse_shortcut(text: str, seed: int = 0) -> Shortcut:
    """``"patch:size=0.2,corner=top-left"`` → a :class:`Shortcut`; a one-line error for an unknown name, option or
    value."""
    name, _, rest = text.strip().partition(":")
    if name not in SHORTCUTS:
        raise GteError(f"unknown shortcut '{name}' (known: {', '.join(SHORTCUTS)}){_hint(name, SHORTCUTS)}")
    spec, options = SHORTCUTS[name], {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in spec.options:
            raise GteError(f"--shortcut {text}: '{name}' has no option '{key}' (known: {', '.join(spec.options)})"
                           f"{_hint(key, spec.options)}")
        if not eq:
            raise GteError(f"--shortcut {text}: write {key}=VALUE")
        value = value.strip()
        if isinstance(spec.options[key], float):
            try:
                options[key] = float(value)
            except ValueError:
                raise GteError(f"--shortcut {text}: {key} must be a number, got '{value}'") from None
            bad = not (0 < options[key] <= 1) or (key == "opacity" and options[key] > 1)
            if bad:
                raise GteError(f"--shortcut {text}: {key} must be in (0, 1], got {value}")
        elif key in spec.choices and value not in spec.choices[key]:
            raise GteError(f"--shortcut {text}: {key} must be one of {', '.join(spec.choices[key])}, got '{value}'"
                           f"{_hint(value, spec.choices[key])}")
        else:
            options[key] = value
        if key == "color":
            _color(value)
        if key == "text":  # the label heads tables (terminal markup, Markdown cells): plain text only
            if re.search(r"[\[\]|\\`<>\x00-\x1f\x7f]", value):
                raise GteError(f"--shortcut {text!r}: text may not contain [ ] | \\ ` < > or control characters")
            watermark(torch.zeros(1, 3, 64, 64), ["check"], text=value)  # refused now, not after the models load
    return Shortcut(text.strip(), name, {**spec.options, **options}, seed)


def parse_shortcuts(texts: Sequence[str], seed: int = 0) -> tuple[Shortcut, ...]:
    """Several ``--shortcut`` values; the same test twice is refused."""
    out = tuple(parse_shortcut(t, seed) for t in texts)
    labels = [s.label for s in out]
    for label in labels:
        if labels.count(label) > 1:
            raise GteError(f"--shortcut {label} is given twice")
    return out
