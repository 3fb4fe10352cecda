"""Decoded images, the same everywhere (the loader, `gte explain`): one decompression-bomb limit and one conversion
to 8-bit RGB. No torch here: `gte explain` rejects a bad file before torch is imported."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from gte.errors import GteError

DEFAULT_MAX_PIXELS = 64_000_000  # a 8000×8000 photo still loads; a 1 kB PNG declaring 400 MP does not


def max_pixels() -> int:
    """The one decompression-bomb limit (loader, `gte explain`): ``GTE_MAX_IMAGE_PIXELS`` or 64 MP."""
    raw = os.environ.get("GTE_MAX_IMAGE_PIXELS", "")
    try:
        return int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise GteError(f"GTE_MAX_IMAGE_PIXELS must be an integer, got '{raw}'") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB; 16- and 32-bit grey levels are scaled down (Pillow's convert would clip them to white)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # "I;16", "I;16B", "I" (16-bit PNGs open as one of these)
        a = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")
