"""Decode one raw sample and apply the train or eval geometry (image and boxes together).

Train: RandomResizedCrop (torchvision's sampling rule: 10 tries of area ∈ ``crop_scale``, log-uniform aspect ratio in
[3/4, 4/3], else the central crop of clamped ratio) + horizontal flip p = 0.5, done as one PIL ``resize(box=…)``
(crop and antialiased bilinear resize, reading only the crop's region). The random numbers of a sample come from its
own generator seeded by (seed, epoch, pass, key): a sample's augmentation does not depend on ranks, workers or the
order it is read in, and the training process's global RNGs are never touched.
Eval: Resize the short side to ``eval_resize`` (PIL bilinear, antialiased) + CenterCrop ``image_size`` — the
torchvision reference pipeline.

Boxes (``json.boxes``, ``[x0, y0, x1, y1]`` image pixels, x1/y1 exclusive) follow the same geometry and are clamped
to the output; a box that ends up outside has zero area and is kept (its index matches ``box_labels``).

Reduced-scale decoding (``reduced_decode``, on by default): the geometry is drawn from the image's full-size
dimensions, read from its header, before any pixel is decoded; then a JPEG is decoded at the smallest libjpeg DCT
scale (1/2, 1/4, 1/8, ``Image.draft``) that keeps ≥ ``decode_margin`` (default 2) decoded pixels per output pixel
of the crop, and the same region, in decoded pixels, is resized (eval: only the centre crop's region — the same
sample positions and filter as resizing the whole image and cropping). The crop box, flip, boxes and maps are those of the full-size image, whatever
the scale; only pixel values move, by less than encoding the photo as a quality-90 JPEG does
(tests/test_data_loader.py, benchmarks/README.md).

Decoder: PIL (libjpeg-turbo) by default; ``decoder="torchvision"`` decodes JPEGs with ``torchvision.io.decode_jpeg``
(about 1.4× faster decode on its own, deprecated by torchvision 0.29 in favour of TorchCodec); see the README's loader
benchmark for what each gives end to end.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from gte.data.images import max_pixels, to_rgb
from gte.data.tar import IMAGE_EXTS

Image.MAX_IMAGE_PIXELS = 200_000_000  # decompression-bomb guard stays on, above any real dataset image


_MAX_INDEX = 2**31  # class and group indices: far above any dataset's, far below int64 overflow in a batch


def _is_index(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < _MAX_INDEX


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e9


def check_metadata(meta: dict[str, Any]) -> None:
    """Raise :class:`BadSample` unless the ``json`` fields gte reads have the design.md types: ``group`` an index
    (or -1), ``labels`` and ``box_labels`` lists of indices, ``boxes`` a list of ``[x0, y0, x1, y1]`` numbers."""
    if "group" in meta and not _is_index(meta["group"], -1):
        raise BadSample(f"json.group is not a group index: {str(meta['group'])[:20]!r}")
    for key in ("labels", "box_labels"):
        if meta.get(key) is not None and not (isinstance(meta[key], list) and all(map(_is_index, meta[key]))):
            raise BadSample(f"json.{key} is not a list of class indices")
    boxes = meta.get("boxes")
    if boxes is not None and not (isinstance(boxes, list) and all(
            isinstance(b, list) and len(b) == 4 and all(map(_is_number, b)) for b in boxes)):
        raise BadSample("json.boxes is not a list of [x0, y0, x1, y1] numbers")


class BadSample(Exception):
    """A sample that cannot be used (corrupt image, missing member, bad json); it is skipped and counted."""


def sample_rng(seed: int, epoch: int, repeat: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, repeat, zlib.crc32(key.encode())])


def rrc_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop, torchvision's algorithm with an explicit generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _map_boxes(boxes: list, sx: float, sy: float, dx: float, dy: float, out: int, flip: bool) -> list[list[float]]:
    """x' = x·sx − dx, y' = y·sy − dy, clamped to [0, out]; then mirrored if ``flip``."""
    mapped = []
    out = float(out)
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b)
        x0, x1 = (min(max(x * sx - dx, 0.0), out) for x in (x0, x1))
        y0, y1 = (min(max(y * sy - dy, 0.0), out) for y in (y0, y1))
        if flip:
            x0, x1 = out - x1, out - x0
        mapped.append([x0, y0, x1, y1])
    return mapped


_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _tv_mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


@dataclass
class SampleTransform:
    """Raw sample dict → ``{"image": uint8 3×S×S, "label", "group", "key", "labels", "boxes", "box_labels", …}``."""

    train: bool
    image_size: int
    eval_resize: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    epoch: int = 0
    decoder: str = "pil"
    members: tuple[str, ...] = ()   # extra numeric members (``.npy``) to decode and return
    maps: tuple[str, ...] = ()      # members among ``members`` that are C×h×w maps of the EVAL view (frozen e2KD):
                                    # they follow the sample's geometry and come out C×S×S float32
    interpolation: str = "bilinear"  # of the crop's resize ("bilinear" | "bicubic" | "nearest")
    reduced_decode: bool = True     # JPEGs decoded at the smallest DCT scale the crop allows (PIL decoder; decode)
    decode_margin: float = 2.0      # … keeping ≥ this many decoded pixels per output pixel (decode)
    _resize: int = field(init=False, default=0)
    _max_pixels: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._resize = self.eval_resize or round(self.image_size / 0.875)
        self._max_pixels = max_pixels()
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_PIL_FILTERS)}, got {self.interpolation!r}")
        if self.decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {self.decoder!r}")

    # -- decoding -------------------------------------------------------------------------------------------------
    def source(self, sample: dict[str, Any]) -> tuple[str, int, int]:
        """(image member, width, height) from the image's header alone: the sample's geometry is drawn from the
        full-size dimensions before any pixel is decoded (and a decompression bomb costs nothing)."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample("no image member (jpg/jpeg/png/webp)")
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                width, height = im.size
        except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as e:
            raise BadSample(f"undecodable {ext} ({e})") from None
        if width * height > self._max_pixels:
            raise BadSample(f"{width}×{height} {ext} has more than {self._max_pixels} pixels (GTE_MAX_IMAGE_PIXELS)")
        return ext, width, height

    def decode(self, data: bytes, ext: str, shrink: float = 1.0) -> tuple[Image.Image | torch.Tensor, float]:
        """(decoded image, scale) of the ``ext`` member's bytes (checked by :meth:`source` first); ``scale`` =
        decoded pixels per source pixel.

        ``shrink``: by how much the caller's resampling shrinks the source at least (source region ÷ output size,
        the smaller of the two sides). With ``reduced_decode`` the PIL decoder decodes a JPEG at libjpeg's DCT scale
        1/a (``Image.draft``), a ∈ {8, 4, 2, 1} the largest ≤ ``shrink`` / ``decode_margin``: with the default 2
        the region, decoded, still has at least twice the output's pixels per side, so the antialiased resize after
        it still shrinks by ≥ 2× and its filter, not the DCT's, shapes the result; with 1 the DCT's filter does more
        of the shrinking and pixels move about as far as JPEG encoding moves them (docs/data.md). Other
        formats, and the torchvision decoder (it has no DCT scaling), decode at full size (scale 1).
        """
        try:
            if self.decoder == "torchvision" and ext in ("jpg", "jpeg"):
                import warnings

                from torchvision.io import ImageReadMode, decode_jpeg

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                       mode=ImageReadMode.RGB), 1.0
            with Image.open(io.BytesIO(data)) as im:
                scale = 1.0
                a = next(a for a in (8, 4, 2, 1) if a <= max(shrink / self.decode_margin, 1.0))
                if self.reduced_decode and a > 1 and im.format == "JPEG":
                    # Pillow picks the largest a' ≤ min(W // w, H // h), which for these sizes is a; its answer gives
                    # the full image's extent in decoded pixels (W / a' — the decoded size is rounded up)
                    width = im.width
                    drafted = im.draft(None, (width // a, im.height // a))
                    if drafted is not None:
                        scale = drafted[1][2] / width
                im.load()  # decodes fully: a truncated or corrupt image fails here, not later
                return to_rgb(im), scale
        except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as e:
            raise BadSample(f"undecodable {ext} ({e})") from None

    # -- geometry -------------------------------------------------------------------------------------------------
    def _geometry(self, width: int, height: int, key: str, repeat: int):
        """(box in source pixels (l, t, r, b), flip) for train; for eval (resized size, crop offset)."""
        rng = sample_rng(self.seed, self.epoch, repeat, key)
        left, top, w, h = rrc_params(width, height, tuple(self.crop_scale), tuple(self.ratio), rng)
        return (left, top, left + w, top + h), bool(rng.random() < 0.5)

    def _eval_size(self, width: int, height: int) -> tuple[int, int]:
        r = self._resize  # torchvision Resize(int): short side to r, long side truncated
        if width <= height:
            return r, int(r * height / width)
        return int(r * width / height), r

    def __call__(self, sample: dict[str, Any], repeat: int = 0) -> dict[str, Any]:
        key = sample.get("__key__", "")
        if "cls" not in sample:
            raise BadSample("no cls member")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise BadSample(f"cls is not an integer: {sample['cls'][:20]!r}") from None
        if not 0 <= label < _MAX_INDEX:
            raise BadSample(f"cls {label} is not a class index (0 <= cls < 2^31)")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if not isinstance(meta, dict):
                meta = {}
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadSample("json member is not valid JSON") from None
        check_metadata(meta)
        ext, width, height = self.source(sample)  # full-size: the geometry never depends on the decode scale
        s = self.image_size
        boxes = meta.get("boxes")
        if self.train:
            (l, t, r, b), flip = self._geometry(width, height, key, repeat)
            img, k = self.decode(sample[ext], ext, min(r - l, b - t) / s)
            if isinstance(img, Image.Image):
                box = (l, t, r, b) if k == 1 else (l * k, t * k, r * k, b * k)  # the same region, decoded pixels
                out = img.resize((s, s), _PIL_FILTERS[self.interpolation], box=box)
                if flip:
                    out = out.transpose(Image.FLIP_LEFT_RIGHT)
                pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)
            else:
                from torchvision.transforms.v2 import functional as TF

                pixels = TF.resized_crop(img, t, l, b - t, r - l, [s, s], antialias=True,
                                         interpolation=_tv_mode(self.interpolation))
                if flip:
                    pixels = pixels.flip(-1)
            if boxes:
                sx, sy = s / (r - l), s / (b - t)
                boxes = _map_boxes(boxes, sx, sy, l * sx, t * sy, s, flip)
        else:
            rw, rh = self._eval_size(width, height)
            dx, dy = int(round((rw - s) / 2.0)), int(round((rh - s) / 2.0))
            img, k = self.decode(sample[ext], ext, min(width / rw, height / rh))
            if isinstance(img, Image.Image):
                if self.reduced_decode and min(rw, rh) >= s:
                    # only the centre crop's region, in decoded pixels: the same sample positions and filter as
                    # resizing the whole image and cropping (PIL's box resize reads outside the box), less work
                    fx, fy = width / rw * k, height / rh * k
                    out = img.resize((s, s), _PIL_FILTERS[self.interpolation],
                                     box=(dx * fx, dy * fy, (dx + s) * fx, (dy + s) * fy))
                else:
                    out = img.resize((rw, rh), _PIL_FILTERS[self.interpolation])
                    out = out.crop((dx, dy, dx + s, dy + s))  # PIL pads outside
                pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)
            else:
                from torchvision.transforms.v2 import functional as TF

                pixels = TF.center_crop(TF.resize(img, [rh, rw], antialias=True,
                                                  interpolation=_tv_mode(self.interpolation)), [s, s])
            if boxes:
                boxes = _map_boxes(boxes, rw / width, rh / height, dx, dy, s, False)
        out_sample = {
            "image": pixels,
            "label": label,
            "group": int(meta.get("group", -1)),
            "key": key,
            "labels": meta.get("labels"),
            "boxes": boxes if boxes else meta.get("boxes"),
            "box_labels": meta.get("box_labels"),
        }
        for name in self.members:
            if name not in sample:
                raise BadSample(f"no {name} member")
            try:
                value = torch.from_numpy(np.load(io.BytesIO(sample[name]), allow_pickle=False))
            except (ValueError, OSError) as e:
                raise BadSample(f"{name} is not a numeric .npy array ({e})") from None
            if name in self.maps:
                if value.ndim != 3:
                    raise BadSample(f"{name} is not a C×h×w map (shape {tuple(value.shape)})")
                box = (l, t, r, b) if self.train else None
                value = self.follow(value, width, height, box, flip if self.train else False)
            out_sample[name] = value
        return out_sample

    def follow(self, stored: torch.Tensor, width: int, height: int, box: tuple[int, int, int, int] | None,
               flip: bool) -> torch.Tensor:
        """A map stored for the eval view (Resize + CenterCrop of the ``width``×``height`` image) → the C×S×S map of
        this sample's view: for training the SAME crop box (source pixels) and flip as the image.

        Equivalent to pasting the map (bilinearly resized) onto the source image where the eval crop lies and then
        cropping it like the image, done as one bilinear ``grid_sample`` (no double resampling). Inside the stored
        extent edges are clamped (as PIL does for the image); source pixels the eval crop never saw (trimmed by the
        centre crop) get 0 — no stored explanation there.
        """
        import torch.nn.functional as F

        m = stored.float()[None]
        s = self.image_size
        if box is None:  # eval view: the stored map covers exactly the output
            if m.shape[-2:] != (s, s):
                m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False,
                                  antialias=m.shape[-1] > s)
            return m[0]
        mh, mw = m.shape[-2:]
        rw, rh = self._eval_size(width, height)
        dx, dy = int(round((rw - s) / 2.0)), int(round((rh - s) / 2.0))
        l, t, r, b = box
        u = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        xs = (l + u * (r - l)) * rw / width - dx      # output pixel centres in eval-view pixels
        ys = (t + u * (b - t)) * rh / height - dy
        gx, gy = (2 * xs / s - 1), (2 * ys / s - 1)   # [-1, 1] over the stored extent (align_corners=False)
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        out = F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        inside = ((xs >= 0) & (xs <= s))[None, :] & ((ys >= 0) & (ys <= s))[:, None]
        out = out * inside
        return out.flip(-1) if flip else out
