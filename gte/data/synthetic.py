"""Synthetic "Waterbirds-like" demo task written as WebDataset tar shards.

The label is an object *shape*; the background "place" is an easy, spurious cue
whose correlation with the label differs per split (uniform for the teacher,
100% for distillation, half conflicting for testing). This mirrors the e2KD
setting where a student distilled on biased data must inherit the teacher's
reliance on the object rather than on the background.

Sample format: ``png`` (RGB), ``cls`` (ASCII int), ``json`` with
``{"group", "place", "boxes": [[x0, y0, x1, y1]], "box_labels"}``; boxes are the
tight pixel bounding box of the drawn object, x1/y1 exclusive.
"""

from __future__ import annotations

import colorsys
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gte.data.index import write_class_names, write_group_names
from gte.data.writers.core import atomic_tar, shard_name, shard_spec
from gte.io import atomic_write_json

SPLITS = ("teacher", "distill", "test")
BACKGROUNDS = ("stripes", "colour")  # how a place is coded: stripe texture (the demo) or mean colour (its limit)
CLASS_NAMES = ("circle", "square", "triangle", "plus", "diamond", "ring")
GROUP_NAMES = ("aligned", "conflicting")  # json.group = 1 when the background codes another class than the label
_MIN_CONTRAST = 80.0  # mean |RGB diff| (0..255) between object and background mean


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Generator used to render sample ``index`` of ``split``.

    One generator per sample makes any sample re-renderable in isolation (tests,
    debugging, parallel writers). The trailing 1 tags this stream apart from the
    split-level one: SeedSequence zero-pads short entropy, so ``[seed, s]`` and
    ``[seed, s, 0, 0]`` would otherwise collide.
    """
    return np.random.default_rng([seed, SPLITS.index(split), 1, index])


def _check_sizes(image_size: int, num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}")
    if image_size < 16:  # below this the ring's hole and the plus' bars degenerate
        raise ValueError(f"image_size must be >= 16, got {image_size}")


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), 0])


@lru_cache(maxsize=None)
def _stripe_basis(place: int, image_size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """sin/cos of the place's stripe pattern; sin(a + phase) is then a cheap mix of the two."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    theta = np.pi * place / num_classes  # place-specific orientation ...
    freq = (3 + place) / image_size  # ... and frequency (cycles per pixel)
    a = 2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta))
    return np.sin(a)[..., None], np.cos(a)[..., None]


def _colour_background(
    rng: np.random.Generator, place: int, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A place coded by its colour: hue place/k (± 0.03), flat with pixel noise; returns (uint8 HWC, mean RGB).

    ``demo.background = "colour"``: the shortcut a student can read from the mean colour alone (docs/method.md, "Right
    reasons on a colour shortcut")."""
    hue = (place + rng.uniform(-0.03, 0.03) * num_classes) / num_classes % 1.0
    base = np.asarray(colorsys.hsv_to_rgb(hue, 0.6, 0.7), dtype=np.float32) * 255.0 * rng.uniform(0.85, 1.15)
    noise = rng.normal(0.0, 8.0, (image_size, image_size, 1)).astype(np.float32)
    img = np.clip(base + noise, 0, 255)
    return img.astype(np.uint8), img.reshape(-1, 3).mean(axis=0)


def _background(
    rng: np.random.Generator, place: int, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random colour + place-specific stripes (orientation, frequency); returns (uint8 HWC, mean RGB).

    The place is a texture, not a colour: a background read from its mean colour would be so easy that a student
    could gate its logits on it while copying the teacher's explanation directions (measured: e2KD then fixed
    almost none of the conflicting group). Texture keeps the shortcut complete (100 % predictive in the distill
    split, which plain KD learns) without being trivially linear.
    """
    sin_a, cos_a = _stripe_basis(place, image_size, num_classes)
    phase = rng.uniform(0.0, 2 * np.pi)
    stripes = sin_a * np.float32(np.cos(phase)) + cos_a * np.float32(np.sin(phase))
    hue = rng.uniform(0.0, 1.0)  # colour says nothing about the place: only the stripe texture does
    base = np.asarray(colorsys.hsv_to_rgb(hue, 0.6, 0.7), dtype=np.float32) * 255.0 * rng.uniform(0.85, 1.15)
    # Amplitude 0.25 keeps every background pixel well inside the object-contrast
    # margin, so the object's flat colour never reappears in the background.
    img = np.clip(base.astype(np.float32) * (1.0 + 0.35 * stripes), 0, 255)
    return img.astype(np.uint8), img.reshape(-1, 3).mean(axis=0)


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple[int, int, int]:
    """Uniform random colour, rejection-sampled to contrast with the background."""
    # One batched draw instead of a Python retry loop; ~40% of candidates pass.
    cands = rng.integers(0, 256, (32, 3))
    ok = np.flatnonzero(np.abs(cands - bg_mean).mean(axis=1) >= _MIN_CONTRAST)
    # Fallback is practically unreachable; the per-channel extreme is >= 127.5 away.
    c = cands[ok[0]] if ok.size else np.where(bg_mean < 128, 255, 0)
    return int(c[0]), int(c[1]), int(c[2])


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, x0: int, y0: int, s: int) -> None:
    """Draw class ``label`` as a filled 255 mask inside the s*s square at (x0, y0)."""
    x1, y1 = x0 + s - 1, y0 + s - 1  # PIL coordinates are inclusive
    cx, cy = x0 + (s - 1) / 2, y0 + (s - 1) / 2
    if label == 0:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif label == 1:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif label == 2:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif label == 3:
        t = max(2, round(s / 3))  # thick bars so the cross survives 32px images
        a = x0 + (s - t) // 2
        b = y0 + (s - t) // 2
        draw.rectangle([a, y0, a + t - 1, y1], fill=255)
        draw.rectangle([x0, b, x1, b + t - 1], fill=255)
    elif label == 4:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif label == 5:
        h = max(2, round(s / 4))
        draw.ellipse([x0, y0, x1, y1], fill=255)
        draw.ellipse([x0 + h, y0 + h, x1 - h, y1 - h], fill=0)
    else:
        raise ValueError(f"label {label} out of range (max {len(CLASS_NAMES) - 1})")


def render_sample(
    rng: np.random.Generator, label: int, place: int, image_size: int, num_classes: int, background: str = "stripes"
) -> tuple[Image.Image, list[float]]:
    """Render one image of shape ``label`` on background ``place``; return (RGB image, box)."""
    _check_sizes(image_size, num_classes)
    if not (0 <= label < num_classes and 0 <= place < num_classes):
        raise ValueError(f"label {label} / place {place} out of range for {num_classes} classes")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    paint = _background if background == "stripes" else _colour_background
    bg, bg_mean = paint(rng, place, image_size, num_classes)
    colour = _object_colour(rng, bg_mean)
    s = int(round(rng.uniform(0.35, 0.6) * image_size))
    x0, y0 = (int(v) for v in rng.integers(0, image_size - s + 1, 2))
    mask = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(mask), label, x0, y0, s)
    img = Image.fromarray(bg, "RGB")
    img.paste(colour, (0, 0, image_size, image_size), mask)
    # The mask's bbox is the exact drawn extent (PIL rasterisation may differ by a
    # pixel from the nominal square), and getbbox is already x1/y1-exclusive.
    bbox = mask.getbbox()
    assert bbox is not None
    return img, [float(v) for v in bbox]


def _assign(rng: np.random.Generator, split: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and the per-split place rule; returns (labels, places)."""
    labels = np.arange(n) % k
    if split == "teacher":
        perm = rng.permutation(n)
        return labels[perm], rng.integers(0, k, n)
    if split == "distill":
        labels = labels[rng.permutation(n)]
        return labels, labels.copy()
    # test: alternate aligned/conflicting over class-sorted order, which gives
    # exactly n // 2 conflicting samples and a near 50/50 split within every class.
    conflict = np.zeros(n, dtype=bool)
    conflict[np.argsort(labels, kind="stable")[1::2]] = True
    perm = rng.permutation(n)
    labels, conflict = labels[perm], conflict[perm]
    places = np.where(conflict, (labels + rng.integers(1, k, n)) % k, labels)
    return labels, places


def _encode_sample(seed: int, split: str, i: int, label: int, place: int, image_size: int, num_classes: int,
                   background: str = "stripes") -> dict:
    img, box = render_sample(image_rng(seed, split, i), label, place, image_size, num_classes, background)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # level 1: ~6x smaller than raw, still fast
    meta = {"group": int(place != label), "place": place, "boxes": [box], "box_labels": [label]}
    return {
        "__key__": f"{i:06d}",
        "png": buf.getvalue(),
        "cls": str(label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def write_synthetic_split(
    out_dir: Path,
    split: str,
    n: int,
    *,
    image_size: int = 32,
    num_classes: int = 4,
    seed: int = 0,
    samples_per_shard: int = 1000,
    background: str = "stripes",
) -> str:
    """Write ``n`` samples of ``split`` to ``out_dir/{split}-{i:06d}.tar``; return the shard spec.

    ``seed`` must be a non-negative int. Key ``i`` is rendered by ``image_rng(seed, split, i)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 1 or samples_per_shard < 1:
        raise ValueError("n and samples_per_shard must be positive")
    _check_sizes(image_size, num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_group_names(out_dir, list(GROUP_NAMES))
    labels, places = _assign(_split_rng(seed, split), split, n, num_classes)
    num_shards = -(-n // samples_per_shard)
    for shard in range(num_shards):
        # mtime 0 makes the tar bytes a pure function of the arguments; atomic: readers never see a truncated shard
        with atomic_tar(out_dir / shard_name(split, shard)) as sink:
            for i in range(shard * samples_per_shard, min(n, (shard + 1) * samples_per_shard)):
                sink.write(_encode_sample(seed, split, i, int(labels[i]), int(places[i]), image_size, num_classes,
                                          background))
    return shard_spec(out_dir, split, num_shards)


def write_demo_shards(
    out_dir: Path,
    *,
    n_teacher: int,
    n_distill: int,
    n_test: int,
    image_size: int = 32,
    num_classes: int = 4,
    seed: int = 0,
    background: str = "stripes",
) -> dict[str, str]:
    """Write all three splits plus ``classes.json``; ``DONE.json`` last marks a complete cache."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "DONE.json"
    done.unlink(missing_ok=True)  # a rewrite in progress must not look complete
    sizes = {"teacher": n_teacher, "distill": n_distill, "test": n_test}
    specs = {
        split: write_synthetic_split(out_dir, split, sizes[split], image_size=image_size, num_classes=num_classes,
                                     seed=seed, background=background)
        for split in SPLITS
    }
    write_class_names(out_dir, list(CLASS_NAMES[:num_classes]))
    args = {"image_size": image_size, "num_classes": num_classes, "seed": seed, "background": background,
            **{f"n_{k}": v for k, v in sizes.items()}}
    atomic_write_json(done, {"args": args, "specs": specs})
    return specs
